"""Speed-up of two threads over one on copy loads (mmap=False), whose reads run with the GIL released.

    python bench/bench_threads.py [--mib 48] [--loads 20]

Writes a checkpoint of --mib MiB in 8 float32 tensors (below the 64 MiB at which one load
starts reading with several threads of its own, so each load is one reading thread), twice:
with stored records (a copy load is then pread from the page cache: bound by memory
bandwidth) and with deflated records (a copy load inflates: bound by the CPU). Each is loaded
--loads times in one thread, then --loads times in each of two threads at once; both
throughputs and their ratio are printed, with what the machine gives two processes (a shared
VM may give much less than 2x). Then a Python thread ticking every 0.5 ms runs beside single
loads: its longest stall shows whether a load ever holds the GIL for long (a call holding it
throughout stalls the ticker for its whole length). Nothing here is asserted by the tests (tests/test_threads.py checks the results).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# an in-place build (setup.py build_ext --inplace) is used when there is one, else the installed package
_PYEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyext")
if not os.environ.get("TORCHFREE_BENCH_INSTALLED") and glob.glob(os.path.join(_PYEXT, "torchfree", "_core*.so")):
    sys.path.insert(1, _PYEXT)
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


def max_gil_gap(fn, reps=5):
    """Longest wait (ms) of a Python thread ticking every 0.5 ms while fn runs, and fn's time (ms).

    A call that held the GIL throughout would stall the ticker for its whole length."""
    stop = threading.Event()
    gaps = []

    def ticker():
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.0005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    per_call = (time.perf_counter() - t0) / reps
    stop.set()
    t.join()
    return 1000 * max(gaps), 1000 * per_call


def machine_parallelism(seconds=1.5) -> float:
    """Throughput of two spinning processes over one: what the machine gives two threads at best."""
    import subprocess

    code = ("import time\nt0=time.perf_counter(); n=0\n"
            f"while time.perf_counter()-t0 < {seconds}: n+=1\nprint(n)")
    one = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    ps = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    two = sum(int(p.communicate()[0]) for p in ps)
    return two / one


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=48)
    ap.add_argument("--loads", type=int, default=20)
    args = ap.parse_args(argv)
    n = args.mib * (1 << 20) // 4 // 8
    rng = np.random.default_rng(0)
    # values that deflate a little (like real weights): random mantissas, few exponents
    obj = {f"layer{i}.weight": rng.standard_normal(n).astype(np.float32) for i in range(8)}
    print(f"{os.cpu_count()} CPUs, {args.loads} copy loads (mmap=False) per thread; two spinning processes "
          f"get {machine_parallelism():.2f}x the throughput of one here (the best two threads can do)")
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
        big = bytes(300_000_000)
        print("longest stall of a Python thread ticking every 0.5 ms, during (ms stall / ms call):")
        print("  bytes.count over 300 MB (holds the GIL): %.0f / %.0f" % max_gil_gap(lambda: big.count(b"x"), 3))
        for label, path in (("stored", stored), ("deflated", deflated)):
            print(f"  a copy load of {label} records:          " + "%.0f / %.0f" % max_gil_gap(
                lambda: torchfree.load(path, mmap=False)))


if __name__ == "__main__":
    main()
