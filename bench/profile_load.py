#!/usr/bin/env python3
"""Loop torchfree.load (or torch.load) over one benchmark fixture, for profilers.

    python bench/profile_load.py opt --mmap 1 --iters 50            # plain loop
    python bench/profile_load.py opt --cprofile                     # Python-level profile
    perf record -g -o /tmp/perf.data python bench/profile_load.py opt --iters 100
    perf report -i /tmp/perf.data --no-children --percent-limit 1

Fixtures are written by bench_load.py's generators into --dir (default
/tmp/torchfree-profile) and kept there for repeated use; delete them with
--clean.
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
import bench_load as B  # noqa: E402


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
    torch, err = B.import_torch()
    os.makedirs(a.dir, exist_ok=True)
    if a.fixture == "opt":
        nbytes = int((a.mb or 200) * 1e6)
        path = os.path.join(a.dir, f"opt_{a.tensors}_{nbytes}.pt")
        B.build_fixture(torch, path, {"v": B.FIXTURE_VERSION, "n": a.tensors, "bytes": nbytes},
                        lambda: B.make_opt_state(torch, a.tensors, nbytes))
    else:
        nbytes = int((a.mb or 2000) * 1e6)
        path = os.path.join(a.dir, f"llm_{nbytes}.pt")
        B.build_fixture(torch, path, {"v": B.FIXTURE_VERSION, "bytes": nbytes},
                        lambda: B.make_llm_state(torch, nbytes))
    B.warm_file(path)
    if a.tool == "torchfree":
        tf, err = B.import_torchfree()
        if tf is None:
            print("torchfree not available:", err)
            return 2
        fn = lambda: tf.load(path, mmap=bool(a.mmap))  # noqa: E731
    else:
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
