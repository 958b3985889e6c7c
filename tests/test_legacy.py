"""The formats before zip: the legacy "magic number" stream (torch 0.1.10-1.5, and
``_use_new_zipfile_serialization=False`` since) and the tar archive (torch <= 0.1.9).

Files are written by torch 2.13 (or built to the layout torch's reader expects, where torch no
longer writes them) and compared with torch's own ``torch.load`` bit for bit; where torch cannot
read its own file (v3 dtypes in a legacy stream, big-endian writers) the comparison is with the
tensors that were saved. The real files (samples, corpus) are in test_samples_corpus.py; the
hostile ones in tests/hostile/.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest

import ckpt_tools
import torchfree
from conftest import SAMPLES, SAVEABLE_DTYPES, assert_same, count_tensors
from test_oracle import random_tensor

# dtypes torch writes with a typed storage (v2), which torch itself reads back from a legacy stream
V2 = ["float64", "float32", "float16", "bfloat16", "complex128", "complex64", "int64", "int32", "int16",
      "int8", "uint8", "bool"]


def save_legacy(torch, obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def every_dtype(torch):
    obj = {}
    for i, name in enumerate(SAVEABLE_DTYPES):
        t = random_tensor(torch, name, (3, 4), seed=i)
        obj[name] = t
        obj[name + "_t"] = t.t()
        obj[name + "_row"] = t[1]
    obj["scalar"] = torch.tensor(2.5)
    obj["empty"] = torch.zeros(0, 3)
    return obj


# ---------------------------------------------------------------------------------------------
# legacy stream written by torch 2.13
# ---------------------------------------------------------------------------------------------

def test_every_dtype_with_views(torch, tmp_path):
    obj = every_dtype(torch)
    data = save_legacy(torch, obj)
    path = tmp_path / "legacy.pt"
    path.write_bytes(data)
    got = torchfree.load(path)
    pairs = assert_same(got, obj)
    assert len(pairs) == count_tensors(obj)
    assert np.shares_memory(got["float32"], got["float32_t"]) and np.shares_memory(got["float32"], got["float32_row"])
    # torch reads back the dtypes it writes with typed storages: the same result
    v2 = {k: v for k, v in obj.items() if k.split("_")[0] in V2 or k in ("scalar", "empty")}
    v2_path = tmp_path / "v2.pt"
    v2_path.write_bytes(save_legacy(torch, v2))
    assert_same(torchfree.load(v2_path), torch.load(v2_path))
    assert_same(torchfree.load(v2_path, weights_only=False), torch.load(v2_path, weights_only=False))


def test_sources(torch, tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, generator=g)
    obj = {"x": x, "xt": x.t(), "i": torch.arange(7), "od": collections.OrderedDict(a=x[1])}
    data = save_legacy(torch, obj)
    path = tmp_path / "src.pt"
    path.write_bytes(data)
    expected = torch.load(path)
    for src in (path, str(path), data, bytearray(data), memoryview(data), io.BytesIO(data), ckpt_tools.NonSeekable(data)):
        assert_same(torchfree.load(src), expected)
    assert_same(torchfree.load(path, mmap=False), expected)
    # a file object positioned after other bytes loads from there
    f = io.BytesIO(b"header bytes" + data)
    f.seek(12)
    assert_same(torchfree.load(f), expected)
    # the arrays own their memory: nothing views the file
    got = torchfree.load(path)
    assert got["x"].flags.writeable
    got["x"][0, 0] = 123.0
    assert torchfree.load(path)["x"][0, 0] == x[0, 0].item()
    # mmap=True is refused, as torch does
    with pytest.raises(torchfree.CheckpointError, match="mmap"):
        torchfree.load(path, mmap=True)
    with pytest.raises(ValueError):
        torchfree.load(data, mmap=True)


def test_conj_neg_and_complex32_are_fixed_after_the_bytes_arrive(torch, tmp_path):
    """Lazy conj/neg bits and complex32 upcasts need the bytes while the pickle runs, but a legacy
    stream stores them after it: the copies are redone once the bytes are read."""
    g = torch.Generator().manual_seed(5)
    c128 = torch.randn(3, 4, dtype=torch.complex128, generator=g)
    n64 = torch.randn(5, dtype=torch.complex64, generator=g)
    c32 = random_tensor(torch, "complex32", (6,), seed=9)
    obj = {"c128": c128, "c128_conj": c128.conj(), "c128_t_conj": c128.t().conj(),
           "neg_imag": n64.conj().imag, "re": n64.real, "c32": c32, "c32_v": c32[2:5]}
    got = torchfree.load(save_legacy(torch, obj))
    assert_same(got, obj)
    np.testing.assert_array_equal(got["c128_conj"], np.conj(c128.numpy()))
    np.testing.assert_array_equal(got["neg_imag"], -n64.imag.numpy())
    assert np.shares_memory(got["c32"], got["c32_v"])


def test_big_endian_writer(torch, tmp_path):
    """A stream written on a big-endian host (crafted from its little-endian twin: torch
    converted 2/4/8-byte elements, complex64 as one 8-byte unit, and nothing else)."""
    obj = every_dtype(torch)
    obj["c64"] = torch.randn(5, dtype=torch.complex64)
    obj["c128"] = torch.randn(3, dtype=torch.complex128)
    le = save_legacy(torch, obj)
    be = ckpt_tools.make_big_endian_legacy(le)
    assert be != le
    assert_same(torchfree.load(be), obj)
    assert_same(torchfree.load(le), obj)


def test_map_location(torch, tmp_path):
    x = torch.arange(6.0).reshape(2, 3)
    obj = {"x": x, "row": x[1], "i": torch.arange(3)}
    path = tmp_path / "ml.pt"
    path.write_bytes(save_legacy(torch, obj))
    expected = torch.load(path)
    for ml in ("cpu", {"cpu": "cpu"}, None):
        assert_same(torchfree.load(path, map_location=ml), expected)
    meta = torchfree.load(path, map_location="meta")
    assert isinstance(meta["x"], torchfree.MetaArray) and meta["x"].shape == (2, 3)
    assert_same(meta, torch.load(path, map_location="meta"), meta=True)
    seen = []
    got = torchfree.load(path, map_location=lambda s, tag: seen.append((s.key, s.nbytes, tag)))
    assert_same(got, expected)
    assert sorted(n for _, n, _ in seen) == [24, 24] and {t for _, _, t in seen} == {"cpu"}
    # a CUDA-tagged legacy file (torch 2.11 on a GPU) gives host arrays and shows the tag
    cuda = SAMPLES / "cuda211_legacy.pt"
    tags = []
    got = torchfree.load(cuda, map_location=lambda s, tag: tags.append(tag))
    assert tags == ["cuda:0"]
    assert_same(got, torch.load(cuda, map_location="cpu"))


def test_weights_only_and_pickled_modules(torch, tmp_path):
    lin = torch.nn.Linear(3, 2)
    sd_path = tmp_path / "sd.pt"
    sd_path.write_bytes(save_legacy(torch, lin.state_dict()))
    got = torchfree.load(sd_path)  # weights_only=True: a state_dict needs nothing else
    assert_same(got, torch.load(sd_path))
    assert got._metadata == torch.load(sd_path)._metadata
    # a whole module: its class is a GLOBAL (refused under weights_only) and a ('module', ...) id
    mod_path = tmp_path / "module.pt"
    mod_path.write_bytes(save_legacy(torch, lin))
    with pytest.raises(torchfree.UnsafeGlobalError, match="torch.nn.modules.linear.Linear"):
        torchfree.load(mod_path)
    opaque = torchfree.load(mod_path, weights_only=False)
    assert isinstance(opaque, torchfree.Opaque)
    flat = torchfree.flatten(opaque)
    for k, v in lin.state_dict().items():
        assert_same(flat[f"_parameters.{k}"], v)


class _Marker:
    def __init__(self, pid):
        self.pid = pid


class _RebuildOver:
    """Pickles as torch._utils._rebuild_tensor_v2 over a persistent id."""

    def __init__(self, torch, pid, offset, size, stride):
        self.args = (_Marker(pid), offset, size, stride, False, collections.OrderedDict())
        self.fn = torch._utils._rebuild_tensor_v2

    def __reduce__(self):
        return self.fn, self.args


class _PidPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Marker) else None


def legacy_stream(main_obj, keys, blobs, *, sys_info=None) -> bytes:
    """A legacy stream assembled by hand (persistent ids given as _Marker objects)."""
    buf = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, buf, protocol=2)
    pickle.dump(1001, buf, protocol=2)
    pickle.dump(sys_info or {"protocol_version": 1001, "little_endian": True,
                             "type_sizes": {"short": 2, "int": 4, "long": 4}}, buf, protocol=2)
    _PidPickler(buf, protocol=2).dump(main_obj)
    pickle.dump(keys, buf, protocol=2)
    for b in blobs:
        buf.write(b)
    return buf.getvalue()


def test_storage_views_of_pre_0_4_files(torch, tmp_path):
    """view_metadata (view_key, offset, numel): slices of a root storage, one object per view
    key, as in the 0.3.1 bytes of torch's test_serialization_storage_slice."""
    fs = torch.FloatStorage

    def view(vkey, off, n):
        return _Marker(("storage", fs, "root", "cpu", 4, (vkey, off, n)))

    main = {"a": view("v0", 0, 1), "b": view("v1", 1, 2), "a2": view("v0", 0, 1),
            "t": _RebuildOver(torch, ("storage", fs, "root", "cpu", 4, ("v1", 1, 2)), 1, (1,), (1,)),
            "whole": _RebuildOver(torch, ("storage", fs, "root", "cpu", 4, None), 0, (2, 2), (2, 1))}
    data = legacy_stream(main, ["root"], [struct.pack("<q", 4) + np.arange(1, 5, dtype="<f4").tobytes()])
    path = tmp_path / "views.pt"
    path.write_bytes(data)
    expected = torch.load(path, weights_only=False)
    got = torchfree.load(path, weights_only=False)
    # torch's view storages are slices of the root's memory too, but have their own data pointer,
    # which the generic sharing check would take for another storage
    assert_same(got, expected, sharing=False)
    assert got["a"] is got["a2"]
    assert bytes(memoryview(got["b"])) == np.array([2, 3], dtype="<f4").tobytes()
    assert got["t"].tolist() == [3.0] and np.shares_memory(got["t"], got["whole"])


# ---------------------------------------------------------------------------------------------
# tar format (torch <= 0.1.9), built to the layout torch's reader expects
# ---------------------------------------------------------------------------------------------

def make_tar(torch, *, offset_views=True) -> bytes:
    """storages: 1 (float, 12 elements), 2 (int64, 3), views 3 = elements 4..7 of 1; tensors:
    10 = storage 1 as 3x4, 11 = its transpose, 12 = column 2 (stride 4, offset 2), 13 = storage
    2; main pickle: a dict of them, the view storage and a nested list."""

    def p(obj):
        return pickle.dumps(obj, protocol=2)

    f32 = np.arange(12, dtype="<f4")
    i64 = np.array([5, -6, 2 ** 40], dtype="<i8")
    storages = (p(2) + p((1, "cpu", torch.FloatStorage)) + struct.pack("<q", 12) + f32.tobytes()
                + p((2, "cpu", torch.LongStorage)) + struct.pack("<q", 3) + i64.tobytes()
                + p([(3, 1, 4, 4)] if offset_views else []))

    def tensor(key, skey, size, stride, offset):
        nd = len(size)
        return (p((key, skey, torch.FloatTensor)) + struct.pack("<i", nd) + b"\0" * 4
                + struct.pack(f"<{nd}q", *size) + struct.pack(f"<{nd}q", *stride) + struct.pack("<q", offset))

    tensors = (p(4) + tensor(10, 1, (3, 4), (4, 1), 0) + tensor(11, 1, (4, 3), (1, 4), 0)
               + tensor(12, 1, (3,), (4,), 2) + tensor(13, 2, (3,), (1,), 0))

    def ref(key):
        return _Marker(str(key))

    buf = io.BytesIO()
    _PidPickler(buf, protocol=2).dump({"x": ref(10), "xt": ref(11), "col": ref(12), "i": ref(13),
                                      "view": ref(3), "nested": [ref(10), (ref(13),)]})
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, payload in (("sys_info", p({"protocol_version": 1000, "little_endian": True})),
                              ("pickle", buf.getvalue()), ("tensors", tensors), ("storages", storages)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def test_tar_generated(torch, tmp_path):
    data = make_tar(torch)
    path = tmp_path / "old.tar.pt"
    path.write_bytes(data)
    expected = torch.load(path, weights_only=False)  # torch reads tar only from a real file at 0
    for src in (path, data, io.BytesIO(data)):
        got = torchfree.load(src, weights_only=False)
        assert_same(got, expected)
    got = torchfree.load(path)  # weights_only=True is safe here too (torch 2.x refuses it)
    assert_same(got, expected)
    assert got["xt"].strides == (4, 16) and got["col"].strides == (16,)
    assert got["nested"][0] is got["x"] and np.shares_memory(got["x"], got["col"])
    assert bytes(memoryview(got["view"])) == np.arange(4, 8, dtype="<f4").tobytes()
    # unlike torch, not only at offset 0 of a file object
    f = io.BytesIO(b"x" * 100 + data)
    f.seek(100)
    assert_same(torchfree.load(f, weights_only=False), expected)
    # map_location: the callable sees each storage once, after its bytes are read
    seen = []
    torchfree.load(path, map_location=lambda s, tag: seen.append(bytes(memoryview(s))[:4]))
    assert seen == [np.float32(0).tobytes(), np.int64(5).tobytes()[:4]]
    meta = torchfree.load(path, map_location="meta")
    assert isinstance(meta["x"], torchfree.MetaArray) and meta["x"].shape == (3, 4)


def test_tar_without_view_list(torch):
    """The oldest writer wrote no view list after the storages."""
    data = make_tar(torch, offset_views=False)
    with pytest.raises(torchfree.FormatError, match="names no tensor or storage"):
        torchfree.load(data, weights_only=False)  # its pickle names view 3, which is absent


def test_tar_sample():
    got = torchfree.load(SAMPLES / "old_tar_format.pt", weights_only=False)
    assert got["t"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert bytes(memoryview(got["view"])) == np.arange(2, 5, dtype="<f4").tobytes()


# ---------------------------------------------------------------------------------------------
# malformed legacy streams and tars (no torch needed: the streams are assembled by hand)
# ---------------------------------------------------------------------------------------------

def _raw_stream(main_pickle: bytes, keys, blobs, magic_ok=True):
    buf = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C if magic_ok else 12345, buf, protocol=2)
    pickle.dump(1001, buf, protocol=2)
    pickle.dump({"little_endian": True}, buf, protocol=2)
    buf.write(main_pickle)
    buf.write(keys if isinstance(keys, bytes) else pickle.dumps(list(keys), protocol=2))
    for b in blobs:
        buf.write(b)
    return buf.getvalue()


def _main(key="k", numel=3, view=None) -> bytes:
    """{'w': _rebuild_tensor_v2(('storage', torch.FloatStorage, key, 'cpu', numel, view), 0, (1,), (1,), ...)}"""
    def s(x):
        b = x.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    def i(x):
        return b"J" + struct.pack("<i", x)

    v = b"N" if view is None else b"(" + s(view[0]) + i(view[1]) + i(view[2]) + b"t"
    pid = b"(" + s("storage") + b"ctorch\nFloatStorage\n" + s(key) + s("cpu") + i(numel) + v + b"tQ"
    return (b"\x80\x02}" + s("w") + b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + i(0) + b"(K\x01t(K\x01t"
            + b"\x89ccollections\nOrderedDict\n)RtRs.")


GOOD_BLOB = struct.pack("<q", 3) + np.arange(3, dtype="<f4").tobytes()


def test_hand_built_stream_loads():
    got = torchfree.load(_raw_stream(_main(), ["k"], [GOOD_BLOB]))
    assert got["w"].tolist() == [0.0]


@pytest.mark.parametrize("case,exc,match", [
    ("bad_magic", torchfree.FormatError, "magic number"),
    ("bad_protocol", torchfree.FormatError, "protocol version"),
    ("numel_header_mismatch", torchfree.FormatError, "wrong byte size"),
    ("negative_numel_header", torchfree.FormatError, "wrong byte size"),
    ("key_twice", torchfree.FormatError, "twice"),
    ("unknown_key", torchfree.FormatError, "not used by the pickle"),
    ("missing_blob", torchfree.FormatError, "has no bytes"),
    ("blob_cut", torchfree.FormatError, "file ends inside"),
    ("view_past_root", torchfree.FormatError, "reaches past"),
    ("key_list_not_list", torchfree.FormatError, "not a list"),
    ("pid_numel_huge", torchfree.LimitError, "limit"),
    ("trailing_garbage_in_key_list", torchfree.UnpicklingError, "opcode"),
])
def test_malformed_streams(case, exc, match):
    main = _main()
    keys, blobs, magic_ok = ["k"], [GOOD_BLOB], True
    if case == "bad_magic":
        magic_ok = False
    elif case == "numel_header_mismatch":
        blobs = [struct.pack("<q", 2) + bytes(8)]
    elif case == "negative_numel_header":
        blobs = [struct.pack("<q", -1)]
    elif case == "key_twice":
        keys, blobs = ["k", "k"], [GOOD_BLOB, GOOD_BLOB]
    elif case == "unknown_key":
        keys = ["k", "other"]
    elif case == "missing_blob":
        keys, blobs = [], []
    elif case == "blob_cut":
        blobs = [GOOD_BLOB[:-2]]
    elif case == "view_past_root":
        main = _main(view=("v", 2, 5))
    elif case == "pid_numel_huge":
        main = _main(numel=2 ** 31 - 1)
        blobs = [struct.pack("<q", 2 ** 31 - 1)]
    if case == "bad_protocol":
        data = _raw_stream(main, keys, blobs).replace(b"M\xe9\x03", b"M\xea\x03", 1)
    elif case == "key_list_not_list":
        data = _raw_stream(main, b"\x80\x02K\x01.", [])
    elif case == "trailing_garbage_in_key_list":
        data = _raw_stream(main, b"\x80\x02]\xff", [])
    else:
        data = _raw_stream(main, keys, blobs, magic_ok)
    with pytest.raises(exc, match=match):
        torchfree.load(data, limits={"total_bytes": 1 << 30} if case == "pid_numel_huge" else None)


def _tar(members) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        for name, payload in (members.items() if isinstance(members, dict) else members):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def _p(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _pid(key: str) -> bytes:
    """A pickle of just the persistent id `key` (how a tar's main pickle names a tensor)."""
    return b"\x80\x02X" + struct.pack("<I", len(key)) + key.encode() + b"Q."


@pytest.mark.parametrize("case,match", [
    ("missing_pickle", "no member named pickle"),
    ("bad_checksum", "checksum"),
    ("duplicate_member", "two members"),
    ("tensor_names_no_storage", "names no storage"),
    ("storage_too_big", "more than its member holds"),
    ("bad_ndim", "dimensions"),
])
def test_malformed_tars(case, match):
    fs = b"ctorch\nFloatStorage\n"
    storage = b"\x80\x02K\x01.\x80\x02(K\x01X\x03\x00\x00\x00cpu" + fs + b"t." + struct.pack("<q", 2) + bytes(8)
    storage += _p([])
    tensor = b"\x80\x02(K\x0aK\x01ctorch\nFloatTensor\nt." + struct.pack("<i", 1) + bytes(4) + struct.pack("<3q", 2, 1, 0)
    good = {"sys_info": _p({}), "pickle": _pid("10"), "tensors": _p(1) + tensor, "storages": storage}
    members = dict(good)
    if case == "missing_pickle":
        del members["pickle"]
    elif case == "tensor_names_no_storage":
        members["tensors"] = members["tensors"].replace(b"K\x0aK\x01", b"K\x0aK\x07")
    elif case == "storage_too_big":
        members["storages"] = storage.replace(struct.pack("<q", 2), struct.pack("<q", 2 ** 40))
    elif case == "bad_ndim":
        members["tensors"] = members["tensors"].replace(struct.pack("<i", 1), struct.pack("<i", 99))
    assert torchfree.load(_tar(good)).tolist() == [0.0, 0.0]  # the unbroken tar loads
    data = _tar(members)
    if case == "bad_checksum":
        data = bytearray(data)
        data[0] ^= 1
        data = bytes(data)
    elif case == "duplicate_member":
        data = _tar(list(members.items()) + [("pickle", _pid("10"))])
    with pytest.raises(torchfree.FormatError, match=match):
        torchfree.load(data)


def test_quantized_sparse_nested_in_a_legacy_stream(torch, tmp_path):
    """These rebuilds compute with their parts' values, which a legacy stream stores after its
    pickle: the main pickle runs a second time once the bytes are in."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g)
    dense = torch.zeros(4, 6)
    dense[0, 1], dense[2, 5], dense[3, 0] = 1.5, -2.0, 3.25
    obj = {
        "q": torch.quantize_per_tensor(x, 0.05, 3, torch.quint8),
        "qc": torch.quantize_per_channel(x, torch.tensor([0.1, 0.2, 0.05, 0.3], dtype=torch.float64),
                                         torch.tensor([0, 1, -1, 2]), 0, torch.qint8),
        "coo": dense.to_sparse(), "csr": dense.to_sparse_csr(), "csc": dense.to_sparse_csc(),
        "bsr": dense.to_sparse_bsr((2, 3)), "bsc": dense.to_sparse_bsc((2, 3)),
        "nested": torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0) * 2]),
        "plain": x, "plain_t": x.t(),
    }
    path = tmp_path / "kinds.pt"
    path.write_bytes(save_legacy(torch, obj))
    got = torchfree.load(path, weights_only=False)
    # torch's own legacy loader builds a nested tensor from sizes it has not read yet (garbage):
    # that one is compared with the saved tensor, the rest with torch.load
    assert_same(got["nested"], obj["nested"])
    del obj["nested"]
    path.write_bytes(save_legacy(torch, obj))
    got = torchfree.load(path, weights_only=False)
    assert_same(got, torch.load(path, weights_only=False))
    assert isinstance(got["q"], torchfree.QuantizedArray) and isinstance(got["coo"], torchfree.SparseArray)
    np.testing.assert_array_equal(got["csr"].todense(), dense.numpy())
    # the callable still sees each storage once
    seen = []
    torchfree.load(path, weights_only=False, map_location=lambda s, tag: seen.append(s.key))
    assert len(seen) == len(set(seen))


def test_scan_and_open(torch, tmp_path):
    """scan runs the pickles and reads no storage byte; open reads the file whole (its bytes
    follow its pickle) and serves the same arrays as load."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=g)
    obj = {"x": x, "xt": x.t(), "row": x[2], "i": torch.arange(7), "h": torch.randn(3, generator=g).half(),
           "nested": {"b": torch.zeros(2, 3, dtype=torch.float64)}}
    for name, data in (("legacy", save_legacy(torch, obj)), ("tar", make_tar(torch))):
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        loaded = torchfree.flatten(torchfree.load(path, weights_only=False))
        for make in (lambda: path, lambda: data, lambda: io.BytesIO(data)):
            info = torchfree.scan(make())
            assert info.format == name
            assert [t.name for t in info.tensors] == list(loaded)
            for t in info.tensors:
                a = loaded[t.name]
                assert (t.dtype, t.shape, t.strides) == (a.dtype, a.shape, a.strides), t.name
            keys = {t.storage_key for t in info.tensors}
            assert {s.key for s in info.storages} >= keys - {None}
            with torchfree.open(make(), weights_only=False) as ck:
                assert list(ck.keys()) == list(loaded)
                for k, a in loaded.items():
                    np.testing.assert_array_equal(ck[k], a)
                assert ck.info.tensors == info.tensors
        if name == "legacy":
            assert info.total_bytes == x.numel() * 4 + 7 * 8 + 3 * 2 + 6 * 8  # views counted once
    # the CLI's `info` runs scan
    from torchfree import cli

    assert cli.main(["info", str(tmp_path / "legacy.pt")]) in (0, None)
