"""torchfree against the committed fixtures in tests/data/ (made by tests/data/make_fixtures.py
with torch 2.13). Runs WITHOUT torch: expected values come from tests/data/expected.json/.npz.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

import ckpt_tools
import torchfree
from conftest import DATA, dtype_object_ok, meta_dtype_ok, np_bytes, np_dtype_by_name

EXPECTED = json.loads((DATA / "expected.json").read_text())
FILES = EXPECTED["files"]
ARRAYS = dict(np.load(DATA / "expected.npz"))


# ---------------------------------------------------------------------------------------------
# expected-structure walker
# ---------------------------------------------------------------------------------------------

def decode_plain(e):
    """Decode a hashable expected value (dict keys, set members)."""
    if isinstance(e, dict):
        if "__tuple__" in e:
            return tuple(decode_plain(v) for v in e["__tuple__"])
        if "__float__" in e:
            return float.fromhex(e["__float__"])
        if "__bytes__" in e:
            return bytes.fromhex(e["__bytes__"])
        raise AssertionError(f"unhashable expected key {e}")
    return e


def _join(path, key):
    return str(key) if not path else f"{path}.{key}"


def check(got, exp, path, pairs, meta=False):
    if isinstance(exp, list):
        assert type(got) is list, f"{path}: expected list, got {type(got)!r}"
        assert len(got) == len(exp), f"{path}: length {len(got)} != {len(exp)}"
        for i, (g, e) in enumerate(zip(got, exp)):
            check(g, e, _join(path, i), pairs, meta)
        return
    if not isinstance(exp, dict):
        assert type(got) is type(exp), f"{path}: expected {type(exp).__name__}, got {type(got)!r} ({got!r})"
        assert got == exp, f"{path}: {got!r} != {exp!r}"
        return
    if "__tensor__" in exp:
        dt = np_dtype_by_name(exp["dtype"])
        if meta:
            assert isinstance(got, torchfree.MetaArray), f"{path}: expected MetaArray, got {type(got)!r}"
            assert got.shape == tuple(exp["shape"]) and type(got.shape) is tuple, f"{path}: {got.shape}"
            assert meta_dtype_ok(got.dtype, exp["torch_dtype"]), f"{path}: MetaArray dtype {got.dtype!r}"
            return
        assert type(got) is np.ndarray, f"{path}: expected ndarray, got {type(got)!r}"
        assert got.dtype == dt, f"{path}: dtype {got.dtype!r} != {dt!r} (torch {exp['torch_dtype']})"
        assert got.dtype.byteorder in ("=", "|", "<"), f"{path}: non-native byte order {got.dtype!r}"
        assert got.shape == tuple(exp["shape"]), f"{path}: shape {got.shape} != {tuple(exp['shape'])}"
        if exp["strides"] is not None:
            assert got.strides == tuple(exp["strides"]), f"{path}: strides {got.strides} != {exp['strides']}"
        want = ARRAYS[exp["__tensor__"]]
        have = np_bytes(got)
        assert np.array_equal(have, want), f"{path}: values differ: {have[:24].tolist()} vs {want[:24].tolist()}"
        pairs[path] = (got, exp)
        return
    if "__tuple__" in exp:
        assert type(got) is tuple, f"{path}: expected tuple, got {type(got)!r}"
        assert len(got) == len(exp["__tuple__"]), f"{path}: length"
        for i, (g, e) in enumerate(zip(got, exp["__tuple__"])):
            check(g, e, _join(path, i), pairs, meta)
        return
    if "__dict__" in exp or "__odict__" in exp:
        items = exp.get("__dict__", exp.get("__odict__"))
        want_type = dict if "__dict__" in exp else collections.OrderedDict
        assert type(got) is want_type, f"{path}: expected {want_type.__name__}, got {type(got)!r}"
        keys = [decode_plain(k) for k, _ in items]
        assert list(got.keys()) == keys, f"{path}: keys {list(got.keys())} != {keys}"
        for k, (_, e) in zip(keys, items):
            check(got[k], e, _join(path, k), pairs, meta)
        if "_metadata" in exp:
            assert hasattr(got, "_metadata"), f"{path}: OrderedDict lost _metadata"
            check(got._metadata, exp["_metadata"], _join(path, "_metadata"), pairs, meta)
        return
    if "__set__" in exp:
        assert type(got) is set and got == {decode_plain(v) for v in exp["__set__"]}, f"{path}: {got!r}"
        return
    if "__float__" in exp:
        assert type(got) is float, f"{path}: expected float, got {type(got)!r}"
        assert struct.pack("<d", got) == struct.pack("<d", float.fromhex(exp["__float__"])), f"{path}: {got!r}"
        return
    if "__complex__" in exp:
        re_, im = (float.fromhex(v) for v in exp["__complex__"])
        assert type(got) is complex and struct.pack("<dd", got.real, got.imag) == struct.pack("<dd", re_, im)
        return
    if "__bytes__" in exp:
        assert type(got) is bytes and got == bytes.fromhex(exp["__bytes__"]), f"{path}: {got!r}"
        return
    if "__bytearray__" in exp:
        assert type(got) is bytearray and got == bytearray.fromhex(exp["__bytearray__"]), f"{path}: {got!r}"
        return
    if "__dtype__" in exp:
        assert dtype_object_ok(got, exp["__dtype__"]), f"{path}: dtype object {exp['__dtype__']} -> {got!r}"
        return
    raise AssertionError(f"{path}: unknown expected node {exp}")


def check_sharing(pairs, groups):
    bases = []
    for group in groups:
        members = {p: pairs[p][0].__array_interface__["data"][0]
                   - pairs[p][1]["storage_offset"] * pairs[p][0].itemsize for p in group}
        assert len(set(members.values())) == 1, f"views of one storage do not share a buffer: {members}"
        bases.append(group)
    for i in range(len(bases)):
        for j in range(i + 1, len(bases)):
            for a in bases[i]:
                for b in bases[j]:
                    assert not np.shares_memory(pairs[a][0], pairs[b][0]), f"{a} and {b} share memory"


def check_file(got, name, meta=False):
    spec = FILES[name]
    pairs = {}
    check(got, spec["value"], "", pairs, meta)
    if not meta:
        check_sharing(pairs, spec["sharing"])
    return pairs


def open_input(name, kind, keep):
    path = DATA / name
    off = FILES[name]["offset"]
    if kind == "path":
        return path
    if kind == "str":
        return str(path)
    if kind == "bytes":
        return path.read_bytes()
    if kind == "bytesio":
        b = io.BytesIO(path.read_bytes())
        b.seek(off)
        return b
    if kind == "file":
        f = open(path, "rb")
        keep.append(f)
        f.seek(off)
        return f
    raise ValueError(kind)


CASES = []
for _name, _spec in FILES.items():
    kinds = ["bytesio", "file"] if _spec["offset"] else ["path", "str", "bytes", "bytesio", "file"]
    for _kind in kinds:
        CASES.append((_name, _kind))


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

def test_fixture_inventory():
    assert set(FILES) == {"sd_views.pt", "train_ckpt.pt", "proto4.pt", "sd_views_deflated.pt",
                          "sd_views_bigendian.pt", "with_header.bin"}
    total = sum(p.stat().st_size for p in DATA.iterdir() if p.is_file())
    assert total < 200_000, total
    assert len(ARRAYS) > 40


@pytest.mark.parametrize("name,kind", CASES)
def test_fixture_values(name, kind):
    keep = []
    try:
        got = torchfree.load(open_input(name, kind, keep))  # default weights_only=True
    finally:
        for f in keep:
            f.close()
    pairs = check_file(got, name)
    assert pairs, "no tensors compared"


@pytest.mark.parametrize("name", [n for n, s in FILES.items() if not s["offset"]])
@pytest.mark.parametrize("mmap", [None, True, False])
def test_fixture_mmap_modes(name, mmap, tmp_path):
    if mmap is True and "deflated" in name:
        # compressed records cannot be mapped: a CheckpointError or correct values, never garbage
        try:
            got = torchfree.load(DATA / name, mmap=True)
        except torchfree.CheckpointError:
            return
        check_file(got, name)
        return
    copy = tmp_path / name
    copy.write_bytes((DATA / name).read_bytes())
    sha = hashlib.sha256(copy.read_bytes()).hexdigest()
    got = torchfree.load(copy, mmap=mmap)
    pairs = check_file(got, name)
    for path, (arr, _) in pairs.items():
        assert arr.flags.writeable, f"{path} is read-only"
        arr[...] = np.zeros((), dtype=arr.dtype)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == sha, "writing to arrays changed the file"
    check_file(torchfree.load(copy, mmap=mmap), name)


@pytest.mark.parametrize("name", [n for n, s in FILES.items() if not s["offset"]])
def test_fixture_meta(name):
    got = torchfree.load(DATA / name, map_location="meta")
    check_file(got, name, meta=True)


def test_fixture_weights_only_false_same_values():
    for name, spec in FILES.items():
        if spec["offset"]:
            continue
        check_file(torchfree.load(DATA / name, weights_only=False), name)


def test_train_ckpt_metadata():
    got = torchfree.load(DATA / "train_ckpt.pt")
    sd = got["model_state_dict"]
    assert type(sd) is collections.OrderedDict
    assert sd._metadata[""] == {"version": 1}
    assert got["optimizer_state_dict"]["param_groups"][0]["momentum"] == 0.9
    assert sd["1.num_batches_tracked"].dtype == np.int64 and sd["1.num_batches_tracked"].shape == ()
    assert int(sd["1.num_batches_tracked"]) == 2


def test_sd_views_details():
    got = torchfree.load(DATA / "sd_views.pt")
    assert np.shares_memory(got["x"], got["xt"]) and np.shares_memory(got["row"], got["col"])
    assert got["expand"].strides == (0, 4)
    assert got["c32"].dtype == np.complex64
    assert got["c32"].tolist() == [complex(1, 2), complex(-0.0, float("inf")),
                                   complex(float(np.float16(6e-8)), -65504.0), complex(0.5, -3)]
    assert got["u64"].tolist() == [3, 2 ** 64 - 1]
    assert got["u16_step"].tolist() == [1, 65535, 7]
    np.testing.assert_array_equal(got["c64_conj"], np.conj(got["c64"]))


def test_big_endian_equals_little_endian():
    le = torchfree.load(DATA / "sd_views.pt")
    be = torchfree.load(DATA / "sd_views_bigendian.pt")
    for k, v in le.items():
        if isinstance(v, np.ndarray):
            assert be[k].dtype == v.dtype and np.array_equal(np_bytes(be[k]), np_bytes(v)), k


def test_map_location_callable_on_fixture():
    path = DATA / "sd_views.pt"
    with zipfile.ZipFile(path) as z:
        records = {n.split("/data/", 1)[1]: z.read(n) for n in z.namelist() if "/data/" in n}
    seen = []

    def fn(storage, tag):
        assert isinstance(storage, torchfree.Storage)
        assert tag == "cpu" and storage.location == "cpu"
        assert storage.nbytes == len(records[storage.key])
        assert bytes(memoryview(storage)) == records[storage.key]
        seen.append(storage.key)
        return None

    got = torchfree.load(path, map_location=fn)
    assert sorted(seen) == sorted(records), "one call per storage record"
    check_file(got, "sd_views.pt")


def test_map_location_callable_bad_returns():
    path = DATA / "sd_views.pt"
    with pytest.raises(ValueError):  # a buffer must hold at least storage.nbytes bytes
        torchfree.load(path, map_location=lambda s, tag: bytearray(max(0, s.nbytes - 1)))
    with pytest.raises(TypeError):  # neither None, a Storage nor a buffer
        torchfree.load(path, map_location=lambda s, tag: 3)

    class Mine(Exception):
        pass

    def boom(storage, tag):
        raise Mine("from the callable")

    with pytest.raises(Mine):  # the user's exception propagates unchanged
        torchfree.load(path, map_location=boom)


def test_map_location_type_error():
    with pytest.raises(TypeError):
        torchfree.load(DATA / "sd_views.pt", map_location=5)


@pytest.mark.parametrize("kind", ["bytes", "bytesio"])
def test_mmap_true_needs_path(kind):
    data = (DATA / "sd_views.pt").read_bytes()
    with pytest.raises(ValueError):
        torchfree.load(data if kind == "bytes" else io.BytesIO(data), mmap=True)


# --- errors and hostile pickles (hand-built zips, no torch) -------------------------------

def test_error_hierarchy():
    assert issubclass(torchfree.CheckpointError, ValueError)
    for cls in (torchfree.FormatError, torchfree.UnpicklingError, torchfree.LimitError):
        assert issubclass(cls, torchfree.CheckpointError)
    assert issubclass(torchfree.UnpicklingError, pickle.UnpicklingError)
    assert issubclass(torchfree.UnsafeGlobalError, torchfree.UnpicklingError)


@pytest.mark.parametrize("data", [b"", b"not a checkpoint", b"PK\x03\x04", b"PYTORCH1" + bytes(40)])
def test_not_a_checkpoint(data):
    with pytest.raises(torchfree.FormatError):
        torchfree.load(data)


class Thing:
    def __init__(self):
        self.a = 1
        self.b = [2, 3]


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


def handmade_zip(obj_pickle):
    return ckpt_tools.write_zip([("archive/data.pkl", obj_pickle), ("archive/byteorder", b"little"),
                                 ("archive/version", b"3\n")])


def test_unsafe_global_handmade():
    data = handmade_zip(pickle.dumps({"a": {"b": Thing()}}, protocol=2))
    with pytest.raises(torchfree.UnsafeGlobalError) as ei:
        torchfree.load(data)
    msg = str(ei.value)
    assert f"{Thing.__module__}.Thing" in msg and "a.b" in msg, msg
    got = torchfree.load(data, weights_only=False)
    op = got["a"]["b"]
    assert isinstance(op, torchfree.Opaque)
    assert (op.module, op.name) == (Thing.__module__, "Thing")
    assert op.state == {"a": 1, "b": [2, 3]}
    got = torchfree.load(data, safe_globals=[Thing])
    assert type(got["a"]["b"]) is Thing and got["a"]["b"].b == [2, 3]


def test_reduce_of_os_system_is_never_called(tmp_path):
    Evil.marker = tmp_path / "pwned"
    data = handmade_zip(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(torchfree.UnsafeGlobalError) as ei:
        torchfree.load(data)
    assert "posix.system" in str(ei.value), str(ei.value)
    try:
        got = torchfree.load(data, weights_only=False)
    finally:
        assert not Evil.marker.exists(), "an unknown global was called"
    # API.md: weights_only=False turns unknown globals into inert Opaque placeholders
    assert isinstance(got["x"], torchfree.Opaque)
    assert got["x"].name == "system" and list(got["x"].args) == [f"touch {Evil.marker}"]


def test_legacy_113_fixture():
    """A legacy stream written by torch 1.13 (tests/data/make_legacy_113.py) against the arrays
    torch 1.13 gave when it wrote it; no torch needed."""
    exp = np.load(DATA / "legacy_113.npz")
    for src in (DATA / "legacy_113.pt", (DATA / "legacy_113.pt").read_bytes()):
        got = torchfree.flatten(torchfree.load(src))
        assert sorted(got) == sorted(k.removesuffix(".bits") for k in exp.files)
        for k in exp.files:
            a = got[k.removesuffix(".bits")]
            e = exp[k]
            if k.endswith(".bits"):
                assert a.dtype == ml_dtypes.bfloat16
                a = a.view(np.int16)
            assert a.dtype == e.dtype and a.shape == e.shape, k
            assert a.tobytes() == e.tobytes(), k  # (the .npz holds contiguous copies)
        assert got["f32_t"].strides == (4, 24) and got["f32_col"].strides == (24,)
        assert np.shares_memory(got["f32"], got["f32_t"]) and np.shares_memory(got["f32"], got["f32_tail"])
        assert not np.shares_memory(got["f32"], got["f64"])
    sd = torchfree.load(DATA / "legacy_113.pt")["state_dict"]
    assert list(sd) == ["weight", "bias"] and sd._metadata[""] == {"version": 1}
