"""torchfree.safetensors: our writer read by the `safetensors` package, its writer read by ours,
every dtype both support, and hostile headers that must give a clean FormatError."""

from __future__ import annotations

import json
import random
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy as stnp

import torchfree
from torchfree import safetensors as st

# dtypes the safetensors package's numpy loader (load_file) returns
NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
    "BOOL": np.bool_, "C64": np.complex64,
}
# dtypes both implement, numpy names the package's writer understands (arrays of ml_dtypes types)
ML_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
ALL_DTYPES = {**NUMPY_DTYPES, **ML_DTYPES}


def sample(code, shape=(3, 5), seed=0):
    rng = np.random.default_rng(seed)
    dt = np.dtype(ALL_DTYPES[code])
    n = int(np.prod(shape))
    if code == "BOOL":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    if code == "F8_E8M0":
        return (2.0 ** rng.integers(-20, 20, n)).astype(dt).reshape(shape)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, n, dtype=dt, endpoint=True).reshape(shape)
    if dt.kind == "c":
        return (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dt).reshape(shape)
    return (rng.standard_normal(n) * 4).astype(dt).reshape(shape)


def raw(a):
    return np.ascontiguousarray(a).tobytes()


def assert_same_array(got, exp):
    assert isinstance(got, np.ndarray)
    assert got.dtype == exp.dtype, (got.dtype, exp.dtype)
    assert got.shape == exp.shape
    assert raw(got) == raw(exp)


def all_dtypes_dict():
    d = {}
    for i, code in enumerate(ALL_DTYPES):
        d[f"t.{code.lower()}"] = sample(code, (2, 3, 4) if i % 2 else (7,), seed=i)
    d["scalar"] = np.array(3.5, np.float32)
    d["empty"] = np.zeros((0, 4), np.int16)
    d["empty_bf16"] = np.zeros((3, 0), ml_dtypes.bfloat16)
    return d


# ---- our writer, their reader ----------------------------------------------------------------


def test_package_reads_our_file_numpy_dtypes(tmp_path):
    d = {f"{c}": sample(c, (4, 3), seed=i) for i, c in enumerate(NUMPY_DTYPES)}
    d["scalar"] = np.array(-2, np.int64)
    d["empty"] = np.zeros((2, 0, 3), np.float32)
    p = tmp_path / "ours.safetensors"
    st.save_file(d, p, metadata={"format": "pt", "note": "ünïcode"})
    got = stnp.load_file(str(p))
    assert set(got) == set(d)
    for k, a in d.items():
        assert_same_array(got[k], a)
    with safetensors.safe_open(str(p), framework="np") as f:
        assert f.metadata() == {"format": "pt", "note": "ünïcode"}


def test_package_deserializes_every_dtype(tmp_path):
    """BF16 / float8 have no numpy loader in the package: compare its raw view (dtype code, shape,
    bytes) with ours."""
    d = all_dtypes_dict()
    blob = st.save(d)
    theirs = {name: v for name, v in safetensors.deserialize(blob)}
    assert set(theirs) == set(d)
    codes = st.DTYPES
    for k, a in d.items():
        v = theirs[k]
        assert codes[v["dtype"]] == a.dtype, (k, v["dtype"], a.dtype)
        assert tuple(v["shape"]) == a.shape
        assert bytes(v["data"]) == raw(a)
    # and a file on disk the same way
    p = tmp_path / "all.safetensors"
    st.save_file(d, p)
    assert p.read_bytes() == blob


def test_layout_aligned_and_header_padded():
    d = {"u8": np.arange(3, dtype=np.uint8), "f64": np.arange(3.0), "f16": np.ones(3, np.float16),
         "i32": np.arange(5, dtype=np.int32)}
    blob = st.save(d)
    (n,) = struct.unpack("<Q", blob[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(blob[8 : 8 + n])
    assert list(header) == list(d)  # header keeps the mapping's order
    for k, a in d.items():
        begin, end = header[k]["data_offsets"]
        assert begin % a.dtype.itemsize == 0 and end - begin == a.nbytes


def test_non_contiguous_big_endian_and_views_written_as_values():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    d = {
        "t": base.T,                                  # transposed view
        "row": base[1],                               # shares memory with base
        "step": base[:, ::2],                         # strided
        "bcast": np.broadcast_to(np.arange(3.0), (2, 3)),  # stride 0
        "be": np.arange(6, dtype=">i4").reshape(2, 3),  # big-endian
        "be_f": np.arange(3, dtype=">f8"),
        "base": base,
    }
    got = st.load(st.save(d))
    for k, a in d.items():
        exp = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("="))
        assert got[k].dtype == exp.dtype
        np.testing.assert_array_equal(got[k], exp)
    theirs = stnp.load(st.save(d))
    for k, a in d.items():
        np.testing.assert_array_equal(theirs[k], a)


# ---- their writer, our reader ----------------------------------------------------------------


@pytest.mark.parametrize("mmap", [True, False])
def test_we_read_package_files_every_dtype(tmp_path, mmap):
    d = all_dtypes_dict()
    p = tmp_path / "theirs.safetensors"
    stnp.save_file(d, str(p), metadata={"format": "np"})
    got = st.load_file(p, mmap=mmap)
    assert set(got) == set(d)
    for k, a in d.items():
        assert_same_array(got[k], a)
    assert st.metadata(p) == {"format": "np"}
    # the package's in-memory bytes too
    got2 = st.load(stnp.save(d))
    for k, a in d.items():
        assert_same_array(got2[k], a)


def test_we_read_package_float4():
    packed = np.array([[0x12, 0x34], [0x56, 0x78]], np.uint8)
    spec = safetensors.TensorSpec(dtype="float4_e2m1fn_x2", shape=list(packed.shape),
                                  data_ptr=packed.ctypes.data, data_len=packed.nbytes)
    blob = safetensors.serialize({"fp4": spec})
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    assert header["fp4"]["dtype"] == "F4" and header["fp4"]["shape"] == [2, 4]
    got = st.load(blob)["fp4"]
    assert got.dtype == np.uint8 and got.shape == (2, 2)  # as torchfree.load gives float4_e2m1fn_x2
    np.testing.assert_array_equal(got, packed)


def test_mmap_views_are_private(tmp_path):
    p = tmp_path / "x.safetensors"
    a = np.arange(16, dtype=np.float32)
    st.save_file({"a": a}, p)
    before = p.read_bytes()
    got = st.load_file(p)["a"]
    assert got.flags.writeable
    got[:] = -1  # copy-on-write: the file does not change
    assert p.read_bytes() == before
    owned = st.load_file(p, mmap=False)["a"]
    assert owned.flags.owndata or owned.base is not None
    np.testing.assert_array_equal(owned, a)


def test_safe_open_reads_one_tensor(tmp_path):
    p = tmp_path / "x.safetensors"
    st.save_file({"a": np.arange(4.0), "b": np.ones((2, 2), np.int8)}, p, {"k": "v"})
    with st.safe_open(p) as f:
        assert f.keys() == ["a", "b"]
        assert f.metadata() == {"k": "v"}
        np.testing.assert_array_equal(f["b"], np.ones((2, 2), np.int8))
        assert "a" in f and len(f) == 2
    with pytest.raises(ValueError):
        f["a"]


def test_scan_of_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    st.save_file({"w": np.zeros((3, 4), np.float16), "b": np.zeros(3, ml_dtypes.bfloat16)}, p)
    info = st.scan(p)
    assert info.format == "safetensors"
    assert [t.name for t in info.tensors] == ["w", "b"]
    assert info["w"].shape == (3, 4) and info["w"].strides == (8, 2) and info["w"].nbytes == 24
    assert info.total_bytes == 30 and info.param_count == 15
    json.loads(info.to_json())
    assert "bfloat16" in str(info)


# ---- writer errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("tensors, exc, match", [
    ({"c": np.zeros(2, np.complex128)}, TypeError, "complex128"),
    ({"o": np.array([object()])}, TypeError, "object"),
    ({"s": np.array(["x"])}, TypeError, "no dtype"),
    ({"__metadata__": np.zeros(1)}, ValueError, "reserved"),
    ({1: np.zeros(1)}, TypeError, "str"),
    ([np.zeros(1)], TypeError, "mapping"),
    ({"m": torchfree.MetaArray((2,), np.dtype(np.float32))}, TypeError, "MetaArray"),
])
def test_writer_rejects(tensors, exc, match):
    with pytest.raises(exc, match=match):
        st.save(tensors)


def test_writer_rejects_bad_metadata():
    with pytest.raises(TypeError, match="metadata"):
        st.save({"a": np.zeros(1)}, metadata={"a": 1})


# ---- hostile input ----------------------------------------------------------------------------


def build(header, data=b"", pad=True, length=None):
    raw_h = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw_h += b" " * (-len(raw_h) % 8)
    n = len(raw_h) if length is None else length
    return struct.pack("<Q", n) + raw_h + data


def ent(dtype="F32", shape=(2,), offs=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


HOSTILE = {
    "empty": b"",
    "short": b"\x01\x00\x00",
    "length_huge": struct.pack("<Q", 2**64 - 1) + b"{}",
    "length_over_limit": struct.pack("<Q", st.MAX_HEADER + 1) + b"{}" + b" " * 100,
    "length_past_end": struct.pack("<Q", 1000) + b"{}",
    "length_zero": struct.pack("<Q", 0),
    "not_json": build(b"{not json"),
    "not_utf8": build(b'{"\xff\xfe": 1}'),
    "not_object": build(b"[1, 2, 3]"),
    "leading_space": build(b' {"a": 1}'),
    "nan": build(b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}'),
    "duplicate_key": build(b'{"a": ' + json.dumps(ent()).encode() + b', "a": ' + json.dumps(ent()).encode() + b"}",
                           b"\0" * 8),
    "entry_not_object": build({"a": [1, 2]}),
    "missing_key": build({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
    "extra_key": build({"a": dict(ent(), extra=1)}, b"\0" * 8),
    "unknown_dtype": build({"a": ent(dtype="F128")}, b"\0" * 8),
    "dtype_not_str": build({"a": ent(dtype=4)}, b"\0" * 8),
    "f6_unsupported": build({"a": ent(dtype="F6_E2M3", shape=(4,), offs=(0, 3))}, b"\0" * 3),
    "f4_odd": build({"a": ent(dtype="F4", shape=(3,), offs=(0, 1))}, b"\0" * 1),
    "shape_negative": build({"a": ent(shape=(-2,))}, b"\0" * 8),
    "shape_float": build({"a": ent(shape=(2.0,))}, b"\0" * 8),
    "shape_bool": build({"a": {"dtype": "F32", "shape": [True, True], "data_offsets": [0, 4]}}, b"\0" * 4),
    "shape_huge": build({"a": ent(shape=(2**62, 2**62))}, b"\0" * 8),
    "shape_zero_times_huge": build({"a": ent(shape=(0, 2**63 - 1, 2**63 - 1), offs=(0, 0))}),
    "shape_too_many_dims": build({"a": ent(shape=(1,) * 65, offs=(0, 4))}, b"\0" * 4),
    "shape_not_list": build({"a": ent(shape="2")}, b"\0" * 8),
    "offsets_reversed": build({"a": ent(offs=(8, 0))}, b"\0" * 8),
    "offsets_negative": build({"a": ent(offs=(-8, 0))}, b"\0" * 8),
    "offsets_out_of_bounds": build({"a": ent(offs=(0, 8))}, b"\0" * 4),
    "offsets_three": build({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, b"\0" * 8),
    "offsets_string": build({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, b"\0" * 8),
    "size_mismatch": build({"a": ent(shape=(3,), offs=(0, 8))}, b"\0" * 8),
    "overlap": build({"a": ent(offs=(0, 8)), "b": ent(offs=(4, 12))}, b"\0" * 12),
    "same_range": build({"a": ent(offs=(0, 8)), "b": ent(offs=(0, 8))}, b"\0" * 8),
    "hole": build({"a": ent(offs=(0, 8)), "b": ent(offs=(12, 20))}, b"\0" * 20),
    "hole_at_start": build({"a": ent(offs=(4, 12))}, b"\0" * 12),
    "trailing_data": build({"a": ent()}, b"\0" * 12),
    "metadata_not_strings": build({"__metadata__": {"a": 1}, "a": ent()}, b"\0" * 8),
    "metadata_list": build({"__metadata__": ["a"], "a": ent()}, b"\0" * 8),
    "deep_nesting": build(b"{" + b'"a":[' * 100000 + b"]" * 100000 + b"}"),
    "big_int": build(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}', b"\0" * 8),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_header_is_clean_format_error(tmp_path, name):
    blob = HOSTILE[name]
    with pytest.raises(torchfree.FormatError):
        st.load(blob)
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    with pytest.raises(torchfree.FormatError) as ei:
        st.load_file(p)
    assert str(p) in str(ei.value) or name in ("empty", "short")
    assert "\n" not in str(ei.value)


def test_hostile_inputs_are_rejected_by_the_package_too():
    """Sanity check of the cases above: the reference implementation refuses them as well
    (except the ones it does not check and we do: duplicate or extra keys, more than 64 dimensions,
    dimensions of 2**63 or more, and the 6-bit float types, which numpy cannot represent)."""
    ours_only = {"duplicate_key", "extra_key", "f6_unsupported", "shape_zero_times_huge", "shape_too_many_dims"}
    for name, blob in HOSTILE.items():
        if name in ours_only:
            continue
        with pytest.raises(Exception):
            safetensors.deserialize(blob)


def test_valid_edge_cases_load():
    assert st.load(build({})) == {}
    assert list(st.load(build({"__metadata__": {"a": "b"}}))) == []
    z = st.load(build({"a": ent(shape=(0, 5), offs=(0, 0)), "b": ent(shape=(), offs=(0, 4))}, b"\0" * 4))
    assert z["a"].shape == (0, 5) and z["b"].shape == ()
    # unpadded header, and a header padded with spaces: both fine
    assert st.load(build({"a": ent()}, b"\0" * 8, pad=False))["a"].shape == (2,)


def test_mutated_files_never_crash():
    d = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int16),
         "c": np.array(True)}
    blob = st.save(d, {"x": "y"})
    rng = random.Random(1234)
    for _ in range(1500):
        b = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        try:
            st.load(bytes(b))
        except torchfree.FormatError:
            pass
    for cut in range(len(blob)):
        with pytest.raises(torchfree.FormatError):
            st.load(blob[:cut])


# ---- sharded (model.safetensors.index.json) ----------------------------------------------------


def write_sharded(folder, parts, metadata=None):
    """parts: [(shard file name, {name: array})]; returns the index path."""
    wm = {}
    for fname, d in parts:
        st.save_file(d, folder / fname, metadata)
        wm.update({k: fname for k in d})
    idx = folder / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    return idx


def test_sharded_index(tmp_path):
    a = {"x.w": np.ones((2, 3), np.float32), "x.b": np.arange(3, dtype=np.int64)}
    b = {"y.w": np.arange(4, dtype=ml_dtypes.bfloat16)}
    idx = write_sharded(tmp_path, [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)],
                        {"format": "pt"})
    assert st.is_index(idx)
    got = st.load_file(idx)
    assert list(got) == ["x.w", "x.b", "y.w"]
    for k, v in {**a, **b}.items():
        assert_same_array(got[k], v)
    assert st.metadata(idx) == {"format": "pt"}
    info = st.scan(idx)
    assert info.format == "sharded safetensors" and [t.name for t in info.tensors] == ["x.w", "x.b", "y.w"]
    assert info.tensors[2].storage_key == "model-00002-of-00002.safetensors:0"
    with st.safe_open(idx) as f:
        assert f.keys() == ["x.w", "x.b", "y.w"]
        assert_same_array(f["y.w"], b["y.w"])


def test_sharded_index_rejects_escapes_and_duplicates(tmp_path):
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(torchfree.FormatError, match="leaves"):
        st.load_file(idx)
    d = {"a": np.zeros(1, np.float32)}
    st.save_file(d, tmp_path / "s1.safetensors")
    st.save_file(d, tmp_path / "s2.safetensors")
    idx.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(torchfree.FormatError, match="more than one shard"):
        st.load_file(idx)


def test_loaded_tensors_are_independent_and_save_as_such(tmp_path):
    """Each tensor of load_file has its own mapping: torchfree.save writes them as separate
    storages (not as views of one buffer, which would mix dtypes in one storage)."""
    d = {"f": np.arange(6, dtype=np.float32), "u": np.arange(3, dtype=np.uint32), "g": np.ones(5, np.float32),
         "b": np.arange(4, dtype=ml_dtypes.bfloat16), "empty": np.zeros(0, np.float32)}
    p = tmp_path / "x.safetensors"
    st.save_file(d, p)
    got = st.load_file(p)
    bases = [a.base for a in got.values() if a.size]
    assert len({id(b) for b in bases}) == len(bases)
    out = tmp_path / "x.pt"
    torchfree.save(got, out)
    info = torchfree.scan(out)
    assert len(info.storages) == len(d)
    back = torchfree.load(out)
    for k, v in d.items():
        assert_same_array(back[k], v)


def test_file_shrunk_after_open(tmp_path):
    p = tmp_path / "x.safetensors"
    st.save_file({"a": np.arange(100000, dtype=np.float64)}, p)
    f = st.safe_open(p)
    with open(p, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(torchfree.FormatError, match="truncated"):
        f["a"]
    f.close()
