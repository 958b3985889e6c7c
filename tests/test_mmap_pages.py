"""mmap loads of a path drop the pages of the mapping they have read (archive.c: the local
headers, read for every storage, would otherwise leave every page of a file of small tensors
mapped in the process). Torch-free: the arrays stay right, writes to them stay, a map_location
callable's writes made during the load stay, and the process does not keep the file's pages."""

from __future__ import annotations

import io
import os
import struct
import zipfile

import numpy as np
import pytest

import torchfree



def _rss_file_kb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1])
    except OSError:  # no /proc (not Linux): the one test that needs it is skipped
        pass
    return None


@pytest.fixture(scope="module", params=[600, 1500])
def many(request, tmp_path_factory):
    """A checkpoint of n small tensors of assorted sizes (5 or 12 MB), and the arrays saved: 600
    records are dropped by the loading thread, 1,500 (past the 1,024 that start the prefault
    thread) by the prefault thread."""
    n = request.param
    rng = np.random.default_rng(0)
    obj = {f"t{i}": rng.standard_normal((i % 7 + 1, 97 + 13 * (i % 41)), dtype=np.float32) for i in range(n)}
    obj["view"] = obj["t3"][:, 1::2]
    p = tmp_path_factory.mktemp("pages") / f"many{n}.pt"
    torchfree.save(obj, str(p))
    return str(p), obj


def _check(got, obj):
    assert set(got) == set(obj)
    for k, v in obj.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_mmap_load_right_and_writes_kept(many):
    path, obj = many
    a = torchfree.load(path, mmap=True)
    _check(a, obj)
    # copy-on-write: a write lands in this result only, and stays
    a["t5"][0, :3] = 42
    a["t6"][...] = -1
    assert np.array_equal(a["t5"][0, :3], [42, 42, 42]) and (a["t6"] == -1).all()
    b = torchfree.load(path, mmap=True)
    _check(b, obj)
    assert np.array_equal(a["t5"][0, :3], [42, 42, 42]) and (a["t6"] == -1).all()
    np.testing.assert_array_equal(a["t5"][1:], obj["t5"][1:])
    np.testing.assert_array_equal(a["t7"], obj["t7"])
    # the view shares its base's storage
    assert np.shares_memory(b["view"], b["t3"])
    b["t3"][0, 1] = 5
    assert b["view"][0, 0] == 5
    # the default (mmap=None) and a copy load agree
    _check(torchfree.load(path), obj)
    _check(torchfree.load(path, mmap=False), obj)


def test_map_location_callable_writes_kept(many):
    """A map_location callable sees each storage during the load and may write to it: such a
    load drops no page, so every write is still there afterwards."""
    path, obj = many
    seen = []

    def hook(storage, location):
        a = storage.numpy()
        a[:4] = np.frombuffer(np.float32(1234.5).tobytes(), np.uint8)  # the first element
        seen.append(storage.key)
        return None

    got = torchfree.load(path, mmap=True, map_location=hook)
    assert len(seen) == len(obj) - 1  # the view shares t3's storage
    for k in obj:
        assert got[k].ravel()[0] == 1234.5 or k == "view", k
    assert got["view"][0, 0] == obj["t3"][0, 1]  # not the storage's first element
    np.testing.assert_array_equal(got["t9"].ravel()[1:], obj["t9"].ravel()[1:])
    # the file is unchanged
    _check(torchfree.load(path, mmap=True), obj)


@pytest.mark.skipif(_rss_file_kb() is None, reason="needs /proc/self/status (Linux)")
def test_mmap_load_does_not_keep_the_file_mapped(many):
    path, obj = many
    size_kb = os.path.getsize(path) // 1024
    torchfree.load(path, mmap=True)  # warm the page cache
    before = _rss_file_kb()
    got = torchfree.load(path, mmap=True)
    after = _rss_file_kb()
    assert after - before < size_kb // 4, (before, after, size_kb)
    _check(got, obj)  # reading every array maps its pages back in
    assert _rss_file_kb() - before > size_kb // 2


@pytest.mark.parametrize("how", ["bytes", "mmap", "copy"])
def test_local_header_disagreeing_with_directory(tmp_path, how):
    """The local header is read in place from a mapping now: a name or signature that differs
    from the central directory is still refused."""
    buf = io.BytesIO()
    torchfree.save({"a": np.arange(6, dtype=np.float32), "b": np.ones(3, np.float32)}, buf)
    data = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = [i for i in z.infolist() if i.filename.endswith("/data/1")][0]
    name = info.filename.encode()
    off = info.header_offset
    assert data[off:off + 4] == b"PK\x03\x04" and data[off + 30:off + 30 + len(name)] == name
    bad_name = data[:off + 30 + len(name) - 1] + b"7" + data[off + 30 + len(name):]
    bad_sig = data[:off] + b"PK\x03\x05" + data[off + 4:]
    long_name = data[:off + 26] + struct.pack("<H", len(name) + 1) + data[off + 28:]
    for bad, match in ((bad_name, "name differs"), (bad_sig, "no local header signature"),
                       (long_name, "name length")):
        if how == "bytes":
            call = lambda: torchfree.load(bad)  # noqa: E731
        else:
            p = tmp_path / f"bad_{how}.pt"
            p.write_bytes(bad)
            call = lambda: torchfree.load(str(p), mmap=how == "mmap")  # noqa: E731
        with pytest.raises(torchfree.FormatError, match=match):
            call()


def test_big_endian_mmap_load_keeps_its_swaps(many, tmp_path):
    """A big-endian file's storages are byte-swapped in place in the (copy-on-write) mapping:
    such a load drops no page, or the swaps would be lost."""
    import ckpt_tools

    path, obj = many
    with open(path, "rb") as f:
        big = ckpt_tools.make_big_endian(f.read())
    p = tmp_path / "big.pt"
    p.write_bytes(big)
    _check(torchfree.load(str(p), mmap=True), obj)
    _check(torchfree.load(str(p)), obj)


def test_drop_pages_only_for_file_mappings(many):
    """The core's drop_pages option is optional, and ignored for a buffer that is not a file
    mapping (dropping pages of ordinary memory would zero them)."""
    from torchfree import _core, _load

    path, obj = many
    with open(path, "rb") as f:
        data = bytearray(f.read())
    opts = _load.options()
    for kw in ({}, {"drop_pages": True}):
        got = _core.load_zip(data, len(data), mode=0, require_map=False, **kw, **opts)  # mode 0: zero-copy views
        _check(got, obj)
        assert np.shares_memory(got["t0"], np.frombuffer(data, np.uint8))


def test_python_code_during_the_load_stops_dropping(tmp_path):
    """User code that runs while the load calls Python code (here a profile hook, on our helper
    that makes an Opaque) can see an array over the mapping and write to it: no page is dropped
    from then on, so the write stays."""
    import sys

    from test_core import P, archive, glob
    from test_fused import F32, TorchLike, dict_pickle

    w = TorchLike(1)
    pairs = [(f"p{i}", lambda i=i: w.tensor(str(i), 64, 0, (64,), (1,))[0]) for i in range(1200)]
    pairs.insert(600, ("obj", lambda: P(glob("mymod", "Thing"), b"(",
                                         w.tensor("t", 1024, 0, (1024,), (1,))[0], b"tR")))
    recs = {str(i): F32[:64].tobytes() for i in range(1200)}
    recs["t"] = F32[:1024].tobytes()
    p = tmp_path / "hooked.pt"
    p.write_bytes(archive(dict_pickle(pairs, w), recs))

    def hook(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "opaque_call":
            a = frame.f_locals["args"][0]
            a[:] = -7  # through the mapping (copy-on-write)

    sys.setprofile(hook)
    try:
        got = torchfree.load(str(p), mmap=True, weights_only=False)
    finally:
        sys.setprofile(None)
    assert isinstance(got["obj"], torchfree.Opaque)
    assert (got["obj"].args[0] == -7).all()
    for i in (0, 599, 600, 1199):
        np.testing.assert_array_equal(got[f"p{i}"], F32[:64])
    np.testing.assert_array_equal(torchfree.load(str(p), weights_only=False)["obj"].args[0], F32[:1024])
