"""Speed-up of two threads over one on copy loads (mmap=False), whose reads run with the GIL released.

    python bench/bench_threads.py [--mib 48] [--loads 20]

Writes a checkpoint of --mib MiB in 8 float32 tensors (below the 64 MiB at which one load
starts reading with several threads of its own, so each load is one reading thread), twice:
with stored records (a copy load is then pread from the page cache: bound by memory
bandwidth) and with deflated records (a copy load inflates: bound by the CPU). Each is loaded
--loads times in one thread, then --loads times in each of two threads at once; both
throughputs and their ratio are printed. Then a pure-Python counting thread runs alongside
copy loads: the share of its solo speed it keeps shows how much of a load runs without the
GIL. Nothing here is asserted by the tests (tests/test_threads.py checks the results).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pyext"))
import torchfree  # noqa: E402


def run(path, threads: int, loads: int) -> float:
    start = threading.Barrier(threads + 1)

    def worker():
        start.wait()
        for _ in range(loads):
            torchfree.load(path, mmap=False)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def deflated_copy(src: Path, dst: Path) -> None:
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            info.compress_type = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            zout.writestr(info, data, compresslevel=1)


def counter_share(path, seconds=1.0) -> float:
    """Progress of a counting Python thread while another thread copy-loads, vs. alone."""
    def count(stop):
        n = 0
        while not stop.is_set():
            n += 1
        return n

    def timed_count(with_loads: bool) -> float:
        stop = threading.Event()
        box = []
        t = threading.Thread(target=lambda: box.append(count(stop)))
        loader_stop = threading.Event()

        def loads():
            while not loader_stop.is_set():
                torchfree.load(path, mmap=False)

        lt = threading.Thread(target=loads) if with_loads else None
        t.start()
        if lt:
            lt.start()
        time.sleep(seconds)
        stop.set()
        loader_stop.set()
        t.join()
        if lt:
            lt.join()
        return box[0]

    return timed_count(True) / timed_count(False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=48)
    ap.add_argument("--loads", type=int, default=20)
    args = ap.parse_args()
    n = args.mib * (1 << 20) // 4 // 8
    rng = np.random.default_rng(0)
    # values that deflate a little (like real weights): random mantissas, few exponents
    obj = {f"layer{i}.weight": rng.standard_normal(n).astype(np.float32) for i in range(8)}
    print(f"{os.cpu_count()} CPUs, {args.loads} copy loads (mmap=False) per thread")
    with tempfile.TemporaryDirectory() as d:
        stored = Path(d) / "stored.pt"
        torchfree.save(obj, stored)
        deflated = Path(d) / "deflated.pt"
        deflated_copy(stored, deflated)
        for label, path, loads in (("stored", stored, args.loads), ("deflated", deflated, max(args.loads // 8, 2))):
            size = os.path.getsize(path)
            for _ in range(2):
                torchfree.load(path, mmap=False)  # warm the page cache
            t1 = run(path, 1, loads)
            t2 = run(path, 2, loads)
            mib = args.mib
            one, two = loads * mib / t1, 2 * loads * mib / t2
            print(f"{label:8} records ({size / (1 << 20):.0f} MiB file): 1 thread {one:7.0f} MiB/s, "
                  f"2 threads {two:7.0f} MiB/s: speed-up {two / one:.2f}x")
        print(f"a Python thread keeps {100 * counter_share(stored):.0f}% of its speed beside stored copy loads, "
              f"{100 * counter_share(deflated):.0f}% beside deflated ones")


if __name__ == "__main__":
    main()
