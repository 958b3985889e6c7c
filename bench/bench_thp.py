"""Copy loads of fresh memory under fragmented memory: transparent huge pages (issue 19, item 13).

    python bench/bench_thp.py DIR [--runs 9] [--states normal,filled] [--fill-free-mb 1500]

DIR holds fixtures made by `bench/suite.py --only llm,optim --dir DIR --keep` (llm.pt,
llm-legacy.pt, optim.pt, optim-legacy.pt: those present are used). Every round times, in a
shuffled order, on each fixture:

* `torchfree.load(mmap=False)`: as built (fresh buffers of >= 4 MB keep numpy's huge pages while
  /proc/buddyinfo shows free 2 MB blocks for them, else get small pages; src/storage.c)
* the same with huge pages always (`_core._thp_probe(1 << 62)`: the budget never runs out, which
  is the code path before item 13: numpy's MADV_HUGEPAGE on every buffer)
* `torch.load` (weights_only=True, the default) as the baseline

under each memory state: `normal` (as the machine is), and `filled`: before every timed call the
page cache is topped up with 4 kB pages (1-byte preads of a sparse file, POSIX_FADV_RANDOM, so no
readahead folios) until MemFree is `--fill-free-mb`; a fault of a MADV_HUGEPAGE buffer then has
to reclaim and compact (THP defrag=madvise) as on a machine whose page cache has filled memory.
The sparse file takes no disk space and is deleted at the end (its cache with it). Prints
median, min and max ms per row, and the /proc/vmstat compaction counters each row added.
"""
import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pyext"))
import torchfree  # noqa: E402
from torchfree import _core  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

VM_KEYS = ("compact_stall", "thp_fault_alloc", "thp_fault_fallback", "allocstall_normal", "allocstall_movable")


def vmstat():
    d = {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k in VM_KEYS:
                d[k] = int(v)
    return d


def mem_free_mb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemFree:"):
                return int(line.split()[1]) // 1024
    return 0


class Filler:
    def __init__(self, target_mb):
        self.target = target_mb
        fd, self.path = tempfile.mkstemp(prefix="thp-fill-", dir="/tmp")
        os.ftruncate(fd, 1 << 40)  # sparse: no blocks
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.fd, self.off = fd, 0

    def top_up(self):
        while True:
            free = mem_free_mb()
            if free <= self.target:
                return
            pages = min(free - self.target, 1024) * 256
            o, fd = self.off, self.fd
            for i in range(pages):
                os.pread(fd, 1, o + (i << 12))
            self.off = o + (pages << 12)
            if self.off >= (1 << 40) - (1 << 32):
                self.off = 0

    def close(self):
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(self.fd)
        os.unlink(self.path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--states", default="normal,filled")
    ap.add_argument("--fill-free-mb", type=int, default=1500)
    ap.add_argument("--fixtures", default="llm-legacy,llm,optim,optim-legacy")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    def tf_auto(p):
        _core._thp_probe(-1)
        return torchfree.load(p, mmap=False)

    def tf_huge(p):
        _core._thp_probe(1 << 62)
        try:
            return torchfree.load(p, mmap=False)
        finally:
            _core._thp_probe(-1)

    tools = [("torchfree.load(mmap=False)", tf_auto), ("  same, huge pages always (before)", tf_huge)]
    if torch is not None and not args.no_torch:
        tools.append(("torch.load (default)", lambda p: torch.load(p)))
    fixtures = [f for f in args.fixtures.split(",") if os.path.exists(os.path.join(args.dir, f + ".pt"))]
    for f in fixtures:  # warm the page cache of the fixtures and each tool once
        p = os.path.join(args.dir, f + ".pt")
        for _, fn in tools:
            fn(p)
    print(f"THP enabled/defrag: {open('/sys/kernel/mm/transparent_hugepage/enabled').read().strip()} / "
          f"{open('/sys/kernel/mm/transparent_hugepage/defrag').read().strip()}; budget now "
          f"{_core._thp_probe()}; load average {os.getloadavg()}", flush=True)
    for state in args.states.split(","):
        filler = Filler(args.fill_free_mb) if state == "filled" else None
        times = {(f, t): [] for f in fixtures for t, _ in tools}
        counters = {(f, t): dict.fromkeys(VM_KEYS, 0) for f in fixtures for t, _ in tools}
        try:
            for r in range(args.runs):
                order = [(f, t, fn) for f in fixtures for t, fn in tools]
                random.Random(r).shuffle(order)
                for f, t, fn in order:
                    p = os.path.join(args.dir, f + ".pt")
                    gc.collect()
                    if filler:
                        filler.top_up()
                    v0 = vmstat()
                    gc.disable()
                    t0 = time.perf_counter_ns()
                    res = fn(p)
                    dt = (time.perf_counter_ns() - t0) / 1e6
                    gc.enable()
                    v1 = vmstat()
                    del res
                    times[(f, t)].append(dt)
                    for k in VM_KEYS:
                        counters[(f, t)][k] += v1.get(k, 0) - v0.get(k, 0)
        finally:
            if filler:
                filler.close()
        print(f"\n### memory {state}" + (f" (page cache topped up to MemFree {args.fill_free_mb} MB before each call)"
                                          if filler else "") + f", {args.runs} rounds\n")
        print("| fixture | tool | median ms | min | max | compact_stall | thp_fault_alloc | thp_fault_fallback |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for f in fixtures:
            for t, _ in tools:
                x = times[(f, t)]
                c = counters[(f, t)]
                print(f"| {f} | {t} | {statistics.median(x):,.0f} | {min(x):,.0f} | {max(x):,.0f} | "
                      f"{c['compact_stall']:,} | {c['thp_fault_alloc']:,} | {c['thp_fault_fallback']:,} |",
                      flush=True)
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
