"""Threads: many threads loading, scanning, opening, saving and walking pickles, on the same and
on different files at once, get exactly the single-threaded results (values, errors and their
messages). Timing is never asserted: bench/bench_threads.py measures the speed-up of copy
loads, whose reads run with the GIL released. Torch-free."""

from __future__ import annotations

import hashlib
import io
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import torchfree
from torchfree import _core

HERE = Path(__file__).resolve().parent
FILES = sorted((HERE / "data").glob("*.pt"))
HOSTILE = HERE / "hostile"
ERROR_FILES = ["global_os_system.pt", "view_past_storage.pt", "memo_long_binput_2e31.pt",
               "zip_bomb_declared_small.pt", "zip_overlapping_records.pt", "huge_ndim.pt"]


def digest(obj) -> str:
    """A stable fingerprint of a loaded object: structure, dtypes, shapes, strides, bytes."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, np.ndarray):
            h.update(f"A{o.dtype.str}{o.shape}{o.strides}".encode())
            h.update(np.ascontiguousarray(o).tobytes())
        elif isinstance(o, dict):
            h.update(f"D{type(o).__name__}{len(o)}".encode())
            for k, v in o.items():
                h.update(repr(k).encode())
                walk(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"L{type(o).__name__}{len(o)}".encode())
            for v in o:
                walk(v)
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


def read_all(path, **kw):
    with torchfree.open(path, **kw) as ck:
        return digest({k: ck[k] for k in ck.keys()})


def error_of(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except torchfree.CheckpointError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def data_pkl(path):
    with zipfile.ZipFile(path) as z:
        return z.read([n for n in z.namelist() if n.endswith("data.pkl")][0])


SAVE_OBJ = {"w": np.arange(4096, dtype=np.float32).reshape(64, 64), "b": np.ones(64, np.float64),
            "step": 7, "names": ["a", "b"]}


def save_bytes(obj=SAVE_OBJ) -> bytes:
    buf = io.BytesIO()
    torchfree.save(obj, buf)
    return buf.getvalue()


def tasks():
    """(label, callable) pairs whose results must not depend on threading."""
    out = []
    for p in FILES:
        out += [(f"load {p.name}", lambda p=p: digest(torchfree.load(p))),
                (f"load copy {p.name}", lambda p=p: digest(torchfree.load(p, mmap=False))),
                (f"load bytes {p.name}", lambda p=p: digest(torchfree.load(p.read_bytes()))),
                (f"scan {p.name}", lambda p=p: torchfree.scan(p).to_json()),
                (f"open {p.name}", lambda p=p: read_all(p)),
                (f"open copy {p.name}", lambda p=p: read_all(p, mmap=False))]
        if zipfile.is_zipfile(p):  # (legacy streams have no data.pkl)
            out.append((f"pickle_globals {p.name}", lambda p=p: _core.pickle_globals(data_pkl(p))))
    for name in ERROR_FILES:
        out += [(f"error {name}", lambda n=name: error_of(torchfree.load, HOSTILE / n)),
                (f"scan error {name}", lambda n=name: error_of(torchfree.scan, HOSTILE / n))]
    if hasattr(torchfree, "save"):
        out += [("save", save_bytes),
                ("save reloaded", lambda: digest(torchfree.load(save_bytes())))]
    return out


@pytest.fixture(scope="module")
def reference():
    return {label: fn() for label, fn in tasks()}


def test_many_threads_same_and_different_files(reference):
    work = tasks() * 6  # every task 6 times, interleaved over 8 threads
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: (t[0], t[1]()), work))
    for label, got in results:
        assert got == reference[label], label


def test_many_threads_one_file(reference):
    path = FILES[0]
    label = f"load copy {path.name}"
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: digest(torchfree.load(path, mmap=False)), range(64)))
    assert set(got) == {reference[label]}


@pytest.mark.skipif(not hasattr(torchfree, "save"), reason="torchfree.save is not in this build yet")
def test_save_while_other_threads_load_the_same_arrays(tmp_path, reference):
    """Arrays of one mapped file are saved by some threads while others load that file."""
    src = FILES[0]
    loaded = torchfree.load(src)
    want = digest(loaded)

    def save_one(i):
        out = tmp_path / f"copy{i % 4}_{i}.pt"
        torchfree.save(loaded, out)
        return digest(torchfree.load(out))

    def load_one(i):
        return digest(torchfree.load(src, mmap=(None, False)[i % 2]))

    with ThreadPoolExecutor(8) as pool:
        saves = pool.map(save_one, range(24))
        loads = pool.map(load_one, range(24))
        assert set(saves) == {want} and set(loads) == {want}
