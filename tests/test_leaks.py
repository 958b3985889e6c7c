"""No leaks: load, scan, open, save and pickle_globals repeated thousands of times, on success
and on every error path, leave no growth in tracemalloc, allocated blocks, RSS or (on a debug
CPython) the total reference count. Torch-free."""

from __future__ import annotations

import gc
import io
import os
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import torchfree
from torchfree import _core

HERE = Path(__file__).resolve().parent
HOSTILE = HERE / "hostile"
DATA = HERE / "data"
LEGACY_SAMPLES = [(DATA / "samples" / n).read_bytes() for n in ("legacy211.pt", "old_tar_format.pt")]
# fewer rounds on the sanitizer build, where every call is ~10x slower
SANITIZED = "asan" in os.environ.get("LD_PRELOAD", "")
ROUNDS = int(os.environ.get("TORCHFREE_LEAK_ROUNDS", "300" if SANITIZED else "1000"))
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """The resident set in bytes; 0 without /proc/self/statm (not Linux), where the RSS part of
    check_no_growth checks nothing and the tracemalloc, block and refcount parts still run."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except FileNotFoundError:
        return 0


def hostile(name: str) -> bytes:
    return (HOSTILE / name).read_bytes()


def expect(exc, fn, *a, **kw):
    try:
        fn(*a, **kw)
    except exc:
        return
    raise AssertionError(f"{fn.__name__} did not raise {exc.__name__}")


def check_no_growth(work, rounds=ROUNDS):
    """Run work() rounds times after a warm-up, twice; the second run may not grow anything.

    Growth in the first measured run can be one-off caches (interned strings, numpy's dtype
    caches); a leak grows both runs alike, so the second one is what is checked. RSS is not
    checked under AddressSanitizer, whose quarantine keeps freed memory resident by design."""
    for _ in range(max(rounds // 10, 20)):
        work()
    tracemalloc.start()
    marks = []
    for _ in range(3):
        gc.collect()
        marks.append((tracemalloc.get_traced_memory()[0], sys.getallocatedblocks(), rss(),
                      sys.gettotalrefcount() if hasattr(sys, "gettotalrefcount") else 0))
        if len(marks) < 3:
            for _ in range(rounds // 2):
                work()
    tracemalloc.stop()
    (_, _, _, _), (mem1, blocks1, rss1, refs1), (mem2, blocks2, rss2, refs2) = marks
    grown, blocks, rss_grown, refs = mem2 - mem1, blocks2 - blocks1, rss2 - rss1, refs2 - refs1
    half = rounds // 2
    # a leak of one object per call would be >= half blocks and >= 16 * half bytes
    assert grown < 24 * 1024, f"tracemalloc grew by {grown} bytes over {half} rounds"
    if blocks1:  # 0 under PYTHONMALLOC=malloc
        assert blocks < half // 4, f"{blocks} more allocated blocks after {half} rounds"
    if not SANITIZED:
        assert rss_grown < 8 << 20, f"RSS grew by {rss_grown >> 20} MiB over {half} rounds"
    assert refs < half // 4, f"total refcount grew by {refs} over {half} rounds"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("leaks")
    good = DATA / "train_ckpt.pt"
    deflated = DATA / "sd_views_deflated.pt"
    return {"good": good, "good_bytes": good.read_bytes(), "deflated": deflated, "dir": d}


ERRORS = {  # hostile file -> the exception load raises: one of each error path of the core
    "global_os_system.pt": torchfree.UnsafeGlobalError,
    "memo_long_binput_2e31.pt": torchfree.UnpicklingError,
    "setitem_on_list.pt": torchfree.UnpicklingError,
    "rebuild_tensor_v2_two_args.pt": torchfree.UnpicklingError,
    "view_past_storage.pt": torchfree.FormatError,
    "pid_numel_mismatch.pt": torchfree.FormatError,
    "shared_storage_conflicting_sizes.pt": torchfree.FormatError,
    "huge_ndim.pt": torchfree.LimitError,
    "global_name_5000.pt": torchfree.LimitError,
    "zip_bomb_declared_small.pt": torchfree.FormatError,
    "zip_overlapping_records.pt": torchfree.FormatError,
    "zip_local_header_outside.pt": torchfree.FormatError,
    "zip_encrypted_record.pt": torchfree.FormatError,
    "legacy_os_system.pt": torchfree.UnsafeGlobalError,
    "legacy_blob_short.pt": torchfree.FormatError,
    "legacy_pid_1e18.pt": torchfree.LimitError,
    "tar_numel_1e18.pt": torchfree.FormatError,
    "tar_storages_reduce.pt": torchfree.UnsafeGlobalError,
    "stack_global_os_system.pt": torchfree.UnsafeGlobalError,
    "binunicode_past_end.pt": torchfree.UnpicklingError,
    "torchscript_constants_os_system.pt": torchfree.UnsafeGlobalError,  # fails after data.pkl loaded
    "jit_build_intlist_of_str.pt": torchfree.UnpicklingError,
}


def test_load_success_paths_do_not_leak(files):
    good, blob = files["good"], files["good_bytes"]

    def work():
        torchfree.load(good)
        torchfree.load(good, mmap=False)
        torchfree.load(blob)
        torchfree.load(io.BytesIO(blob), map_location="meta")
        torchfree.load(files["deflated"], mmap=False)
        torchfree.load(good, map_location=lambda s, t: None)
        for old in LEGACY_SAMPLES:  # legacy stream and tar
            torchfree.load(old)
            torchfree.load(old, map_location=lambda s, t: None, weights_only=False)

    check_no_growth(work, ROUNDS // 2)


def test_load_error_paths_do_not_leak(files):
    blobs = {n: hostile(n) for n in ERRORS}

    def work():
        for name, exc in ERRORS.items():
            expect(exc, torchfree.load, blobs[name])
        expect(TypeError, torchfree.load, files["good_bytes"], map_location=5)
        expect(TypeError, torchfree.load, files["good_bytes"], limits={"nope": 1})
        expect(torchfree.LimitError, torchfree.load, files["good"], mmap=False, limits={"total_bytes": 10})
        expect(ValueError, torchfree.load, files["good"], map_location=lambda s, t: bytearray(1))

    check_no_growth(work)


def test_scan_and_open_do_not_leak(files):
    good, blob = files["good"], files["good_bytes"]
    blobs = {n: hostile(n) for n in ERRORS}

    def read_all(ck):
        with ck:
            for k in list(ck.keys()):
                ck[k]

    def work():
        torchfree.scan(good)
        torchfree.scan(blob)
        read_all(torchfree.open(good))
        read_all(torchfree.open(good, mmap=False))
        read_all(torchfree.open(io.BytesIO(blob)))
        for name in ("memo_long_binput_2e31.pt", "view_past_storage.pt", "zip_overlapping_records.pt",
                     "huge_ndim.pt", "pid_numel_mismatch.pt"):
            expect(torchfree.CheckpointError, torchfree.scan, blobs[name])
            expect(torchfree.CheckpointError, lambda b: read_all(torchfree.open(io.BytesIO(b))), blobs[name])
        expect(torchfree.FormatError, lambda: read_all(torchfree.open(io.BytesIO(blobs["zip_bomb_declared_small.pt"]))))

    check_no_growth(work, ROUNDS // 2)


def test_walk_and_info_objects_do_not_leak(files):
    import pickle

    from torchfree import _scan
    from torchfree._scan import TensorInfo

    good = files["good"]
    a = np.zeros(3, dtype="f4")
    cyc = [a]
    cyc.append(cyc)
    opaque = torchfree.Opaque("m", "C", args=(a,), state=({"x": a}, None))
    obj = {"c": cyc, "o": opaque, 7: (a, {"m": torchfree.MetaArray((2,), np.dtype("f2"))}), ("k", 1): cyc}
    deep = inner = []
    for _ in range(60):
        inner.append([])
        inner = inner[0]

    def work():
        torchfree.flatten(obj)
        expect(torchfree.LimitError, _scan._walk, deep, max_depth=50)
        with torchfree.open(good) as ck:
            names = list(ck.keys())
        with torchfree.open(good) as ck:
            ck[names[-1]]
            expect(KeyError, ck.__getitem__, names[-1] + ".nope")
        info = torchfree.scan(good)
        for t in info.tensors:
            t.shape, t.strides, t.stride, t.nbytes, t.numel, t.storage_offset
        info.records, info.storages, info.to_dict()
        t = info.tensors[0]
        assert pickle.loads(pickle.dumps(t)) == t and TensorInfo(*t._astuple()) == t
        expect(TypeError, TensorInfo, "x")

    check_no_growth(work, ROUNDS // 4)


def test_torchscript_does_not_leak():
    from test_torchscript import handbuilt_archive

    blob = handbuilt_archive()[0]

    def work():
        torchfree.load(blob)
        torchfree.load(blob, map_location="meta")
        torchfree.load(blob, map_location=lambda s, t: None)
        torchfree.scan(blob)
        with torchfree.open(io.BytesIO(blob)) as ck:
            for k in list(ck.keys()):
                ck[k]

    check_no_growth(work, ROUNDS // 2)


def test_pickle_globals_does_not_leak():
    good = (DATA / "train_ckpt.pt").read_bytes()
    import zipfile

    with zipfile.ZipFile(io.BytesIO(good)) as z:
        pk = z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])

    def work():
        _core.pickle_globals(pk)
        _core.pickle_globals(bytearray(pk))
        expect(torchfree.UnpicklingError, _core.pickle_globals, pk[:-1])
        expect(torchfree.LimitError, _core.pickle_globals, pk, limits={"memo": 1})
        expect(TypeError, _core.pickle_globals, pk, limits={"x": 1})

    check_no_growth(work, ROUNDS * 2)


@pytest.mark.skipif(not hasattr(torchfree, "save"), reason="torchfree.save is not in this build yet")
def test_save_does_not_leak(files):
    obj = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "v": np.arange(12, dtype=np.float32)[2:5],
           "meta": {"epoch": 3, "name": "x", "lr": [0.1, 0.01]}}
    target = files["dir"] / "saved.pt"

    def work():
        buf = io.BytesIO()
        torchfree.save(obj, buf)
        torchfree.save(obj, target)
        expect(TypeError, torchfree.save, {"bad": object()}, io.BytesIO())
        expect(ValueError, torchfree.save, obj, io.BytesIO(), pickle_protocol=4)

    check_no_growth(work, ROUNDS // 2)
