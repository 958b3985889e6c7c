"""Real files: the research samples (tests/data/samples/) and the torchvision
corpus (tests/data/corpus/, MANIFEST.jsonl), compared with torch.load(path, map_location="cpu",
weights_only=False); plus corrupted inputs (truncations and byte flips) that must raise a
CheckpointError subclass and never crash. The corruption tests do not need torch.
"""

from __future__ import annotations

import json
import random
import zipfile

import numpy as np
import pytest

import ckpt_tools
import torchfree
from conftest import CORPUS, SAMPLES, assert_same, count_tensors

ZIP_MAGIC = b"PK\x03\x04"

needs_torch = pytest.mark.needs_torch


def _sample_files():
    return sorted(p for p in SAMPLES.iterdir() if p.suffix == ".pt")


def _manifest():
    with open(CORPUS / "MANIFEST.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _is_zip(path):
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


SAMPLE_ZIP = [p for p in _sample_files() if _is_zip(p)]
SAMPLE_OTHER = [p for p in _sample_files() if not _is_zip(p)]
CORPUS_ZIP = [r for r in _manifest() if r["format"] == "zip"]
CORPUS_OTHER = [r for r in _manifest() if r["format"] != "zip"]


def test_inventory():
    """The vendored data this module relies on is present (guards against silently testing nothing)."""
    assert len(SAMPLE_ZIP) == 8, SAMPLE_ZIP
    assert {p.name for p in SAMPLE_OTHER} >= {"legacy113.pt", "legacy211.pt", "old_tar_format.pt",
                                               "cuda211_legacy.pt"}
    assert len(CORPUS_ZIP) == 90 and len(CORPUS_OTHER) == 31
    for r in CORPUS_ZIP:
        assert _is_zip(CORPUS / r["path"]), r["path"]


def _torch_load(torch, path):
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------
# zip samples
# ---------------------------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("weights_only", [True, False])
@pytest.mark.parametrize("path", SAMPLE_ZIP, ids=lambda p: p.name)
def test_sample_zip(torch, path, weights_only):
    expected = _torch_load(torch, path)
    got = torchfree.load(path, weights_only=weights_only)  # map_location=None: host arrays
    pairs = assert_same(got, expected)
    assert len(pairs) == count_tensors(expected)
    assert_same(torchfree.load(path.read_bytes(), weights_only=weights_only), expected)
    assert_same(torchfree.load(path, mmap=False, weights_only=weights_only), expected)


@needs_torch
def test_cuda_sample_host_arrays(torch):
    path = SAMPLES / "cuda211.pt"
    expected = _torch_load(torch, path)
    for ml in (None, "cpu", {"cuda:0": "cpu"}):
        got = torchfree.load(path, map_location=ml)
        assert_same(got, expected)
        assert isinstance(got["x"], np.ndarray)
        assert np.shares_memory(got["x"], got["v"])
        assert got["v"].strides == (12,)
    locs = []
    torchfree.load(path, map_location=lambda s, tag: locs.append((s.location, tag)))
    assert locs and all(tag == "cuda:0" for _, tag in locs), locs


@needs_torch
def test_views113_layout(torch):
    path = SAMPLES / "views113.pt"
    got = torchfree.load(path)
    assert_same(got, _torch_load(torch, path))
    x = got["x"]
    assert x.strides == (16, 4) and got["xt"].strides == (4, 16)
    assert got["scalar"].shape == () and got["empty"].shape == (0, 3)
    assert np.shares_memory(x, got["row"]) and np.shares_memory(x, got["col"])


def test_many_storages_lexicographic():
    for name in ("many113.pt", "many211.pt"):
        got = torchfree.load(SAMPLES / name)
        assert [float(a[0]) for a in got] == [float(i) for i in range(12)], name


def test_skipdata_sample_loads_zeros():
    """Zero CRCs (Python's zipfile refuses the file) are not verified by torch: neither here."""
    got = torchfree.load(SAMPLES / "skipdata211.pt")
    assert got["a"].dtype == np.float32 and got["a"].tolist() == [0.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("weights_only", [True, False])
@pytest.mark.parametrize("rec", CORPUS_ZIP, ids=lambda r: r["path"].rsplit("/", 1)[-1])
def test_corpus_zip(torch, rec, weights_only):
    path = CORPUS / rec["path"]
    expected = _torch_load(torch, path)
    # numpy scalars/arrays are inert rebuilds: torchfree's weights_only=True loads them too
    got = torchfree.load(path, weights_only=weights_only)
    pairs = assert_same(got, expected)
    assert len(pairs) == rec["tensors"] == count_tensors(expected)


# ---------------------------------------------------------------------------------------------
# legacy stream and tar files
# ---------------------------------------------------------------------------------------------

def _legacy_equal(torch, path, weights_only):
    expected = _torch_load(torch, path)
    for src in (path, path.read_bytes()):
        got = torchfree.load(src, weights_only=weights_only)
        pairs = assert_same(got, expected)
        assert len(pairs) == count_tensors(expected)


@needs_torch
@pytest.mark.parametrize("path", SAMPLE_OTHER, ids=lambda p: p.name)
def test_sample_legacy_or_tar(torch, path):
    _legacy_equal(torch, path, weights_only=False)


@needs_torch
@pytest.mark.parametrize("weights_only", [True, False])
@pytest.mark.parametrize("rec", CORPUS_OTHER, ids=lambda r: r["path"].rsplit("/", 1)[-1])
def test_corpus_legacy(torch, rec, weights_only):
    path = CORPUS / rec["path"]
    assert rec["format"] == "legacy"
    _legacy_equal(torch, path, weights_only)


# ---------------------------------------------------------------------------------------------
# corrupted inputs (no torch needed)
# ---------------------------------------------------------------------------------------------

def _corruption_inputs():
    files = {
        "basic211": (SAMPLES / "basic211.pt").read_bytes(),
        "views113": (SAMPLES / "views113.pt").read_bytes(),
        "cuda211": (SAMPLES / "cuda211.pt").read_bytes(),
        "alexnet": (CORPUS / "torchvision-0.14.1/test/expect/ModelTester.test_alexnet_expect.pkl").read_bytes(),
    }
    files["basic211_deflated"] = ckpt_tools.rezip(files["basic211"], zipfile.ZIP_DEFLATED)
    files["legacy211"] = (SAMPLES / "legacy211.pt").read_bytes()
    files["legacy_corpus"] = (CORPUS / CORPUS_OTHER[0]["path"]).read_bytes()
    return files


CORRUPT = _corruption_inputs()
# a tar cut inside its end-of-archive padding is still whole: flipped, not truncated
FLIPPED = {**CORRUPT, "old_tar": (SAMPLES / "old_tar_format.pt").read_bytes()}


def _load_or_checkpoint_error(data, **kw):
    try:
        torchfree.load(data, **kw)
    except torchfree.CheckpointError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_truncated_inputs_raise(name):
    data = CORRUPT[name]
    n = len(data)
    assert torchfree.load(data) is not None  # the intact file loads
    offsets = set(range(0, min(n, 200))) | set(range(max(0, n - 200), n))
    offsets |= set(range(0, n, max(1, n // 400)))
    failures = []
    for cut in sorted(offsets):
        try:
            torchfree.load(data[:cut])
        except torchfree.CheckpointError:
            continue
        except Exception as e:  # wrong exception type
            failures.append((cut, repr(e)[:200]))
        else:
            failures.append((cut, "loaded successfully"))
    assert not failures, f"{len(failures)} truncations misbehaved, e.g. {failures[:5]}"


def test_truncated_file_paths_raise(tmp_path):
    """Truncated files given by path (the mmap code path)."""
    data = CORRUPT["basic211"]
    failures = []
    for cut in list(range(0, len(data), 97)) + [len(data) - 1, len(data) - 22, len(data) - 23]:
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(data[:cut])
        for mm in (None, False):
            try:
                torchfree.load(p, mmap=mm)
            except torchfree.CheckpointError:
                continue
            except Exception as e:
                failures.append((cut, mm, repr(e)[:200]))
            else:
                failures.append((cut, mm, "loaded successfully"))
    assert not failures, failures[:5]


@pytest.mark.parametrize("name", sorted(FLIPPED))
def test_byte_flips_never_crash(name):
    data = FLIPPED[name]
    n = len(data)
    rng = random.Random(1234)
    positions = list(range(n)) if n <= 2500 else sorted(rng.sample(range(n), 2500))
    bad = []
    outcomes = {"loaded": 0, "error": 0}
    for pos in positions:
        for mask in (0xFF, 0x01):
            mutated = bytearray(data)
            mutated[pos] ^= mask
            for wo in (True, False):
                try:
                    ok = _load_or_checkpoint_error(bytes(mutated), weights_only=wo)
                except Exception as e:  # anything but a CheckpointError is a bug
                    bad.append((pos, mask, wo, repr(e)[:200]))
                    continue
                outcomes["loaded" if ok else "error"] += 1
    assert not bad, f"{len(bad)} flips raised a non-CheckpointError, e.g. {bad[:5]}"
    assert outcomes["error"] > 0  # the header/directory flips must be detected


def test_random_garbage_and_small_inputs():
    rng = random.Random(99)
    inputs = [b"", b"PK", ZIP_MAGIC, ZIP_MAGIC + b"\x00" * 26, b"\x80\x02", b"PYTORCH1" + b"\x00" * 64,
              b"PK\x05\x06" + b"\x00" * 18]
    inputs += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(200)]
    inputs += [ZIP_MAGIC + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
               for _ in range(200)]
    for data in inputs:
        with pytest.raises(torchfree.CheckpointError):
            torchfree.load(data)
