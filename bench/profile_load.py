#!/usr/bin/env python3
"""Loop torchfree.load (or torch.load) over one benchmark fixture, for profilers.

    python bench/profile_load.py opt --mmap 1 --iters 50            # plain loop
    python bench/profile_load.py opt --cprofile                     # Python-level profile
    perf record -g -o /tmp/perf.data python bench/profile_load.py opt --iters 100
    perf report -i /tmp/perf.data --no-children --percent-limit 1

Fixtures are written by suite.py's generators (with torch.save when torch is
installed, else torchfree.save) into --dir (default /tmp/torchfree-profile) and
kept there for repeated use; delete them with --clean. For instruction counts:

    valgrind --tool=callgrind --toggle-collect=mod_load_zip \
        python bench/profile_load.py opt --iters 1     # 2 loads: the warm-up and one timed

"""

import argparse
import cProfile
import gc
import os
import pstats
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite as S  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("fixture", choices=("opt", "llm"))
    p.add_argument("--tool", choices=("torchfree", "torch"), default="torchfree")
    p.add_argument("--mmap", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tensors", type=int, default=50_000)
    p.add_argument("--mb", type=float, default=None)
    p.add_argument("--dir", default="/tmp/torchfree-profile")
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--clean", action="store_true", help="delete --dir and exit")
    a = p.parse_args()
    if a.clean:
        shutil.rmtree(a.dir, ignore_errors=True)
        return 0
    torch = S.torch
    os.makedirs(a.dir, exist_ok=True)
    if a.fixture == "opt":
        nbytes = int((a.mb or 200) * 1e6)
        path = os.path.join(a.dir, f"opt_{a.tensors}_{nbytes}.pt")
        make = lambda: S.make_optim(a.tensors, nbytes)  # noqa: E731
    else:
        nbytes = int((a.mb or 2000) * 1e6)
        path = os.path.join(a.dir, f"llm_{nbytes}.pt")
        make = lambda: S.make_flat(S.llm_layout(nbytes), 1)  # noqa: E731
    if not os.path.exists(path):
        obj = make()
        if torch is not None:
            torch.save(S.to_torch(obj), path + ".tmp")
        else:
            S.torchfree.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    S.warm(path)
    if a.tool == "torchfree":
        tf = S.torchfree
        fn = lambda: tf.load(path, mmap=bool(a.mmap))  # noqa: E731
    else:
        if torch is None:
            print("torch is not installed")
            return 2
        fn = lambda: torch.load(path, weights_only=True, mmap=bool(a.mmap))  # noqa: E731
    fn()  # warm-up
    prof = cProfile.Profile() if a.cprofile else None
    times = []
    for _ in range(a.iters):
        gc.collect()
        gc.disable()
        if prof:
            prof.enable()
        t0 = time.perf_counter_ns()
        r = fn()
        t1 = time.perf_counter_ns()
        if prof:
            prof.disable()
        gc.enable()
        del r
        times.append((t1 - t0) / 1e6)
    times.sort()
    print(f"{a.tool} mmap={bool(a.mmap)} {path}: median {times[len(times) // 2]:.3f} ms, "
          f"min {times[0]:.3f} ms over {a.iters}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
