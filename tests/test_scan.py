"""scan(), open() and flatten(): agreement with load(), laziness, sharded indexes."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import torchfree

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = sorted(p for p in DATA.glob("*.pt"))


def corpus_zips():
    out = sorted(p for p in (DATA / "samples").glob("*.pt")
                 if p.read_bytes()[:4] == b"PK\x03\x04")
    for line in (DATA / "corpus" / "MANIFEST.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["format"] == "zip":
            out.append(DATA / "corpus" / rec["path"])
    return out


def check_scan_matches_load(path, **kw):
    info = torchfree.scan(path)
    flat = torchfree.flatten(torchfree.load(path, weights_only=False, **kw))
    assert [t.name for t in info.tensors] == list(flat), path
    for t in info.tensors:
        a = flat[t.name]
        assert t.dtype == a.dtype, (path, t.name)
        assert tuple(t.shape) == a.shape, (path, t.name)
        if isinstance(a, torchfree.SparseArray):  # listed with its parts (issue 19, item 6)
            assert (t.layout, t.nnz, t.strides) == (a.layout, a.nnz, ())
            assert t.nbytes == sum(p.nbytes for p in t.parts)
            continue
        if isinstance(a, torchfree.QuantizedArray):
            assert t.quant.qscheme == a.qscheme
            a = a.int_repr
        if a.size:
            assert tuple(t.strides) == a.strides, (path, t.name)
        assert t.nbytes == a.nbytes
    assert info.param_count == sum(math.prod(a.shape) for a in flat.values())
    return info


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_scan_agrees_with_load_on_fixtures(path):
    info = check_scan_matches_load(path)
    json.loads(info.to_json())  # JSON-safe
    assert str(info).splitlines()[0].startswith(str(path))


def test_scan_agrees_with_load_on_corpus():
    paths = corpus_zips()
    assert len(paths) > 50
    for p in paths:
        check_scan_matches_load(p)


class CountingFile(io.RawIOBase):
    """A seekable file that records every byte range read."""

    def __init__(self, data):
        self._b = io.BytesIO(data)
        self.ranges = []

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        return self._b.seek(pos, whence)

    def tell(self):
        return self._b.tell()

    def readinto(self, buf):
        start = self._b.tell()
        n = self._b.readinto(buf)
        self.ranges.append((start, start + n))
        return n


def test_scan_reads_no_tensor_bytes():
    data = (DATA / "train_ckpt.pt").read_bytes()
    f = CountingFile(data)
    info = torchfree.scan(f)
    assert info.tensors
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        spans = []
        for zi in z.infolist():
            if "/data/" in zi.filename and zi.file_size:
                lh = data[zi.header_offset:zi.header_offset + 30]
                start = zi.header_offset + 30 + int.from_bytes(lh[26:28], "little") + int.from_bytes(lh[28:30], "little")
                spans.append((start, start + zi.compress_size))
    assert spans
    for a, b in f.ranges:
        for s, e in spans:
            assert b <= s or a >= e, f"scan read bytes {a}..{b} of tensor data {s}..{e}"


class Custom:
    pass


def test_scan_never_raises_for_unknown_globals(tmp_path):
    import pickle

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"c": Custom()}, protocol=2))
        z.writestr("archive/version", "3\n")
    info = torchfree.scan(buf.getvalue())
    assert f"{__name__}.Custom" in info.globals
    with pytest.raises(torchfree.UnsafeGlobalError):
        torchfree.load(buf.getvalue())


def test_open_reads_single_tensors(tmp_path):
    path = DATA / "train_ckpt.pt"
    full = torchfree.flatten(torchfree.load(path))
    for mm in (None, False):
        with torchfree.open(path, mmap=mm) as ck:
            assert list(ck.keys()) == list(full)
            for k in full:
                np.testing.assert_array_equal(ck[k], full[k])
                assert ck[k].dtype == full[k].dtype
            assert ck.info.tensors[0].name == next(iter(full))
            assert all(isinstance(s, torchfree.Storage) for s in ck.storages)
            whole = ck.load()
            assert torchfree.flatten(whole).keys() == full.keys()
        with pytest.raises(ValueError, match="closed"):
            ck[next(iter(full))]


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("mm", [None, False])
def test_open_storages_bytes_after_read_storage(tmp_path, fmt, mm):
    """Checkpoint.storages are not read by listing them: their bytes raise until read_storage (or a
    tensor over them) reads the record, and are then the saved bytes (they once came back as
    uninitialised memory, and the buffer as a read past a 1-byte string)."""
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    sd = {"w": base, "row": base[1], "i": np.arange(5, dtype=np.int64)}
    p = tmp_path / "s.pt"
    torchfree.save(sd, p, format=fmt)
    with torchfree.open(p, mmap=mm if fmt == "zip" else None) as ck:
        by_key = {s.key: s for s in ck.storages}
        assert len(by_key) == 2
        if fmt == "zip":
            s = next(iter(by_key.values()))
            with pytest.raises(ValueError, match="not read yet"):
                s.numpy()
            with pytest.raises(BufferError, match="not read yet"):
                memoryview(s)
        got = {k: ck.read_storage(s).numpy().tobytes() for k, s in by_key.items()}
        assert sorted(got.values()) == sorted([base.tobytes(), sd["i"].tobytes()])
        assert bytes(memoryview(ck.read_storage(by_key[next(iter(by_key))]))) == got[next(iter(by_key))]
        with pytest.raises(TypeError):
            ck.read_storage(b"x")


def test_open_reads_a_big_record_in_pieces(tmp_path):
    """A stored record of 8 MB or more read on its own (open()[name] without mmap) is read by
    several threads in pieces: the same bytes, a view of it shares them, and a file cut short
    after it was opened still raises the plain read's error."""
    w = np.random.default_rng(0).standard_normal((3 << 20) + 5).astype(np.float32)  # 12 MB, odd size
    p = tmp_path / "big.pt"
    torchfree.save({"a": np.ones(3), "w": w, "v": w[7:]}, p)
    with torchfree.open(p, mmap=False) as ck:
        x, v = ck["w"], ck["v"]
        assert x.tobytes() == w.tobytes() and v.tobytes() == w[7:].tobytes()
        assert np.shares_memory(x, v)
    with torchfree.open(p, mmap=False) as ck:
        os.truncate(p, 1 << 20)
        with pytest.raises(torchfree.FormatError, match="file ended early"):
            ck["w"]


def test_open_views_share_one_read():
    path = DATA / "sd_views.pt"
    with torchfree.open(path) as ck:
        info = ck.info
        by_key = {}
        for t in info.tensors:
            if t.storage_key is not None and t.nbytes:
                by_key.setdefault(t.storage_key, []).append(t.name)
        shared = [names for names in by_key.values() if len(names) > 1]
        assert shared
        for names in shared:
            arrays = [ck[n] for n in names]
            assert len({a.base.__array_interface__["data"][0] if isinstance(a.base, np.ndarray) else id(a.base)
                        for a in arrays}) >= 1


def test_open_map_location_sets_storage_location():
    with torchfree.open(DATA / "train_ckpt.pt", map_location={"cpu": "cuda:1"}) as ck:
        assert {s.location for s in ck.storages} == {"cuda:1"}
    info = torchfree.scan(DATA / "train_ckpt.pt", map_location="meta")
    assert {s.location for s in info.storages} == {"meta"}


def test_open_file_object_and_deflated():
    data = (DATA / "sd_views_deflated.pt").read_bytes()
    full = torchfree.flatten(torchfree.load(data))
    f = CountingFile(data)
    with torchfree.open(f) as ck:
        name = next(k for k in ck.keys() if full[k].size)
        np.testing.assert_array_equal(ck[name], full[name])


def _big_checkpoint(path: Path, n: int, nbytes: int):
    """n float32 tensors of nbytes each, written with zipfile (no torch needed)."""
    import pickle
    import struct

    def unicode(s):
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    numel = nbytes // 4
    body = [b"\x80\x02}("]
    for i in range(n):
        body += [unicode(f"w{i}"), b"ctorch._utils\n_rebuild_tensor_v2\n(", b"(", unicode("storage"),
                 b"ctorch\nFloatStorage\n", unicode(str(i)), unicode("cpu"), b"J" + struct.pack("<i", numel), b"tQ",
                 b"J\0\0\0\0", b"(J" + struct.pack("<i", numel) + b"t", b"(J\1\0\0\0t", b"\x89",
                 b"ccollections\nOrderedDict\n)R", b"tR"]
    body.append(b"u.")
    chunk = np.arange(1 << 20, dtype=np.float32).tobytes()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("big/data.pkl", b"".join(body))
        z.writestr("big/version", "3\n")
        for i in range(n):
            with z.open(f"big/data/{i}", "w", force_zip64=True) as w:
                left = nbytes
                while left:
                    k = min(left, len(chunk))
                    w.write(chunk[:k])
                    left -= k
    pickle  # noqa: B018 (imported for readers of this helper)


def test_open_one_tensor_of_a_file_bigger_than_the_memory_budget(tmp_path):
    """A 384 MiB checkpoint, a 150 MiB budget: open() reads one 96 MiB tensor within it.

    Measured with tracemalloc (numpy reports its data buffers to it), so the check also holds
    under the ASan build, where address-space limits cannot be used."""
    import tracemalloc

    path = tmp_path / "big.pt"
    _big_checkpoint(path, 4, 96 << 20)
    budget = 150 << 20
    assert path.stat().st_size > 2 * budget
    tracemalloc.start()
    try:
        with torchfree.open(path, mmap=False) as ck:
            w = ck["w2"]
            assert w.shape == (96 << 18,) and w[5] == 5 and w[(1 << 20) + 7] == 7
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 96 << 20 <= peak < budget, peak


def test_sharded_index(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    src = torchfree.load(DATA / "train_ckpt.pt")["model_state_dict"]
    names = list(src)
    half = len(names) // 2
    # shards built by rewriting the fixture's pickle is torch's job; here: copy the fixture twice
    # and index each name to the shard whose state_dict holds it
    import shutil

    ckpt_keys = torchfree.load(DATA / "train_ckpt.pt")
    assert isinstance(ckpt_keys, dict)
    shard_a, shard_b = d / "pytorch_model-00001-of-00002.bin", d / "pytorch_model-00002-of-00002.bin"
    _state_dict_file(shard_a, {n: src[n] for n in names[:half]})
    _state_dict_file(shard_b, {n: src[n] for n in names[half:]})
    wm = {n: shard_a.name for n in names[:half]} | {n: shard_b.name for n in names[half:]}
    index = d / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    merged = torchfree.load(index)
    assert list(merged) == names
    for n in names:
        np.testing.assert_array_equal(merged[n], src[n])
    info = torchfree.scan(index)
    assert sorted(t.name for t in info.tensors) == sorted(names)
    with torchfree.open(index) as ck:
        assert list(ck.keys()) == names
        np.testing.assert_array_equal(ck[names[-1]], src[names[-1]])
        assert list(ck._open) == [shard_b.name]  # only the shard asked for was opened
    shutil.rmtree(d)


def _state_dict_file(path, sd):
    """A minimal torch-format zip of a flat {name: float32/int64 array} (no torch needed)."""
    import struct

    def unicode(s):
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b

    storage = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}
    body = [b"\x80\x02ccollections\nOrderedDict\n)R("]
    with zipfile.ZipFile(path, "w") as z:
        for i, (name, a) in enumerate(sd.items()):
            a = np.ascontiguousarray(a)
            dims = b"(" + b"".join(b"J" + struct.pack("<i", s) for s in a.shape) + b"t"
            st = [1] * a.ndim
            for k in range(a.ndim - 2, -1, -1):
                st[k] = st[k + 1] * a.shape[k + 1]
            strides = b"(" + b"".join(b"J" + struct.pack("<i", s) for s in st) + b"t"
            body += [unicode(name), b"ctorch._utils\n_rebuild_tensor_v2\n(", b"(", unicode("storage"),
                     f"ctorch\n{storage[a.dtype]}\n".encode(), unicode(str(i)), unicode("cpu"),
                     b"J" + struct.pack("<i", a.size), b"tQ", b"J\0\0\0\0", dims, strides, b"\x89",
                     b"ccollections\nOrderedDict\n)R", b"tR"]
            z.writestr(f"{path.stem}/data/{i}", a.tobytes())
        body.append(b"u.")
        z.writestr(f"{path.stem}/data.pkl", b"".join(body))
        z.writestr(f"{path.stem}/version", "3\n")


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_html_and_str():
    info = torchfree.scan(DATA / "train_ckpt.pt")
    p = _Collect()
    p.feed(info._repr_html_())
    assert "table" in p.tags and "div" in p.tags
    text = "".join(p.text)
    for t in info.tensors[:5]:
        assert t.name in text
        assert t.name in str(info)


def _c_table(info):
    return torchfree._core.info_table(info.tensors)


@pytest.mark.parametrize("path", FIXTURES + corpus_zips(), ids=lambda p: p.name)
def test_info_table_in_c_is_the_python_table(path):
    """str(info) makes its table in C for what scan made; _table() is the Python one, kept for
    the rest: the same text, cell for cell."""
    info = torchfree.scan(path)
    table = _c_table(info)
    if table is None:  # an array pickled inline, or a non-ASCII cell: the Python table is used
        assert not all(t.storage_key is not None and t.name.isascii() for t in info.tensors), path
        return
    assert table == info._table()
    text = info.to_text()
    assert text == "\n".join([info._header(), "", table] + text.splitlines()[len(table.splitlines()) + 2:])


def test_info_table_sizes_names_and_fallbacks(tmp_path):
    # stride-0 views of a 4-byte storage give any size: ties of %.1f (1280 B = 1.25 KiB), unit
    # boundaries, and TiB
    one = np.ones(1, np.float32)
    sizes = [0, 1, 255, 256, 319, 320, 321, 1023 // 4, 1024 // 4 * 3, 2 ** 18 - 1, 2 ** 18, 5 * 2 ** 18 // 4,
             2 ** 28 - 1, 2 ** 28 + 2 ** 26, 2 ** 38 + 1, 3 * 2 ** 40]
    sd = {f"s{i}": np.broadcast_to(one, (n,)) for i, n in enumerate(sizes)}
    sd["wide"] = np.broadcast_to(one, (7, 11, 1, 13))
    sd["scalar"] = np.array(2, np.float32)
    p = tmp_path / "sizes.pt"
    torchfree.save(sd, p)
    info = torchfree.scan(p)
    table = _c_table(info)
    assert table is not None and table == info._table()
    rows = {r.split()[0]: r.split() for r in table.splitlines()[2:]}
    for i, n in enumerate(sizes):
        assert " ".join(rows[f"s{i}"][-3:-1]) == torchfree._scan._human(4 * n)
    assert rows["wide"][2] == "7x11x1x13" and rows["scalar"][2] == "()"
    assert "1.2 KiB" in table and "1.2 GiB" in table and "12.0 TiB" in table
    # a bare tensor is named "<root>"
    torchfree.save(np.arange(3), tmp_path / "root.pt")
    root = torchfree.scan(tmp_path / "root.pt")
    assert _c_table(root) == root._table() and "<root>" in _c_table(root)
    # a non-ASCII name, TensorInfos made by hand, and no tensor at all: the Python table
    torchfree.save({"wé": one, "x": one}, tmp_path / "u.pt")
    u = torchfree.scan(tmp_path / "u.pt")
    assert _c_table(u) is None and "wé" in str(u)
    hand = torchfree.CheckpointInfo(None, "zip", "little", tensors=[torchfree.TensorInfo(*u.tensors[1]._astuple())])
    assert _c_table(hand) is None and hand._table() in str(hand) and "x" in hand._table().splitlines()[2]
    empty = torchfree.CheckpointInfo(None, "zip", "little")
    assert _c_table(empty) == empty._table() == "name  dtype  shape  storage  offset  size  location\n" + \
        "  ".join("-" * len(h) for h in ("name", "dtype", "shape", "storage", "offset", "size", "location"))


def test_flatten_names():
    obj = {"a": [np.zeros(1), (np.ones(2), {"b": np.zeros(3)})], "c": 5, "d": torchfree.MetaArray((2,), np.dtype("f4"))}
    flat = torchfree.flatten(obj)
    assert list(flat) == ["a.0", "a.1.0", "a.1.1.b", "d"]
    assert list(torchfree.flatten(obj, sep="/")) == ["a/0", "a/1/0", "a/1/1/b", "d"]
    assert list(torchfree.flatten(np.zeros(2))) == [""]
    o = torchfree.Opaque("m", "C", args=(), state={"w": np.zeros(1), "n": 3})
    assert list(torchfree.flatten({"x": o})) == ["x.w"]
    assert os.sep  # keep os imported for path helpers above
