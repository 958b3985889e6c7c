"""Speed-up of two threads over one on copy loads (mmap=False), whose reads run with the GIL released.

    python bench/bench_threads.py [--mib 48] [--loads 20]

Writes a checkpoint of --mib MiB in 8 float32 tensors (below the 64 MiB at which one load
starts reading with several threads of its own, so each load is one reading thread), loads it
--loads times in one thread, then --loads times in each of two threads at once, and prints
both throughputs and their ratio. The file is in the page cache: this measures copying, not
the disk. Nothing here is asserted by the tests (tests/test_threads.py checks the results).
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=48)
    ap.add_argument("--loads", type=int, default=20)
    args = ap.parse_args()
    n = args.mib * (1 << 20) // 4 // 8
    obj = {f"layer{i}.weight": np.random.default_rng(i).standard_normal(n, dtype=np.float32) for i in range(8)}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bench.pt"
        torchfree.save(obj, path)
        size = os.path.getsize(path)
        for _ in range(3):
            torchfree.load(path, mmap=False)  # warm the page cache
        t1 = run(path, 1, args.loads)
        t2 = run(path, 2, args.loads)
    mib = size / (1 << 20)
    one = args.loads * mib / t1
    two = 2 * args.loads * mib / t2
    print(f"file {mib:.0f} MiB, {os.cpu_count()} CPUs, {args.loads} copy loads per thread")
    print(f"1 thread : {t1:6.2f} s  {one:7.0f} MiB/s")
    print(f"2 threads: {t2:6.2f} s  {two:7.0f} MiB/s")
    print(f"speed-up of 2 threads over 1: {two / one:.2f}x")


if __name__ == "__main__":
    main()
