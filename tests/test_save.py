"""torchfree.save: files that torch.load reads back, byte-identical to torch.save's.

* Torch-free tests: the pickle equals CPython's own protocol-2 pickle for plain objects, the
  zip structure (order, alignment, CRCs, zip64 end records), sharing and layouts read back by
  torchfree.load, errors with key paths, file objects, atomic replacement.
* Oracle tests (torch 2.13): torch.load(weights_only=True, and mmap=True, and with the
  computed-offset mmap path) reads every file we write with identical values, dtypes,
  shapes, strides and sharing; for the same objects torch.save writes the same bytes.
* torch 1.13 (Debian's python3-torch, run in a subprocess with /usr/bin/python3) reads our
  zip and legacy files.
* A hypothesis property test: random nested objects of arrays and views -> save -> load.
"""

from __future__ import annotations

import collections
import errno
import io
import os
import pickle
import stat
import struct
import subprocess
import sys
import warnings
import zipfile

import ml_dtypes
import numpy as np
import pytest

import torchfree
from conftest import assert_same

PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(torchfree.__file__)))

# numpy dtypes that map to a torch dtype (numpy arrays are written as their numpy dtype)
NP_DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.complex128, np.complex64, np.int64,
             np.int32, np.int16, np.int8, np.uint8, np.bool_, np.uint16, np.uint32, np.uint64,
             ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fnuz,
             ml_dtypes.float8_e5m2fnuz, ml_dtypes.float8_e8m0fnu]
# the 17 legacy (v2) storage dtypes numpy can hold; torch 1.x knows them all
V2_NAMES = {"float64", "float32", "float16", "bfloat16", "complex128", "complex64", "int64", "int32",
            "int16", "int8", "uint8", "bool"}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def save_bytes(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torchfree.save(obj, buf, **kw)
    return buf.getvalue()


def data_pkl(data: bytes, prefix="archive") -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return z.read(f"{prefix}/data.pkl")


def random_array(dtype, shape, seed=0):
    """Random bit patterns of dtype (valid 0/1 for bool)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) if shape else 1
    if dt == np.bool_:
        return (rng.integers(0, 2, n) == 1).reshape(shape)
    raw = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def _owner(a):
    """The object whose memory an array views (as save groups arrays)."""
    o = a
    while True:
        if isinstance(o, np.ndarray):
            if o.flags.owndata or o.base is None:
                return o
            o = o.base
        elif isinstance(o, memoryview):
            if o.obj is None:
                return o
            o = o.obj
        else:
            return o


def _addr(a):
    return a.__array_interface__["data"][0]


def _extent(a):
    """(first byte, one past the last byte) of a non-negative-strided array."""
    lo = _addr(a)
    if a.size == 0:
        return lo, lo
    return lo, lo + sum((n - 1) * s for n, s in zip(a.shape, a.strides)) + a.itemsize


def _u8_over(owner, lo, hi):
    """A uint8 array over [lo, hi) of owner's memory, sharing it."""
    if isinstance(owner, np.ndarray):
        flat = owner.reshape(-1, order="A") if owner.size else owner.reshape(0)
        base = flat.view(np.uint8) if flat.size else np.zeros(0, np.uint8)
        start = _addr(owner)
        if not owner.flags.c_contiguous and not owner.flags.f_contiguous:
            raise ValueError("owner must be contiguous")
    else:
        base = np.frombuffer(owner, dtype=np.uint8)
        start = _addr(base)
    return base[lo - start: hi - start]


def to_torch(obj, memo=None):
    """The torch object torch.save would need to write what torchfree.save writes for obj:
    tensors viewing one storage per base buffer (the whole torchfree.Storage, or the span of
    any other owner covered by its arrays), same containers, same key objects."""
    import torch

    if memo is None:
        memo = {}
        arrays = []
        _collect_arrays(obj, arrays, set())
        groups = collections.OrderedDict()
        for a in arrays:
            groups.setdefault(id(_owner(a)), (_owner(a), []))[1].append(a)
        for owner, members in groups.values():
            if isinstance(owner, torchfree.Storage):
                base = np.frombuffer(owner, dtype=np.uint8) if owner.nbytes else np.zeros(0, np.uint8)
                lo = _addr(base) if owner.nbytes else 0
                hi = lo + owner.nbytes
            else:
                lo = min(_addr(a) for a in members)
                hi = max(_extent(a)[1] for a in members)
                base = _u8_over(owner, lo, hi)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tb = torch.from_numpy(base) if base.size else torch.zeros(0, dtype=torch.uint8)
            tdt = getattr(torch, members[0].dtype.name)
            tt = tb.view(tdt)
            for a in members:
                memo[id(a)] = tt.as_strided(a.shape, [s // a.itemsize for s in a.strides],
                                            (_addr(a) - lo) // a.itemsize if base.size else 0)
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, np.ndarray):
        raise AssertionError("uncollected array")
    if type(obj) is collections.OrderedDict:
        out = collections.OrderedDict()
        memo[id(obj)] = out
        for k, v in obj.items():
            out[k] = to_torch(v, memo)
        for k, v in vars(obj).items():
            setattr(out, k, to_torch(v, memo))
        return out
    if type(obj) is dict:
        out = {}
        memo[id(obj)] = out
        for k, v in obj.items():
            out[k] = to_torch(v, memo)
        return out
    if type(obj) is list:
        out = []
        memo[id(obj)] = out
        out.extend(to_torch(v, memo) for v in obj)
        return out
    if type(obj) is tuple:
        out = tuple(to_torch(v, memo) for v in obj)
        memo[id(obj)] = out
        return out
    if isinstance(obj, np.dtype):
        return getattr(torch, obj.name)
    if isinstance(obj, torchfree.MetaArray):
        t = torch.empty(obj.shape, dtype=getattr(torch, np.dtype(obj.dtype).name), device="meta")
        memo[id(obj)] = t
        return t
    return obj


def _collect_arrays(obj, out, seen):
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_arrays(v, out, seen)
        if type(obj) is collections.OrderedDict:
            for v in vars(obj).values():
                _collect_arrays(v, out, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_arrays(v, out, seen)


def assert_same_file(a, b):
    A = open(a, "rb").read()
    B = open(b, "rb").read()
    if A == B:
        return
    first = next((i for i in range(min(len(A), len(B))) if A[i] != B[i]), min(len(A), len(B)))
    names_a = [(i.filename, i.header_offset, i.file_size, i.CRC) for i in zipfile.ZipFile(a).infolist()]
    names_b = [(i.filename, i.header_offset, i.file_size, i.CRC) for i in zipfile.ZipFile(b).infolist()]
    raise AssertionError(f"files differ at byte {first} (sizes {len(A)}, {len(B)})\n{names_a}\n{names_b}")


def torch_identical(torch, tmp_path, obj, stem="ckpt", ext=".pt"):
    """torch.save(to_torch(obj)) and torchfree.save(obj) to paths with the same name: equal bytes.
    Returns our path."""
    (tmp_path / "torch").mkdir(exist_ok=True)
    (tmp_path / "ours").mkdir(exist_ok=True)
    pa, pb = tmp_path / "torch" / (stem + ext), tmp_path / "ours" / (stem + ext)
    torch.save(to_torch(obj), pa)
    torchfree.save(obj, pb)
    assert_same_file(pa, pb)
    return pb


def load_all_ways(torch, path, obj, *, mmap=True):
    """torch.load(weights_only=True) (plain, mmap, computed offsets) equals obj."""
    got = torch.load(path, weights_only=True)
    assert_same(obj, got)
    if mmap:
        assert_same(obj, torch.load(path, weights_only=True, mmap=True))
        from torch.utils.serialization import config
        old = config.load.calculate_storage_offsets
        config.load.calculate_storage_offsets = True
        os.environ["TORCH_SERIALIZATION_DEBUG"] = "1"  # torch cross-checks every computed offset
        try:
            assert_same(obj, torch.load(path, weights_only=True, mmap=True))
        finally:
            config.load.calculate_storage_offsets = old
            del os.environ["TORCH_SERIALIZATION_DEBUG"]
    return got


def views_of(x):
    return {"base": x, "t": x.T, "row": x[1], "col": x[:, 2], "block": x[1:, 1:3], "step": x[:, ::2],
            "elem0d": x[1, 2, ...], "emptyview": x[:0], "expand": np.broadcast_to(x[0:1], (5, x.shape[1])),
            "flat": x.reshape(-1)}


# ---------------------------------------------------------------------------------------------
# torch-free: the pickle, the zip, sharing through torchfree.load
# ---------------------------------------------------------------------------------------------

PLAIN_OBJECTS = [
    None, True, False, 0, 1, 255, 256, 65535, 65536, -1, -(2 ** 31), 2 ** 31 - 1, 2 ** 31, -(2 ** 31) - 1,
    2 ** 63, -(2 ** 63), 2 ** 64, -(2 ** 64), 7 ** 300, -(2 ** 2039), 1.5, -0.0, float("nan"),
    float("inf"), "", "abc", "é日本\U0001F600", "lone \ud800 surrogate", b"ab", b"a", b"\x00\xff" * 300,
    bytearray(b"xy"), bytearray(), bytearray(b"z"), 1 + 2j, complex(0, -0.0),
    [1, 2, 3], list(range(1000)), list(range(1001)), list(range(2000)), [[]], {}, {1: 2},
    {i: i for i in range(1000)}, {i: str(i) for i in range(2500)}, {"a": [1, "a", "a"]},
    (), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), {1, 2, "x", (3, 4)}, collections.Counter("hello"),
    collections.OrderedDict(), collections.OrderedDict(a=1), collections.OrderedDict((str(i), i) for i in range(2001)),
    {"nested": {"deep": [{"x": (1, [2, {3: None}])}]}},
]


def _shared_objects():
    s = "shared"
    t = (1, 2)
    lst = [1]
    lst.append(lst)
    d = {}
    d["self"] = d
    od = collections.OrderedDict(z=1, a=2)
    od.move_to_end("z")
    od.note = {"k": [1, 2]}
    return [[s, s, (s,), {s: s}], [t, t, [t]], lst, d, od]


@pytest.mark.parametrize("obj", PLAIN_OBJECTS + _shared_objects(), ids=lambda o: type(o).__name__)
def test_pickle_equals_cpython_protocol2(obj):
    """Without arrays, data.pkl is exactly what CPython's pickle writes (torch.save uses it)."""
    assert data_pkl(save_bytes(obj)) == pickle.dumps(obj, protocol=2)


def test_empty_bytes_use_codecs_encode():
    """pickle writes b'' as builtins.bytes(), which torch's weights-only unpickler refuses;
    we write _codecs.encode('', 'latin1') like every other bytes object."""
    pk = data_pkl(save_bytes({"b": b""}))
    assert b"_codecs\nencode" in pk and b"__builtin__\nbytes" not in pk
    assert torchfree.load(save_bytes({"b": b""})) == {"b": b""}


def test_zip_structure():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    obj = {"x": x, "row": x[1], "e": np.zeros(0, np.int64), "u16": np.arange(3, dtype=np.uint16),
           "s": np.array(2.5)}
    data = save_bytes(obj)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None  # real CRC-32s
        infos = z.infolist()
        names = [i.filename for i in infos]
        assert names == ["archive/data.pkl", "archive/.format_version", "archive/.storage_alignment",
                         "archive/byteorder", "archive/data/0", "archive/data/1", "archive/data/2",
                         "archive/data/3", "archive/version", "archive/.data/serialization_id"]
        assert z.read("archive/.format_version") == b"1"
        assert z.read("archive/.storage_alignment") == b"64"
        assert z.read("archive/byteorder") == b"little"
        assert z.read("archive/version") == b"3\n"
        sid = z.read("archive/.data/serialization_id")
        assert len(sid) == 40 and sid.isdigit()
        for i in infos:
            assert i.compress_type == zipfile.ZIP_STORED and i.date_time == (1980, 0, 0, 0, 0, 0)
            name_len, extra_len = struct.unpack("<HH", data[i.header_offset + 26: i.header_offset + 30])
            start = i.header_offset + 30 + name_len + extra_len
            assert start % 64 == 0, i.filename  # 64-byte alignment through the FB extra field
            assert data[i.header_offset + 30 + name_len: i.header_offset + 32 + name_len] == b"FB"
            assert i.flag_bits == (0x0800 if i.file_size == 0 else 0x0808)
            if i.file_size:  # data descriptor after the data
                assert data[start + i.file_size: start + i.file_size + 4] == b"PK\x07\x08"
        assert z.read("archive/data/0") == x.tobytes()
        assert z.read("archive/data/1") == b""
    # zip64 end record and locator always, then the classic end record
    assert data[-22:-18] == b"PK\x05\x06" and data[-42:-38] == b"PK\x06\x07" and data[-98:-94] == b"PK\x06\x06"


def test_roundtrip_sharing_and_layouts():
    x = np.arange(24, dtype=np.float64).reshape(4, 6)
    v = views_of(x)
    v["other"] = np.arange(5, dtype=np.int32)
    v["neg"] = x[::-1]  # written contiguous
    got = torchfree.load(save_bytes(v))
    for k, a in v.items():
        np.testing.assert_array_equal(got[k], a)
        assert got[k].dtype == a.dtype and got[k].shape == a.shape
        if k != "neg":
            assert got[k].strides == a.strides, k
    base = got["base"].base
    for k in ("t", "row", "col", "block", "step", "elem0d", "emptyview", "expand", "flat"):
        assert got[k].base is base, k  # one storage record
    assert got["neg"].base is not base and got["neg"].flags.c_contiguous
    assert got["other"].base is not base


def test_span_of_a_base_and_offsets():
    """A base that is not saved itself: the record is the span its views cover."""
    x = np.arange(100, dtype=np.int16)
    obj = {"a": x[10:20], "b": x[15:40:5]}
    data = save_bytes(obj)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.read("archive/data/0") == x[10:36].tobytes()
    got = torchfree.load(data)
    np.testing.assert_array_equal(got["a"], x[10:20])
    np.testing.assert_array_equal(got["b"], x[15:40:5])
    assert got["a"].base is got["b"].base


def test_load_save_roundtrip_keeps_whole_storages(tmp_path):
    """Arrays from torchfree.load view a torchfree.Storage: it is written whole, as torch did."""
    x = np.arange(10, dtype=np.float32)
    first = save_bytes({"x": x})
    loaded = torchfree.load(first)
    assert save_bytes({"only_a_slice": loaded["x"][2:4]}) != save_bytes({"only_a_slice": x[2:4]})
    again = torchfree.load(save_bytes({"only_a_slice": loaded["x"][2:4]}))
    assert again["only_a_slice"].base.nbytes == 40
    # and the same object saved again gives the same bytes
    assert save_bytes(loaded) == first
    p = tmp_path / "m.pt"
    torchfree.save(loaded, p)
    assert save_bytes(torchfree.load(p, mmap=False), ) == first


@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_roundtrip(dtype):
    x = random_array(dtype, (3, 4), seed=1)
    obj = views_of(x)
    obj["own0d"] = random_array(dtype, (), seed=2)
    obj["ownempty"] = random_array(dtype, (0, 2), seed=3)
    got = torchfree.load(save_bytes(obj))
    for k, a in obj.items():
        assert got[k].dtype == np.dtype(dtype), k
        assert got[k].tobytes() == a.tobytes(), k
        assert got[k].strides == a.strides, k


def test_byte_order_and_odd_layouts():
    be = np.arange(6, dtype=">i4").reshape(2, 3)
    rec = np.zeros(4, dtype=[("a", "<f4"), ("b", "<i2")])
    rec["a"] = [1, 2, 3, 4]
    buf = bytearray(np.arange(8, dtype=np.float32).tobytes() + b"\x00")
    odd = np.frombuffer(buf, dtype=np.float32, count=2, offset=1)  # off the grid of `even`
    even = np.frombuffer(buf, dtype=np.float32, count=4)
    obj = {"be": be, "field": rec["a"], "even": even, "odd": odd, "rev": even[::-1]}
    got = torchfree.load(save_bytes(obj))
    np.testing.assert_array_equal(got["be"], be)
    assert got["be"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(got["field"], [1, 2, 3, 4])
    np.testing.assert_array_equal(got["odd"], odd)
    np.testing.assert_array_equal(got["rev"], even[::-1])
    assert got["odd"].base is not got["even"].base


def test_memoryview_and_bytes_owners_share():
    ba = bytearray(np.arange(16, dtype=np.float32).tobytes())
    a = np.frombuffer(ba, dtype=np.float32)[:8]
    b = np.frombuffer(ba, dtype=np.float32)[8:]  # another memoryview over the same bytearray
    by = np.arange(4, dtype=np.int64).tobytes()
    c = np.frombuffer(by, dtype=np.int64)
    got = torchfree.load(save_bytes({"a": a, "b": b, "c": c, "c2": c[1:]}))
    assert got["a"].base is got["b"].base and got["c"].base is got["c2"].base
    np.testing.assert_array_equal(got["b"], np.arange(8, 16))


def test_same_bytes_as_two_dtypes_raise():
    x = np.zeros(4, dtype=np.float32)
    with pytest.raises(ValueError, match="view the same data as different types.*'a'.*'b'"):
        save_bytes({"a": x, "b": x.view(np.int32)})
    c = np.ones(3, np.complex64)
    with pytest.raises(ValueError, match="different types"):
        save_bytes([c, c.imag])
    # empty views of another dtype and disjoint regions are fine
    raw = np.zeros(32, dtype=np.uint8)
    got = torchfree.load(save_bytes({"f": raw[:16].view(np.float32), "i": raw[16:].view(np.int32),
                                     "e": raw[:0].view(np.int16)}))
    assert got["f"].shape == (4,) and got["i"].shape == (4,) and got["e"].shape == (0,)


@pytest.mark.parametrize("bad,path,exc", [
    ({"a": {"b": [1, object()]}}, "a.b.1", TypeError),
    ({"x": frozenset([1])}, "x", TypeError),
    ({"s": np.float32(1.0)}, "s", TypeError),
    ({"o": np.array([1, "x"], dtype=object)}, "o", TypeError),
    ({"u": np.array(["ab"])}, "u", TypeError),
    ({"m": np.ma.array([1.0, 2.0], mask=[0, 1])}, "m", TypeError),
    ({"q": [range(3)]}, "q.0", TypeError),
    ({"k": {(1, frozenset()): 2}}, "k", TypeError),
    ({"big": [2 ** 2048]}, "big.0", OverflowError),
])
def test_unsupported_objects_name_the_path(bad, path, exc):
    with pytest.raises(exc, match=f"at key path '{path}"):
        save_bytes(bad)


def test_errors_before_writing_leave_streams_untouched():
    buf = io.BytesIO()
    with pytest.raises(TypeError):
        torchfree.save({"a": np.ones(3), "b": object()}, buf)
    assert buf.getvalue() == b""


def test_recursive_tuple_refused():
    lst = []
    t = (lst,)
    lst.append(t)
    with pytest.raises(ValueError, match="tuple contains itself"):
        save_bytes(t)


def test_opaque_refused():
    op = torchfree.Opaque("mymod", "Thing", args=(1,))
    with pytest.raises(TypeError, match="mymod.Thing.*at key path 'cfg'"):
        save_bytes({"cfg": op})


def test_metaarray_dtype_and_storage_objects():
    meta = torchfree.MetaArray((2, 3), np.dtype(np.float16))
    x = np.arange(6, dtype=np.float32)
    loaded = torchfree.load(save_bytes({"x": x}))
    storage = loaded["x"].base
    obj = {"meta": meta, "dt": np.dtype(ml_dtypes.bfloat16), "u16": np.dtype(np.uint16), "st": storage,
           "x": loaded["x"][1:]}
    got = torchfree.load(save_bytes(obj))
    assert got["meta"] == meta and got["dt"] == np.dtype(ml_dtypes.bfloat16)
    assert got["u16"] == np.dtype(np.uint16)
    assert isinstance(got["st"], torchfree.Storage) and bytes(got["st"]) == x.tobytes()
    assert got["x"].base is got["st"]


def test_pickle_protocol_and_format_arguments():
    with pytest.raises(ValueError, match="protocol"):
        save_bytes({}, pickle_protocol=4)
    with pytest.raises(ValueError, match="format"):
        save_bytes({}, format="tar")
    with pytest.raises(TypeError):
        torchfree.save({}, 12.5)


# ---- file objects ---------------------------------------------------------------------------


class WriteOnly:
    """Non-seekable: only write(), returning nothing (like many wrappers)."""

    def __init__(self):
        self.parts = []

    def write(self, b):
        self.parts.append(bytes(b))


class Partial(io.RawIOBase):
    """A raw stream that writes at most 1000 bytes per call."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        n = min(len(b), 1000)
        self.data += bytes(memoryview(b)[:n])
        return n


class Keeper:
    """Keeps every buffer it is given: they must stay valid after save returns."""

    def __init__(self):
        self.views = []

    def write(self, b):
        self.views.append(b)


def test_file_objects():
    obj = {"w": np.arange(300000, dtype=np.float32), "t": [1, "a"]}
    ref = save_bytes(obj)
    w = WriteOnly()
    torchfree.save(obj, w)
    assert b"".join(w.parts) == ref
    p = Partial()
    torchfree.save(obj, p)
    assert bytes(p.data) == ref
    k = Keeper()
    torchfree.save(obj, k)
    del obj
    import gc
    gc.collect()
    assert b"".join(bytes(v) for v in k.views) == ref
    # a file object positioned after other bytes: written from there
    f = io.BytesIO()
    f.write(b"HEADER")
    torchfree.save({"a": np.ones(2)}, f)
    assert f.getvalue()[6:] == save_bytes({"a": np.ones(2)})


@pytest.mark.parametrize("crc_thread", [0, 1])
def test_crc_thread_and_inline_write_the_same_bytes(tmp_path, crc_thread):
    """The CRCs come from a second thread or chunk by chunk: the same file either way, for a
    file descriptor (GIL released) and a Python stream, with records of 1 MB and one of 17 MB
    (an odd size) written in 512 KB pieces."""
    obj = {f"w{i}": random_array(np.float32, (1 << 20) + i, seed=i) for i in range(20)}
    obj["big"] = random_array(np.uint8, (17 << 20) + 3, seed=99)
    obj["e"] = np.zeros(0)
    obj["v"] = obj["w3"][5:]
    ref = save_bytes(obj)
    buf = io.BytesIO()
    torchfree._core.save(obj, buf, "archive", False, crc_thread=crc_thread)
    assert buf.getvalue() == ref
    p = tmp_path / "x.pt"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT)
    try:
        torchfree._core.save(obj, fd, "archive", False, crc_thread=crc_thread)
    finally:
        os.close(fd)
    assert p.read_bytes() == ref
    with zipfile.ZipFile(p) as z:
        assert z.testzip() is None


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_records_in_pieces_roundtrip(tmp_path, fmt):
    """Records are written in pieces that end on 512 KB boundaries of the file, whatever offset a
    record starts at: odd sizes after odd-sized records load back equal, and the file is what a
    stream gets."""
    obj = {"a": random_array(np.uint8, 7, seed=1), "big": random_array(np.uint8, (17 << 20) + 3, seed=2),
           "b": random_array(np.float32, 1001, seed=3), "big2": random_array(np.float64, (3 << 20) // 8 * 7 + 1, seed=4)}
    p = tmp_path / "x.pt"
    torchfree.save(obj, p, format=fmt, atomic=False)
    ref = io.BytesIO()
    torchfree._core.save(obj, ref, "x", fmt == "legacy")
    assert p.read_bytes() == ref.getvalue()
    back = torchfree.load(p)
    for k, v in obj.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k
    if fmt == "zip":
        with zipfile.ZipFile(p) as z:
            assert z.testzip() is None


def test_stream_errors_propagate():
    class Boom:
        def write(self, b):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        torchfree.save({"a": np.ones(100)}, Boom())


# ---- paths and atomic replacement ---------------------------------------------------------------


@pytest.mark.parametrize("name,prefix", [("model.pt", "model"), ("model.v1.pt", "model.v1"), ("a.b.c", "a.b"),
                                         ("noext", "noext"), ("trailingdot.", "trailingdot"),
                                         ("ünï.pt", "archive")])
def test_archive_names(tmp_path, name, prefix):
    p = tmp_path / name
    torchfree.save({"a": 1}, p)
    with zipfile.ZipFile(p) as z:
        assert z.namelist()[0] == f"{prefix}/data.pkl"


def test_invalid_file_name(tmp_path):
    with pytest.raises(ValueError, match="invalid file name"):
        torchfree.save({}, str(tmp_path / ".hidden"))


def test_atomic_replace_keeps_mode_and_cleans_up(tmp_path):
    p = tmp_path / "m.pt"
    torchfree.save({"v": 1}, p)
    os.chmod(p, 0o640)
    torchfree.save({"v": 2, "w": np.ones(3)}, p)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert torchfree.load(p)["v"] == 2
    with pytest.raises(TypeError):
        torchfree.save({"v": 3, "bad": object()}, p)
    assert torchfree.load(p)["v"] == 2  # the old file stays
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]  # no temporary left behind
    # a symlink: its target is replaced, the link stays
    target = tmp_path / "real.pt"
    torchfree.save({"v": 0}, target)
    link = tmp_path / "link.pt"
    os.symlink(target, link)
    torchfree.save({"v": 9}, link)
    assert os.path.islink(link) and torchfree.load(target)["v"] == 9


def test_not_atomic_writes_in_place(tmp_path):
    p = tmp_path / "m.pt"
    torchfree.save({"v": 1}, p, atomic=False)
    ino = os.stat(p).st_ino
    torchfree.save({"v": 2}, p, atomic=False)
    assert os.stat(p).st_ino == ino and torchfree.load(p)["v"] == 2
    torchfree.save({"v": 3}, p)
    assert os.stat(p).st_ino != ino  # atomic: a new file renamed over the old one


def _on_ext4(path) -> bool:
    """Whether path is on ext4 (where save reserves the file's blocks before writing)."""
    best, fs = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, typ = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if os.path.realpath(path).startswith(mnt.rstrip("/") + "/") and len(mnt) > len(best):
                best, fs = mnt, typ
    return fs == "ext4"


def _allocated_past_end(path) -> int:
    """Bytes of disk blocks the file holds beyond its size rounded up to a 4 KiB block."""
    st = os.stat(path)
    return st.st_blocks * 512 - (st.st_size + 4095) // 4096 * 4096


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("atomic", [True, False])
def test_reserved_blocks_are_trimmed(tmp_path, fmt, atomic):
    """On ext4 a save of 1 MB or more first reserves an upper bound of the file's blocks
    (fallocate, keeping the size) and frees what it did not use: the file holds the bytes a
    stream gets and no block past its end (2,000 records over-reserve about 700 KB)."""
    obj = {f"t{i}": random_array(np.float32, 131 + i % 7, seed=i) for i in range(2000)}
    obj["big"] = random_array(np.uint8, (1 << 20) + 5, seed=1)
    p = tmp_path / "m.pt"
    p.write_bytes(b"old contents " * 100_000)  # replaced (atomic) or truncated (not)
    torchfree.save(obj, p, format=fmt, atomic=atomic)
    ref = io.BytesIO()
    torchfree._core.save(obj, ref, "m", fmt == "legacy")
    assert p.read_bytes() == ref.getvalue()
    assert _allocated_past_end(p) <= 0, (os.stat(p).st_blocks, os.stat(p).st_size)
    if fmt == "zip":
        with zipfile.ZipFile(p) as z:
            assert z.testzip() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ as Linux has them")
def test_failed_write_frees_reserved_blocks(tmp_path):
    """A save that fails part way (here: the file size limit) raises OSError and leaves no
    reserved block past what it wrote."""
    p = tmp_path / "m.pt"
    code = f"""
import os, resource, signal, sys
sys.path.insert(0, {PKG_DIR!r})
import numpy as np, torchfree
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    torchfree.save({{"w": np.ones(1 << 20, np.float32)}}, {str(p)!r}, atomic=False)
except OSError as e:
    print("OSError", e.errno)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["OSError", str(errno.EFBIG)]
    assert os.path.getsize(p) <= 1 << 20
    assert _allocated_past_end(p) <= 0
    if _on_ext4(tmp_path):
        assert os.path.getsize(p) > 0  # the writes ran up to the limit


def test_save_over_the_file_being_mapped(tmp_path):
    """Arrays mapped from a file can be saved over that file (atomic rename)."""
    p = tmp_path / "m.pt"
    torchfree.save({"w": np.arange(1000, dtype=np.float32)}, p)
    loaded = torchfree.load(p)  # mmap
    loaded["w2"] = loaded["w"][::2]
    torchfree.save(loaded, p)
    got = torchfree.load(p)
    np.testing.assert_array_equal(got["w2"], np.arange(0, 1000, 2))


def test_gil_released_while_writing(tmp_path):
    """While the tensor bytes of a path are written, other Python threads run."""
    import threading

    big = np.ones(64 << 20, dtype=np.float32)  # 256 MB
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        before = count[0]
        torchfree.save({"big": big}, tmp_path / "big.pt", atomic=False)
        during = count[0] - before
    finally:
        stop.set()
        t.join()
    assert during > 1000, during


def test_threads_save_concurrently(tmp_path):
    import threading

    arrays = {f"w{i}": np.full(250000, i, dtype=np.float32) for i in range(4)}
    errors = []

    def run(i):
        try:
            for _ in range(3):
                torchfree.save({"i": i, **arrays}, tmp_path / f"t{i}.pt")
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        got = torchfree.load(tmp_path / f"t{i}.pt")
        assert got["i"] == i and got["w3"][0] == 3


# ---------------------------------------------------------------------------------------------
# torch 2.13: reads everything we write, byte-identical to torch.save
# ---------------------------------------------------------------------------------------------

def _modules(torch):
    def transformer():
        layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32)
        return torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def batchnorm():
        m = torch.nn.BatchNorm2d(4)
        m.train()
        m(torch.randn(2, 4, 3, 3))
        return m

    return {
        "conv2d": lambda: torch.nn.Conv2d(3, 8, 3, padding=1),
        "linear": lambda: torch.nn.Linear(10, 5),
        "batchnorm2d": batchnorm,
        "embedding": lambda: torch.nn.Embedding(20, 6, padding_idx=0),
        "lstm": lambda: torch.nn.LSTM(8, 6, num_layers=2, bidirectional=True),
        "transformer_encoder": transformer,
    }


MODULE_NAMES = ["conv2d", "linear", "batchnorm2d", "embedding", "lstm", "transformer_encoder"]


@pytest.mark.needs_torch
@pytest.mark.parametrize("kind", MODULE_NAMES)
def test_module_state_dict(torch, tmp_path, kind):
    torch.manual_seed(0)
    sd = _modules(torch)[kind]().state_dict()
    # numpy state_dict (arrays that own their memory), as a JAX/numpy pipeline would hold it
    np_sd = collections.OrderedDict((k, v.numpy().copy()) for k, v in sd.items())
    np_sd._metadata = sd._metadata
    path = torch_identical(torch, tmp_path, np_sd, stem="model.v1")
    load_all_ways(torch, path, np_sd)
    # torch's file -> torchfree.load -> torchfree.save: the same bytes again
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(sd, tmp_path / "a" / "sd.pt")
    torchfree.save(torchfree.load(tmp_path / "a" / "sd.pt"), tmp_path / "b" / "sd.pt")
    assert_same_file(tmp_path / "a" / "sd.pt", tmp_path / "b" / "sd.pt")


@pytest.mark.needs_torch
@pytest.mark.parametrize("opt", ["sgd_momentum", "adam"])
def test_training_checkpoint(torch, tmp_path, opt):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 2))
    if opt == "sgd_momentum":
        optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    else:
        optim = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    for _ in range(3):
        optim.zero_grad()
        model(torch.randn(4, 6)).pow(2).mean().backward()
        optim.step()
    ckpt = {"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": optim.state_dict(),
            "loss": 0.25}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(ckpt, tmp_path / "a" / "ckpt.pt")
    loaded = torchfree.load(tmp_path / "a" / "ckpt.pt")
    torchfree.save(loaded, tmp_path / "b" / "ckpt.pt")
    assert_same_file(tmp_path / "a" / "ckpt.pt", tmp_path / "b" / "ckpt.pt")
    load_all_ways(torch, tmp_path / "b" / "ckpt.pt", loaded)
    # edited weights (new arrays) are written and read back too
    loaded["model_state_dict"]["0.weight"] = loaded["model_state_dict"]["0.weight"] * 2
    path = torch_identical(torch, tmp_path, loaded, stem="edited")
    got = load_all_ways(torch, path, loaded)
    assert torch.equal(got["model_state_dict"]["0.weight"], ckpt["model_state_dict"]["0.weight"] * 2)


@pytest.mark.needs_torch
@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_with_views(torch, tmp_path, dtype):
    i = NP_DTYPES.index(dtype)
    obj = views_of(random_array(dtype, (3, 4), seed=i))
    obj["own0d"] = random_array(dtype, (), seed=100 + i)
    obj["ownempty"] = random_array(dtype, (0, 2), seed=200 + i)
    obj["offset"] = random_array(dtype, (10,), seed=300 + i)[3:7]
    obj["dtype"] = np.dtype(dtype)
    path = torch_identical(torch, tmp_path, obj)
    got = load_all_ways(torch, path, obj)
    assert got["base"].untyped_storage().data_ptr() == got["t"].untyped_storage().data_ptr()


@pytest.mark.needs_torch
def test_views_nested_and_python_objects(torch, tmp_path):
    x = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    shared_key = "weight"
    obj = collections.OrderedDict(
        x=x, perm=x.transpose(2, 0, 1), slice=x[1:3, ::2, 4:], diag=x[0].diagonal(),
        expand=np.broadcast_to(x[:, :1, :], (4, 7, 6)), flat_tail=x.reshape(-1)[17:],
        scalar=np.array(2.5), zero_size=np.ones((3, 0, 2)), bigger=np.arange(1000.0)[500:],
        nested={"a": [x[2], {"b": (x[3, 1], None, 1.5, "s")}], shared_key: [shared_key, 2 ** 70, -3, True]},
        py=[None, True, 1.5, 1 + 2j, "é", b"\x00\xff", bytearray(b"ab"), {1, 2}, (), (1,),
            collections.Counter(a=2), {i: i for i in range(1500)}, -(2 ** 100)],
        meta=torchfree.MetaArray((2, 3), np.dtype(np.float32)), dt=np.dtype(np.float16),
    )
    obj._metadata = collections.OrderedDict({"": {"version": 1}})
    path = torch_identical(torch, tmp_path, obj)
    got = torch.load(path, weights_only=True)
    assert got["meta"].is_meta and got["meta"].shape == (2, 3)
    assert got["dt"] is torch.float16 and got._metadata == obj._metadata
    rest = collections.OrderedDict((k, v) for k, v in obj.items() if k not in ("meta", "dt"))
    rest_got = collections.OrderedDict((k, v) for k, v in got.items() if k not in ("meta", "dt"))
    assert_same(rest, rest_got)
    got = torch.load(path, weights_only=True, mmap=True)
    assert np.array_equal(got["perm"].numpy(), obj["perm"])


@pytest.mark.needs_torch
def test_negative_strides_and_byte_order(torch, tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    obj = {"x": x, "rev": x[::-1, ::-2], "be": np.arange(5, dtype=">f4")}
    p = tmp_path / "m.pt"
    torchfree.save(obj, p)
    got = torch.load(p, weights_only=True)
    np.testing.assert_array_equal(got["rev"].numpy(), x[::-1, ::-2])
    np.testing.assert_array_equal(got["be"].numpy(), np.arange(5, dtype=np.float32))
    assert got["rev"].is_contiguous()


@pytest.mark.needs_torch
def test_same_data_two_dtypes_like_torch(torch):
    t = torch.zeros(4)
    with pytest.raises(RuntimeError, match="view the same data as different types"):
        torch.save({"a": t, "b": t.view(torch.int32)}, io.BytesIO())
    with pytest.raises(ValueError, match="view the same data as different types"):
        torchfree.save({"a": t.numpy(), "b": t.numpy().view(np.int32)}, io.BytesIO())


@pytest.mark.needs_torch
def test_numpy_views_of_one_tensor_share(torch):
    """t.numpy() twice gives two owners (torch tensor aliases) over one buffer: one record,
    as torch.save writes the tensors they came from (tied weights stay tied)."""
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    sd = {"emb": emb.weight.detach().numpy(), "head": head.weight.detach().numpy(), "row": emb.weight.detach()[3].numpy()}
    data = save_bytes(sd)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert [n for n in z.namelist() if "/data/" in n] == ["archive/data/0"]
    got = torchfree.load(data)
    assert got["emb"].base is got["head"].base is got["row"].base
    np.testing.assert_array_equal(got["row"], sd["emb"][3])
    t = torch.load(io.BytesIO(data), weights_only=True)
    assert t["emb"].untyped_storage().data_ptr() == t["head"].untyped_storage().data_ptr()


@pytest.mark.needs_torch
def test_file_object_identical_to_torch(torch):
    x = np.arange(20, dtype=np.int64)
    obj = {"a": x, "b": x[5:], "c": [1, 2]}
    ours, theirs = io.BytesIO(), io.BytesIO()
    torchfree.save(obj, ours)
    torch.save(to_torch(obj), theirs)
    assert ours.getvalue() == theirs.getvalue()


@pytest.mark.needs_torch
@pytest.mark.parametrize("n", [0, 1, 8, 9, 24, 25, 54, 55, 300, 1200])
def test_many_storages_identical(torch, tmp_path, n):
    """Record order, LONG_BINPUT memo indexes, batching and the serialization id over sizes."""
    rng = np.random.default_rng(n)
    obj = {f"layer{i}.weight": rng.standard_normal((i % 3 + 1, 2)).astype(np.float32) for i in range(n)}
    path = torch_identical(torch, tmp_path, obj)
    torch.load(path, weights_only=True, mmap=True)


@pytest.mark.needs_torch
def test_legacy_format(torch, tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    obj = {"x": x, "xt": x.T, "row": x[1], "i": np.arange(5), "b": np.array([True, False]),
           "c": np.ones(3, np.complex64), "bf": np.arange(4, dtype=ml_dtypes.bfloat16),
           "e": np.zeros((0, 3)), "s": np.array(3.5), "l": [1, "a", 2.5, None, {"k": x[2]}],
           "meta": torchfree.MetaArray((2,), np.dtype(np.float64))}
    p = tmp_path / "legacy.pt"
    torchfree.save(obj, p, format="legacy")
    raw = p.read_bytes()
    assert raw.startswith(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e\x80\x02\x4d\xe9\x03\x2e")
    got = torch.load(p, weights_only=True)
    meta = got.pop("meta")
    assert meta.is_meta and meta.dtype is torch.float64
    assert_same({k: v for k, v in obj.items() if k != "meta"}, got)
    assert got["x"].untyped_storage().data_ptr() == got["row"].untyped_storage().data_ptr()
    buf = io.BytesIO()
    torchfree.save(obj, buf, format="legacy")
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["row"].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="key path 'u'.*legacy format"):
        torchfree.save({"u": np.zeros(2, np.uint16)}, io.BytesIO(), format="legacy")
    with pytest.raises(RuntimeError, match="mmap"):
        torch.load(p, weights_only=True, mmap=True)


# ---------------------------------------------------------------------------------------------
# torch 1.13 (Debian's python3-torch, system Python)
# ---------------------------------------------------------------------------------------------

OLD_PYTHON = "/usr/bin/python3"

_OLD_READER = r"""
import sys, torch, pickle
out = {}
for path in sys.argv[1:]:
    obj = torch.load(path)
    flat = {}
    def walk(o, p):
        if isinstance(o, torch.Tensor):
            t = o
            raw = t.contiguous()
            if t.dtype in (torch.bfloat16, torch.float16):
                raw = raw.view(torch.int16)
            if t.is_complex():
                raw = torch.view_as_real(raw)
            flat[p] = (str(t.dtype), tuple(t.shape), tuple(t.stride()), t.storage_offset(),
                       raw.numpy().tobytes(), t.storage().data_ptr())
        elif isinstance(o, dict):
            for k, v in o.items(): walk(v, p + '.' + str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o): walk(v, p + '.' + str(i))
        else:
            flat[p] = o
    walk(obj, '')
    out[path] = flat
sys.stdout.buffer.write(pickle.dumps(out, protocol=2))
"""


def _old_torch_available():
    if not os.path.exists(OLD_PYTHON):
        return False
    r = subprocess.run([OLD_PYTHON, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.startswith("1.")


@pytest.mark.skipif(not _old_torch_available(), reason="Debian's python3-torch (torch 1.x) is not installed")
def test_torch_1_13_reads_zip_and_legacy(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    obj = {"x": x, "xt": x.T, "row": x[1], "i": np.arange(5), "b": np.array([True, False]),
           "c": np.arange(3, dtype=np.complex128) * 1j, "bf": np.arange(4, dtype=ml_dtypes.bfloat16),
           "h": np.arange(3, dtype=np.float16), "i8": np.arange(-2, 2, dtype=np.int8),
           "e": np.zeros((0, 3)), "s": np.array(3.5), "l": [1, "a", 2.5, None, {"k": x[2]}]}
    paths = []
    for fmt in ("zip", "legacy"):
        p = tmp_path / f"{fmt}.pt"
        torchfree.save(obj, p, format=fmt)
        paths.append(str(p))
    r = subprocess.run([OLD_PYTHON, "-c", _OLD_READER, *paths], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    results = pickle.loads(r.stdout)
    for p in paths:
        flat = results[p]
        for key in ("x", "xt", "row", "i", "b", "c", "bf", "h", "i8", "e", "s", "l.4.k"):
            a = obj
            for part in key.split("."):
                a = a[int(part)] if isinstance(a, list) else a[part]
            dtype, shape, strides, offset, raw, _ = flat["." + key]
            assert dtype.replace("torch.", "") == a.dtype.name, (p, key)
            assert shape == a.shape and strides == tuple(s // a.itemsize for s in a.strides), (p, key)
            assert raw == np.ascontiguousarray(a).tobytes(), (p, key)
        assert flat[".l.0"] == 1 and flat[".l.1"] == "a" and flat[".l.2"] == 2.5
        assert flat[".x"][5] == flat[".xt"][5] == flat[".row"][5]  # one storage
        assert flat[".row"][3] == 4


# ---------------------------------------------------------------------------------------------
# zip64: records and offsets past 4 GiB
# ---------------------------------------------------------------------------------------------


class HashSink:
    """Keeps the CRC-32 and length of a stream, its first and last 64 KiB."""

    def __init__(self):
        import zlib
        self.zlib = zlib
        self.crc = 0
        self.n = 0
        self.head = bytearray()
        self.tail = bytearray()

    def write(self, b):
        m = memoryview(b).cast("B")
        self.crc = self.zlib.crc32(m, self.crc)
        self.n += len(m)
        if len(self.head) < 65536:
            self.head += bytes(m[: 65536 - len(self.head)])
        self.tail += bytes(m[-65536:])
        del self.tail[:-65536]
        return len(m)

    def flush(self):
        pass


@pytest.mark.slow
@pytest.mark.needs_torch
def test_zip64_past_4gib_identical_to_torch(torch, tmp_path):
    """A 4 GiB + 100 B record, then records whose headers start past 4 GiB: zip64 extras in
    local and central headers, 24-byte descriptors; torch writes exactly the same stream."""
    big = np.zeros((1 << 32) + 100, dtype=np.uint8)  # zero pages: no memory is touched
    big_tail = big[-100:]
    small = np.arange(10, dtype=np.float32)
    f8 = np.arange(4, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    obj = {"big": big, "small": small, "f8": f8, "tail": big_tail}
    ours, theirs = HashSink(), HashSink()
    torchfree.save(obj, ours)
    torch.save(to_torch(obj), theirs)
    assert (ours.n, ours.crc, ours.head, ours.tail) == (theirs.n, theirs.crc, theirs.head, theirs.tail)
    assert ours.n > (1 << 32)
    p = tmp_path / "big.pt"
    torchfree.save(obj, p)
    got = torch.load(p, weights_only=True, mmap=True)
    assert got["big"].shape == big.shape and got["tail"].storage_offset() == big.size - 100
    assert got["small"].tolist() == list(range(10))
    assert got["f8"].view(torch.uint8).tolist() == [0, 1, 2, 3]
    with zipfile.ZipFile(p) as z:
        info = {i.filename: i for i in z.infolist()}
        assert info["big/data/0"].file_size == (1 << 32) + 100
        assert info["big/data/1"].header_offset > (1 << 32)
        assert z.read("big/data/1") == small.tobytes()


# ---------------------------------------------------------------------------------------------
# hypothesis: random nested objects of arrays and views
# ---------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

HYP_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_,
              np.complex64, np.complex128, ml_dtypes.bfloat16]
HYP_V3_DTYPES = [np.uint16, np.uint32, np.uint64, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]


@st.composite
def arrays_and_views(draw, legacy):
    """A few base arrays and a list of views of them (slices, transposes, reshapes,
    broadcasts, 0-d elements, empty slices)."""
    dtypes = HYP_DTYPES if legacy else HYP_DTYPES + HYP_V3_DTYPES
    out = []
    for b in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(dtypes))
        shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
        base = random_array(dtype, shape, seed=draw(st.integers(0, 1000)))
        out.append(base)
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["T", "slice", "step", "elem", "flat", "empty", "bcast"]))
            v = base
            if kind == "T":
                v = base.T
            elif kind == "slice" and base.ndim:
                lo = draw(st.integers(0, base.shape[0]))
                v = base[lo:]
            elif kind == "step" and base.ndim:
                v = base[::draw(st.integers(1, 3))]
            elif kind == "elem" and base.size:
                v = base.reshape(-1)[:1].reshape(())  # a 0-d view
            elif kind == "flat":
                v = base.reshape(-1)
            elif kind == "empty" and base.ndim:
                v = base[:0]
            elif kind == "bcast" and base.ndim and base.shape[0]:
                v = np.broadcast_to(base[:1], (3,) + base.shape[1:])
            out.append(v)
    return out


def nested(leaves):
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 80), 2 ** 80),
                        st.floats(allow_nan=False), st.text(max_size=5), st.binary(max_size=5))
    keys = st.one_of(st.text(max_size=4), st.integers(-5, 50))
    return st.recursive(
        st.one_of(scalars, leaves),
        lambda c: st.one_of(st.lists(c, max_size=4), st.tuples(c, c), st.dictionaries(keys, c, max_size=4)),
        max_leaves=12)


@st.composite
def objects(draw, legacy):
    arrs = draw(arrays_and_views(legacy))
    leaf = st.sampled_from(range(len(arrs)))
    shape = draw(nested(leaf.map(lambda i: ("ARR", i))))
    # every array appears at least once
    return {"tree": _fill(shape, arrs), "all": arrs}


def _fill(shape, arrs):
    if isinstance(shape, tuple) and len(shape) == 2 and shape[0] == "ARR":
        return arrs[shape[1]]
    if isinstance(shape, list):
        return [_fill(x, arrs) for x in shape]
    if isinstance(shape, tuple):
        return tuple(_fill(x, arrs) for x in shape)
    if isinstance(shape, dict):
        return {k: _fill(v, arrs) for k, v in shape.items()}
    return shape


def _same_tree(a, b):
    """torchfree.load(save(a)) == a: containers, scalars, arrays (values, dtype, strides)."""
    if isinstance(a, np.ndarray):
        assert type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape and a.strides == b.strides
        assert a.tobytes() == b.tobytes()
        return
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_tree(x, y)
    else:
        assert a == b


def _property(fn):
    """100 hypothesis examples, without deadline or size health checks."""
    fn = hypothesis.settings(max_examples=100, deadline=None,
                             suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                                    hypothesis.HealthCheck.data_too_large])(fn)
    return pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")(fn)


@_property
@hypothesis.given(objects(legacy=False))
def test_property_zip_roundtrip(obj):
    _check_roundtrip(obj, "zip")


@_property
@hypothesis.given(objects(legacy=True))
def test_property_legacy_roundtrip(obj):
    _check_roundtrip(obj, "legacy")


def _check_roundtrip(obj, fmt):
    got = torchfree.load(save_bytes(obj, format=fmt))
    _same_tree(obj, got)
    # sharing: arrays with one owner view one storage, others never share
    src, out = obj["all"], got["all"]
    for i in range(len(src)):
        for j in range(len(src)):
            same = _owner(src[i]) is _owner(src[j])
            assert (out[i].base is out[j].base) == same, (i, j)
    # an array object that appears several times comes back as one array object
    pairs = []
    _leaf_pairs(obj["tree"], got["tree"], pairs)
    for a, b in pairs:
        i = next(k for k, x in enumerate(src) if x is a)
        assert b is out[i]


def _leaf_pairs(a, b, out):
    if isinstance(a, np.ndarray):
        out.append((a, b))
    elif isinstance(a, dict):
        for k in a:
            _leaf_pairs(a[k], b[k], out)
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b):
            _leaf_pairs(x, y, out)


@pytest.mark.needs_torch
@_property
@hypothesis.given(objects(legacy=True))
def test_property_legacy_roundtrip_torch(obj):
    import torch

    buf = io.BytesIO(save_bytes(obj, format="legacy"))
    got = torch.load(buf, weights_only=True)
    assert_same(obj, got)  # values, dtypes, strides, sharing (one storage per owner)
    src, out = obj["all"], got["all"]
    for i in range(len(src)):
        for j in range(len(src)):
            if src[i].size and src[j].size:
                same = _owner(src[i]) is _owner(src[j])
                assert (out[i].untyped_storage().data_ptr() == out[j].untyped_storage().data_ptr()) == same
