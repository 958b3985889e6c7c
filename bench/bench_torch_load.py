#!/usr/bin/env python3
"""torchfree.torch.load against torch.load (default arguments, and mmap=True).

    python bench/bench_torch_load.py [--quick] [--runs N] [--dir D --keep] [--cuda]

Fixtures are those of bench/suite.py: the 50,000-tensor Adam state and the 2 GB LLM-like
state_dict (bench/_llm.py). Every tool runs in the same process, round-robin, with one
untimed warm-up each; the file is warm in the page cache; the garbage collector is off in the
timed region; results are kept alive until the clock stops. Each tool's result is checked
once against torch.load's (every tensor: dtype, shape, stride, offset, bytes).

Targets (issue 8): 50k-tensor state >= 10x faster than torch.load (default and mmap=True);
2 GB state_dict >= 1.5x faster than both. --cuda adds map_location="cuda:0" rows
(target: <= 0.15 s for a 2.4 GB bf16 state_dict), only where CUDA is available.
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# an in-place build (setup.py build_ext --inplace) is used when there is one, else the installed package
_PYEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyext")
if not os.environ.get("TORCHFREE_BENCH_INSTALLED") and glob.glob(os.path.join(_PYEXT, "torchfree", "_core*.so")):
    sys.path.insert(1, _PYEXT)

import torch  # noqa: E402

import torchfree.torch as tft  # noqa: E402
from _llm import llm_layout  # noqa: E402
from suite import make_flat, make_optim, to_torch, warm as warm_file  # noqa: E402


def build_fixture(torch, path, key, make):
    """torch.save(make(), path) unless path exists (``--dir D --keep`` reuses fixtures)."""
    if not os.path.exists(path):
        torch.save(make(), path)


def make_opt_state(torch, n, nbytes):
    return to_torch(make_optim(n, nbytes))


def make_llm_state(torch, nbytes):
    return to_torch(make_flat(llm_layout(nbytes), 1))


def tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tensors(v, out)
    return out


def check_same(a, b):
    ta, tb = tensors(a, []), tensors(b, [])
    assert len(ta) == len(tb), (len(ta), len(tb))
    for x, y in zip(ta, tb):
        assert type(x) is type(y) and x.dtype == y.dtype and x.shape == y.shape
        assert x.stride() == y.stride() and x.storage_offset() == y.storage_offset()
        assert torch.equal(x.cpu().view(torch.uint8) if x.dim() else x.cpu().reshape(1).view(torch.uint8),
                           y.cpu().view(torch.uint8) if y.dim() else y.cpu().reshape(1).view(torch.uint8))


def bench(tools, runs):
    times = {name: [] for name, _ in tools}
    ref = None
    for name, fn in tools:  # warm-up and check
        r = fn()
        if ref is None:
            ref = r
        else:
            check_same(ref, r)
        del r
        gc.collect()
    del ref
    gc.collect()
    for _ in range(runs):
        for name, fn in tools:
            gc.disable()
            t0 = time.perf_counter_ns()
            r = fn()
            t1 = time.perf_counter_ns()
            gc.enable()
            times[name].append((t1 - t0) / 1e6)
            del r
            gc.collect()
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def report(title, res, targets):
    print(f"\n### {title}\n")
    print("| tool | median ms | min ms |")
    print("|---|---:|---:|")
    for k, (med, mn) in res.items():
        print(f"| {k} | {med:,.1f} | {mn:,.1f} |")
    for a, b, factor in targets:
        ratio = res[b][0] / res[a][0]
        print(f"- {a} vs {b}: {ratio:.1f}x faster (target >= {factor}x): {'OK' if ratio >= factor else 'MISSED'}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", choices=("1", "2"))
    ap.add_argument("--cuda", action="store_true")
    args = ap.parse_args()
    n, s1, s2 = (5000, 20 << 20, 200 << 20) if args.quick else (50000, 200 << 20, 2000 << 20)
    d = args.dir or tempfile.mkdtemp(prefix="tf-torch-bench-")
    os.makedirs(d, exist_ok=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    try:
        if args.only in (None, "1"):
            p1 = os.path.join(d, f"opt_{n}.pt")
            build_fixture(torch, p1, [n, s1], lambda: make_opt_state(torch, n, s1))
            warm_file(p1)
            res = bench([
                ("torchfree.torch.load", lambda: tft.load(p1)),
                ("torchfree.torch.load(mmap=True)", lambda: tft.load(p1, mmap=True)),
                ("torchfree.torch.load(mmap=False)", lambda: tft.load(p1, mmap=False)),
                ("torch.load", lambda: torch.load(p1)),
                ("torch.load(mmap=True)", lambda: torch.load(p1, mmap=True)),
            ], args.runs)
            report(f"{n}-tensor optimizer state ({os.path.getsize(p1) >> 20} MB)", res,
                   [("torchfree.torch.load", "torch.load", 10),
                    ("torchfree.torch.load(mmap=True)", "torch.load(mmap=True)", 10)])
            if not args.keep and not args.dir:
                os.unlink(p1)
        if args.only in (None, "2"):
            p2 = os.path.join(d, f"llm_{s2 >> 20}.pt")
            build_fixture(torch, p2, [s2], lambda: make_llm_state(torch, s2))
            warm_file(p2)
            tools = [
                ("torchfree.torch.load", lambda: tft.load(p2)),
                ("torchfree.torch.load(mmap=True)", lambda: tft.load(p2, mmap=True)),
                ("torchfree.torch.load(mmap=False)", lambda: tft.load(p2, mmap=False)),
                ("torch.load", lambda: torch.load(p2)),
                ("torch.load(mmap=True)", lambda: torch.load(p2, mmap=True)),
            ]
            if args.cuda and torch.cuda.is_available():
                def sync(r):
                    torch.cuda.synchronize()
                    return r
                tools += [
                    ("torchfree.torch.load(cuda:0)", lambda: sync(tft.load(p2, map_location="cuda:0"))),
                    ("torch.load(cuda:0)", lambda: sync(torch.load(p2, map_location="cuda:0"))),
                    ("torch.load(cuda:0, mmap=True)", lambda: sync(torch.load(p2, map_location="cuda:0", mmap=True))),
                ]
            res = bench(tools, args.runs)
            report(f"LLM-like state_dict ({os.path.getsize(p2) >> 20} MB)", res,
                   [("torchfree.torch.load", "torch.load", 1.5),
                    ("torchfree.torch.load(mmap=True)", "torch.load(mmap=True)", 1.5)])
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
