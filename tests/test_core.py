"""Torch-free tests of the core: hand-built archives and pickles, limits, hostile input,
leaks, threads and the Storage / Opaque / error surface.

Checkpoints here are built with Python's own zipfile and pickle (plus raw opcodes), so these
tests run where torch is absent (and under the ASan+UBSan build in CI)."""

from __future__ import annotations

import collections
import gc
import io
import os
import pickle
import struct
import sys
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest

import ckpt_tools
import torchfree

# ---- building blocks ------------------------------------------------------------------------


def P(*parts: bytes) -> bytes:
    return b"".join(parts)


PROTO2 = b"\x80\x02"


def unicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def binint(i: int) -> bytes:
    if -(2**31) <= i < 2**31:
        return b"J" + struct.pack("<i", i)
    n = (i.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + i.to_bytes(n, "little", signed=True)  # LONG1


def storage_pid(key: str, numel: int, storage="FloatStorage", location="cpu") -> bytes:
    """('storage', torch.<storage>, key, location, numel) BINPERSID"""
    return P(b"(", unicode("storage"), glob("torch", storage), unicode(key), unicode(location), binint(numel),
             b"tQ")


def tensor_v2(key: str, numel: int, offset: int, size: tuple, stride: tuple, storage="FloatStorage") -> bytes:
    def tup(xs):
        return P(b"(", *[binint(x) for x in xs], b"t")

    return P(glob("torch._utils", "_rebuild_tensor_v2"), b"(", storage_pid(key, numel, storage), binint(offset),
             tup(size), tup(stride), b"\x89", glob("collections", "OrderedDict"), b")R", b"tR")


def archive(pickle_bytes: bytes, records: dict | None = None, prefix="archive", byteorder=b"little",
            compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        z.writestr(f"{prefix}/data.pkl", pickle_bytes)
        if byteorder is not None:
            z.writestr(f"{prefix}/byteorder", byteorder)
        for k, v in (records or {}).items():
            z.writestr(f"{prefix}/data/{k}", v)
        z.writestr(f"{prefix}/version", b"3\n")
    return buf.getvalue()


def ckpt_of(obj_pickle: bytes, records=None, **kw) -> bytes:
    return archive(P(PROTO2, obj_pickle, b"."), records, **kw)


F32 = np.arange(12, dtype=np.float32)
ONE_TENSOR = ckpt_of(P(b"}", unicode("w"), tensor_v2("0", 12, 0, (3, 4), (4, 1)), b"s"), {"0": F32.tobytes()})


# ---- basics -----------------------------------------------------------------------------------


def test_handbuilt_tensor_roundtrip():
    out = torchfree.load(ONE_TENSOR)
    assert list(out) == ["w"]
    np.testing.assert_array_equal(out["w"], F32.reshape(3, 4))
    assert out["w"].strides == (16, 4)


def test_plain_pickle_objects_all_protocols():
    obj = {"a": [1, 2.5, "x", None, True, (1, (2,)), {3}, frozenset([4]), b"\x00\xff", bytearray(b"ab")],
           "big": 2**100, "neg": -(2**70), "c": 1 - 2j, "od": collections.OrderedDict(z=1, a=2),
           "s": slice(1, 9, 2), "r": range(3, 10, 2), "nested": [[[[]]]], "e": {}}
    for proto in range(0, 6):
        data = archive(pickle.dumps(obj, protocol=proto))
        got = torchfree.load(data, weights_only=False)
        assert got == obj, proto
        assert type(got["od"]) is collections.OrderedDict


def test_weights_only_rejects_non_torch_builtins():
    with pytest.raises(torchfree.UnsafeGlobalError, match="builtins.frozenset"):
        torchfree.load(archive(pickle.dumps({"f": frozenset([1])}, protocol=2)))


def test_python2_strings_and_encoding():
    body = P(b"]", b"U\x03abc", b"a", b"T" + struct.pack("<i", 2) + b"\xc3\xa9", b"a")
    data = ckpt_of(body)
    assert torchfree.load(data) == ["abc", "é"]
    assert torchfree.load(data, encoding="bytes") == [b"abc", b"\xc3\xa9"]
    assert torchfree.load(data, encoding="latin1") == ["abc", "Ã©"]


def test_ordered_dict_metadata_kept():
    sd = collections.OrderedDict(w=1)
    sd._metadata = collections.OrderedDict({"": {"version": 1}})
    got = torchfree.load(archive(pickle.dumps(sd, protocol=2)))
    assert got == sd and got._metadata == sd._metadata


def test_numpy_objects_under_weights_only():
    obj = {"arr": np.arange(6, dtype=">i4").reshape(2, 3), "f": np.asfortranarray(np.ones((2, 3))),
           "scalar": np.float64(2.5), "dt": np.dtype("<u2"), "empty": np.zeros((0, 2), np.int8)}
    got = torchfree.load(archive(pickle.dumps(obj, protocol=2)))
    for k in ("arr", "f", "empty"):
        np.testing.assert_array_equal(got[k], obj[k])
        assert got[k].dtype == obj[k].dtype
    assert got["scalar"] == 2.5 and type(got["scalar"]) is np.float64
    assert got["dt"] == np.dtype("<u2")


def test_numpy_object_arrays_refused():
    data = archive(pickle.dumps({"o": np.array([1, "x"], dtype=object)}, protocol=2))
    with pytest.raises(torchfree.UnpicklingError):
        torchfree.load(data)


def test_namespace():
    import argparse

    ns = argparse.Namespace(lr=0.1, name="x")
    assert torchfree.load(archive(pickle.dumps({"args": ns}, protocol=2)))["args"] == ns


# ---- Opaque and safe_globals -------------------------------------------------------------------


class Thing:
    def __init__(self, a):
        self.a = a


def test_opaque_and_safe_globals():
    data = archive(pickle.dumps({"t": Thing(3)}, protocol=2))
    with pytest.raises(torchfree.UnsafeGlobalError) as ei:
        torchfree.load(data)
    assert f"{__name__}.Thing" in str(ei.value) and "'t'" in str(ei.value)
    o = torchfree.load(data, weights_only=False)["t"]
    assert isinstance(o, torchfree.Opaque)
    assert (o.module, o.name, o.state) == (__name__, "Thing", {"a": 3})
    t = torchfree.load(data, safe_globals=[Thing])["t"]
    assert type(t) is Thing and t.a == 3
    t = torchfree.load(data, safe_globals={f"{__name__}.Thing": Thing})["t"]
    assert type(t) is Thing and t.a == 3


def test_blocked_modules_even_when_trusted(tmp_path):
    canary = tmp_path / "canary"
    body = P(glob("os", "system"), b"(", unicode(f"touch {canary}"), b"tR")
    with pytest.raises(torchfree.UnsafeGlobalError):
        torchfree.load(ckpt_of(body), safe_globals={"os.system": os.system})
    got = torchfree.load(ckpt_of(body), weights_only=False, safe_globals={"os.system": os.system})
    assert isinstance(got, torchfree.Opaque) and got.qualname == "os.system"
    assert not canary.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"),
                                         ("builtins", "__import__"), ("subprocess", "Popen"),
                                         ("torch", "load"), ("posix", "system")])
def test_dangerous_globals_never_run(tmp_path, module, name):
    canary = tmp_path / "canary"
    payload = f"open({str(canary)!r}, 'w')"
    body = P(glob(module, name), b"(", unicode(payload), b"tR")
    with pytest.raises(torchfree.UnsafeGlobalError):
        torchfree.load(ckpt_of(body))
    # weights_only=False: an inert Opaque, never a call
    got = torchfree.load(ckpt_of(body), weights_only=False)
    assert isinstance(got, torchfree.Opaque) and got.args == (payload,) and got.qualname == f"{module}.{name}"
    # also via STACK_GLOBAL and INST
    sg = P(unicode(module), unicode(name), b"\x93", b"(", unicode(payload), b"tR")
    with pytest.raises(torchfree.UnsafeGlobalError):
        torchfree.load(ckpt_of(sg))
    inst = P(b"(", unicode(payload), b"i" + module.encode() + b"\n" + name.encode() + b"\n")
    with pytest.raises(torchfree.UnsafeGlobalError):
        torchfree.load(ckpt_of(inst))
    assert not canary.exists()


# ---- errors on hostile input ---------------------------------------------------------------------


@pytest.mark.parametrize("body,exc,match", [
    (b"q\x05", torchfree.UnpicklingError, "stack underflow"),
    (P(b"N", b"q\x40"), torchfree.UnpicklingError, "sparse"),
    (P(b"N", b"r" + struct.pack("<I", 2**31)), torchfree.UnpicklingError, "sparse"),
    (b"h\x00", torchfree.UnpicklingError, "memo slot 0 is not set"),
    (b"X" + struct.pack("<I", 2**31), torchfree.UnpicklingError, "truncated"),
    (b"\x8d" + struct.pack("<Q", 2**62), torchfree.UnpicklingError, "truncated"),
    (b"\x8e" + struct.pack("<Q", 2**63), torchfree.UnpicklingError, "truncated"),
    (P(b"N", b"s"), torchfree.UnpicklingError, "underflow"),
    (P(b"]", b"N", b"N", b"s"), torchfree.UnpicklingError, "SETITEM on a list"),
    (P(b"}", b"N", b"a"), torchfree.UnpicklingError, "APPEND on a dict"),
    (P(b"N", b")R"), torchfree.UnpicklingError, "not a global"),
    (P(b"N", b"(", b"Q"), torchfree.UnpicklingError, "underflow|persistent id"),
    (P(binint(1), b"Q"), torchfree.UnpicklingError, "persistent id"),
    (P(b"\x82\x01"), torchfree.UnsafeGlobalError, "extension registry"),
    (b"\xff", torchfree.UnpicklingError, "invalid pickle opcode 255"),
    (P(b"]", b"}", b"a", b"(", b"]", b"u"), torchfree.UnpicklingError, "SETITEMS with an odd|SETITEM"),
    # REDUCE of OrderedDict with arguments that are not a tuple (the fused tensor path must look
    # at the arguments' type first: found by the ASan mutation loop)
    (b"ccollections\nOrderedDict\nNR", torchfree.UnpicklingError, "not a tuple"),
])
def test_bad_pickles(body, exc, match):
    with pytest.raises(exc, match=match) as ei:
        torchfree.load(ckpt_of(body))
    assert "byte offset" in str(ei.value)


def test_trailing_bytes_and_missing_stop():
    with pytest.raises(torchfree.UnpicklingError, match="after the STOP"):
        torchfree.load(archive(P(PROTO2, b"N.", b"N")))
    with pytest.raises(torchfree.UnpicklingError, match="no STOP"):
        torchfree.load(archive(P(PROTO2, b"N")))


@pytest.mark.parametrize("desc,body,records,match", [
    ("missing record", tensor_v2("0", 12, 0, (3, 4), (4, 1)), {}, "record data/0 is missing"),
    ("size mismatch", tensor_v2("0", 12, 0, (3, 4), (4, 1)), {"0": b"\0" * 44}, "has 44 bytes but"),
    ("10^18 elements", tensor_v2("0", 10**18, 0, (3,), (1,)), {"0": b"\0" * 48}, "has 48 bytes but"),
    ("numel overflow", tensor_v2("0", 2**62, 0, (3,), (1,), "DoubleStorage"), {"0": b""}, "impossible numel"),
    ("past the end", tensor_v2("0", 12, 1, (3, 4), (4, 1)), {"0": F32.tobytes()}, "past the end"),
    ("stride overflow", tensor_v2("0", 12, 0, (2, 2), (2**62, 1)), {"0": F32.tobytes()}, "overflows|past the end"),
    ("negative stride", tensor_v2("0", 12, 0, (3,), (-1,)), {"0": F32.tobytes()}, "out of range"),
])
def test_bad_tensors(desc, body, records, match):
    with pytest.raises(torchfree.CheckpointError, match=match):
        torchfree.load(ckpt_of(P(b"}", unicode("layer.w"), body, b"s"), records))


def test_empty_tensor_offset_past_its_storage():
    """torch.zeros(4, 0, 4)[1:] has offset 4 in a 0-byte storage: torch loads it, and so do we."""
    body = P(b"}", unicode("e"), tensor_v2("0", 0, 4, (3, 0, 4), (4, 4, 1)), unicode("f"),
             tensor_v2("1", 12, 10**6, (0,), (1,)), b"s")  # noqa: E501
    got = torchfree.load(ckpt_of(P(b"}", b"(", body[1:-1], b"u"), {"0": b"", "1": F32.tobytes()}))
    assert got["e"].shape == (3, 0, 4) and got["f"].shape == (0,)
    assert torchfree.scan(ckpt_of(P(b"}", b"(", body[1:-1], b"u"), {"0": b"", "1": F32.tobytes()}))["e"].storage_offset == 4


def test_conflicting_storage_sizes():
    body = P(b"(", tensor_v2("0", 12, 0, (3,), (1,)), tensor_v2("0", 6, 0, (3,), (1,)), b"l")
    with pytest.raises(torchfree.FormatError, match="conflicting sizes"):
        torchfree.load(ckpt_of(body, {"0": F32.tobytes()}))


def test_key_path_in_messages():
    bad = tensor_v2("0", 12, 1, (3, 4), (4, 1))
    body = P(b"}", b"(", unicode("epoch"), binint(1), unicode("model_state_dict"), b"}", b"(",
             unicode("fc1.bias"), tensor_v2("0", 12, 0, (3,), (1,)), unicode("fc1.weight"), bad, b"u", b"u")
    with pytest.raises(torchfree.FormatError) as ei:
        torchfree.load(ckpt_of(body, {"0": F32.tobytes()}))
    assert "model_state_dict.fc1.weight" in str(ei.value)


@pytest.mark.parametrize("data,match", [
    (b"", "empty|too short"),
    (b"PK\x03\x04" + b"\0" * 100, None),
    (archive(b"\x80\x02N.")[:-30], None),
    (archive(b"\x80\x02N.", prefix="a").replace(b"a/version", b"a/versioX"), "version"),
])
def test_bad_containers(data, match):
    with pytest.raises(torchfree.FormatError, match=match):
        torchfree.load(data)


def test_version_and_byteorder_records():
    ok = archive(b"\x80\x02N.", byteorder=None)
    assert torchfree.load(ok) is None
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02N.")
        z.writestr("archive/version", b"11\n")
    with pytest.raises(torchfree.FormatError, match="maximum supported version"):
        torchfree.load(buf.getvalue())
    with pytest.raises(torchfree.FormatError, match="byteorder"):
        torchfree.load(archive(b"\x80\x02N.", byteorder=b"middle"))


def test_big_endian_record():
    be = np.arange(12, dtype=">f4").tobytes()
    out = torchfree.load(ckpt_of(P(b"}", unicode("w"), tensor_v2("0", 12, 0, (3, 4), (4, 1)), b"s"),
                                 {"0": be}, byteorder=b"big"))
    np.testing.assert_array_equal(out["w"], F32.reshape(3, 4))
    assert out["w"].dtype == np.dtype("float32")  # native order


def test_prefix_from_first_entry_any_name():
    data = ckpt_of(P(b"}", unicode("w"), tensor_v2("0", 12, 0, (3, 4), (4, 1)), b"s"), {"0": F32.tobytes()},
                   prefix="some.dir")
    np.testing.assert_array_equal(torchfree.load(data)["w"], F32.reshape(3, 4))


# ---- limits: at the limit passes, one past fails ----------------------------------------------------


def nested_lists(depth: int) -> bytes:
    return P(PROTO2, b"(" * depth, b"]", b"l" * depth, b".")


def test_limits_exposed():
    assert set(torchfree.LIMITS) == {"pickle_bytes", "memo", "stack", "marks", "records", "name", "ndim",
                                     "total_bytes"}
    with pytest.raises(TypeError, match="unknown limits"):
        torchfree.load(ONE_TENSOR, limits={"nope": 1})


def test_limit_marks():
    data = archive(nested_lists(100))
    torchfree.load(data, limits={"marks": 100})
    with pytest.raises(torchfree.LimitError, match="MARK"):
        torchfree.load(data, limits={"marks": 99})


def test_limit_stack():
    data = archive(P(PROTO2, b"N" * 50, b"(" + b"t", b"0" * 50, b"."))
    torchfree.load(data, limits={"stack": 51})
    with pytest.raises(torchfree.LimitError, match="stack"):
        torchfree.load(data, limits={"stack": 50})


def test_limit_memo():
    data = archive(P(PROTO2, b"]", b"\x94" * 10, b"."))
    torchfree.load(data, limits={"memo": 10})
    with pytest.raises(torchfree.LimitError, match="memo"):
        torchfree.load(data, limits={"memo": 9})


def test_limit_pickle_bytes():
    body = P(PROTO2, b"N.")
    torchfree.load(archive(body), limits={"pickle_bytes": len(body)})
    with pytest.raises(torchfree.LimitError, match="data.pkl"):
        torchfree.load(archive(body), limits={"pickle_bytes": len(body) - 1})


def test_limit_ndim():
    body = P(b"}", unicode("w"), tensor_v2("0", 1, 0, (1,) * 5, (1,) * 5), b"s")
    data = ckpt_of(body, {"0": b"\0" * 4})
    assert torchfree.load(data, limits={"ndim": 5})["w"].shape == (1,) * 5
    with pytest.raises(torchfree.LimitError, match="dimensions"):
        torchfree.load(data, limits={"ndim": 4})


def test_limit_total_bytes():
    data = ckpt_of(P(b"}", unicode("w"), tensor_v2("0", 12, 0, (3, 4), (4, 1)), b"s"), {"0": F32.tobytes()})
    torchfree.load(data, limits={"total_bytes": 48})  # bytes input: storages are copied
    with pytest.raises(torchfree.LimitError, match="limit of 47 bytes"):
        torchfree.load(data, limits={"total_bytes": 47})


def test_limit_records_and_name():
    records = {str(i): b"" for i in range(10)}
    data = archive(P(PROTO2, b"N."), records)  # data.pkl, byteorder, 10 records, version
    torchfree.load(data, limits={"records": 13})
    with pytest.raises(torchfree.LimitError):
        torchfree.load(data, limits={"records": 12})
    torchfree.load(data, limits={"name": len("archive/byteorder")})
    with pytest.raises(torchfree.LimitError):
        torchfree.load(data, limits={"name": len("archive/byteorder") - 1})


# ---- Storage, map_location, mmap -------------------------------------------------------------------


def test_storage_object_and_callable_map_location(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(ONE_TENSOR)
    seen = []

    def fn(storage, tag):
        seen.append((storage.key, storage.location, storage.nbytes, storage.dtype, tag))
        assert bytes(storage) == F32.tobytes()
        np.testing.assert_array_equal(storage.numpy(), np.frombuffer(F32.tobytes(), np.uint8))
        return None

    out = torchfree.load(path, map_location=fn)
    assert seen == [("0", "cpu", 48, np.dtype("float32"), "cpu")]
    np.testing.assert_array_equal(out["w"], F32.reshape(3, 4))
    repl = bytearray(np.full(12, 7, np.float32).tobytes())
    out = torchfree.load(path, map_location=lambda s, t: repl)
    assert (out["w"] == 7).all() and np.shares_memory(out["w"], np.frombuffer(repl, np.uint8))
    with pytest.raises(ValueError, match="12 bytes|bytes for record"):
        torchfree.load(path, map_location=lambda s, t: bytearray(12))
    with pytest.raises(TypeError):
        torchfree.load(path, map_location=lambda s, t: 5)
    with pytest.raises(TypeError):
        torchfree.load(path, map_location=5)


def test_map_location_dict_and_meta(tmp_path):
    data = ckpt_of(P(b"}", unicode("w"), b"(", unicode("storage"), glob("torch", "FloatStorage"), unicode("0"),
                     unicode("cuda:0"), binint(12), b"tQ", b"s"), {"0": F32.tobytes()})
    # a bare storage: the callable sees the saved tag; dicts and strings retarget it
    tags = []
    st = torchfree.load(data, map_location=lambda s, t: tags.append((t, s.location)))["w"]
    assert tags == [("cuda:0", "cuda:0")] and isinstance(st, torchfree.Storage)
    assert torchfree.load(data)["w"].location == "cuda:0"
    assert torchfree.load(data, map_location={"cuda:0": "cpu"})["w"].location == "cpu"
    assert torchfree.load(data, map_location="cpu")["w"].location == "cpu"
    body = P(b"}", unicode("w"), tensor_v2("0", 12, 0, (3, 4), (4, 1)), b"s")
    data = ckpt_of(body, {"0": F32.tobytes()})
    m = torchfree.load(data, map_location={"cpu": "meta"})["w"]
    assert isinstance(m, torchfree.MetaArray) and m.shape == (3, 4) and m.dtype == np.float32
    assert isinstance(torchfree.load(data, map_location="meta")["w"], torchfree.MetaArray)
    assert isinstance(torchfree.load(data, map_location={"cuda:0": "meta"})["w"], np.ndarray)


def test_mmap_modes(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(ONE_TENSOR)
    for mm in (None, True, False):
        w = torchfree.load(path, mmap=mm)["w"]
        assert w.flags.writeable
        w[:] = -1
        assert path.read_bytes() == ONE_TENSOR, mm  # private: never written back
    with pytest.raises(ValueError, match="file path"):
        torchfree.load(ONE_TENSOR, mmap=True)
    deflated = tmp_path / "d.pt"
    deflated.write_bytes(ckpt_of(P(b"}", unicode("w"), tensor_v2("0", 12, 0, (3, 4), (4, 1)), b"s"),
                                 {"0": F32.tobytes()}, compression=zipfile.ZIP_DEFLATED))
    np.testing.assert_array_equal(torchfree.load(deflated)["w"], F32.reshape(3, 4))
    np.testing.assert_array_equal(torchfree.load(deflated, mmap=False)["w"], F32.reshape(3, 4))
    with pytest.raises(torchfree.FormatError, match="cannot be memory-mapped"):
        torchfree.load(deflated, mmap=True)


def test_copy_load_read_in_batches(tmp_path):
    """mmap=False reads records in batches on a thread of their own while unpickling goes on
    (src/storage.c): many storages and several MB, shared ones, one a callable needs at once,
    a file cut short (an error, never a crash) and a failed load (the batch is waited for)."""
    rng = np.random.default_rng(5)
    sd = {f"t{i}": rng.standard_normal(int(rng.integers(1, 3000)), np.float32) for i in range(6000)}
    sd["big"] = rng.standard_normal(3_000_000, np.float32)  # 12 MB: a batch of its own, in pieces
    sd["view"] = sd["t7"][1:]
    path = tmp_path / "many.pt"
    torchfree.save(sd, path)
    exp = torchfree.load(path, mmap=True)
    got = torchfree.load(path, mmap=False)
    assert list(got) == list(exp)
    for k in exp:
        assert got[k].tobytes() == exp[k].tobytes(), k
    assert np.shares_memory(got["view"], got["t7"])

    def peeker(seen):
        def peek(storage, loc):  # the callable sees each storage's bytes
            seen[storage.key] = bytes(memoryview(storage)[:8])
        return peek

    seen_copy, seen_map = {}, {}
    got = torchfree.load(path, mmap=False, map_location=peeker(seen_copy))
    torchfree.load(path, mmap=True, map_location=peeker(seen_map))
    assert seen_copy == seen_map and len(seen_copy) == len(sd) - 1
    assert got["t5"].tobytes() == exp["t5"].tobytes()
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data)
    with open(cut, "r+b") as f:  # the records of the middle sixth are zeros (a local header fails)
        f.seek(len(data) // 3)
        f.write(b"\0" * (len(data) // 6))
    for _ in range(3):  # fails half way, a batch in flight: waited for before the storages go
        with pytest.raises((torchfree.CheckpointError, OSError)):
            torchfree.load(cut, mmap=False)
    with pytest.raises(ZeroDivisionError):
        torchfree.load(path, mmap=False, map_location=lambda s, loc: 1 / 0 if s.key == "5000" else None)


def test_file_object_with_header_and_nonseekable(tmp_path):
    f = io.BytesIO(b"header" + ONE_TENSOR)
    f.seek(6)
    np.testing.assert_array_equal(torchfree.load(f)["w"], F32.reshape(3, 4))
    np.testing.assert_array_equal(torchfree.load(ckpt_tools.NonSeekable(ONE_TENSOR))["w"], F32.reshape(3, 4))
    # a zip preceded by bytes inside one buffer: found from the end records
    np.testing.assert_array_equal(torchfree.load(memoryview(ONE_TENSOR))["w"], F32.reshape(3, 4))


def test_arrays_keep_mapping_alive(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(ONE_TENSOR)
    w = torchfree.load(path)["w"]
    gc.collect()
    os.unlink(path)
    np.testing.assert_array_equal(w, F32.reshape(3, 4))


# ---- leaks and threads --------------------------------------------------------------------------------


def test_no_leaks_across_many_loads(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(ONE_TENSOR)
    bad = ckpt_of(P(b"}", unicode("w"), tensor_v2("0", 12, 1, (3, 4), (4, 1)), b"s"), {"0": F32.tobytes()})

    def work():
        for mm in (None, False):
            torchfree.load(path, mmap=mm)
        torchfree.load(ONE_TENSOR, map_location=lambda s, t: None)
        torchfree.load(ONE_TENSOR, map_location="meta")
        with pytest.raises(torchfree.FormatError):
            torchfree.load(bad)

    for _ in range(50):
        work()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(300):
        work()
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if s.size_diff > 0)
    assert grown < 64 * 1024, f"memory grew by {grown} bytes over 300 rounds"
    if hasattr(sys, "gettotalrefcount"):  # debug builds of CPython
        r0 = sys.gettotalrefcount()
        for _ in range(100):
            work()
        assert sys.gettotalrefcount() - r0 < 100


def test_concurrent_loads(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(ONE_TENSOR)
    errors = []

    def run():
        try:
            for i in range(200):
                out = torchfree.load(path, mmap=(None, False)[i % 2])
                assert out["w"][2, 3] == 11
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
