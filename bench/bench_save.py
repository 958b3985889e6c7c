#!/usr/bin/env python3
"""Save benchmark for torchfree.

    python bench/bench_save.py [--mb 2000] [--runs 7] [--dir D] [--many N] [--json FILE] [--strict]

Builds an LLM-like numpy state_dict of about --mb megabytes (LLaMA-like dims: bfloat16 and
float16 weight matrices alternating by layer, float32 biases and norms; the same shapes as
bench_load.py's "2 GB model"), then times, in one process and interleaved run by run:

  baseline  write        one write() call of the same number of bytes (the saved file's own
                         bytes, held in memory) to a fresh file; close
  baseline  write+fsync  the same, then fsync
  torchfree.save(atomic=False)   no fsync (as torch.save)
  torchfree.save()               atomic: temporary file, fsync, rename, fsync of the directory
  torch.save                     of the same tensors (torch.from_numpy views, no copy), no fsync
  torch.save + fsync             torch.save into a file object, then fsync (reference)

Every target file is deleted and os.sync() is called outside the timed region before each
run, so every run writes a fresh file with no dirty pages pending. The table shows the
median and minimum of --runs runs.

Targets (from the issue): torchfree.save <= 1.1x the one-write baseline, both without fsync
and both with fsync; and faster than torch.save of the same tensors.

--many N adds a second scenario: an optimizer-like state of N small float32 tensors
(per-tensor overhead: pickling, headers), torchfree.save vs torch.save (both no fsync).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

from _llm import llm_config, llm_layout  # bench/ is on sys.path when a bench script runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "pyext"))

import ml_dtypes  # noqa: E402

import torchfree  # noqa: E402

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None


def llm_state(total_bytes: int, seed=1):
    h, inter, vocab, kv, layers = llm_config(total_bytes)
    rng = np.random.default_rng(seed)
    bf16, f16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)

    def w(shape, dtype):
        # random bits (fast to make); the writer does not care about values
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return rng.integers(0, 256, n, dtype=np.uint8).view(dtype).reshape(shape)

    dtypes = {"bf16": bf16, "f16": f16, "f32": np.dtype(np.float32)}
    sd = collections.OrderedDict()
    for name, shape, kind in llm_layout(total_bytes):
        sd[name] = np.ones(shape, dtype=np.float32) if kind == "ones" else w(shape, dtypes[kind])
    return sd, dict(hidden=h, inter=inter, vocab=vocab, layers=layers)


def optimizer_state(n: int, seed=2):
    rng = np.random.default_rng(seed)
    state = {}
    for i in range(n // 2):
        shape = (int(rng.integers(1, 64)), int(rng.integers(1, 64)))
        state[i] = {"step": np.array(float(i), dtype=np.float32),
                    "exp_avg": rng.standard_normal(shape, dtype=np.float32)}
    return {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(n // 2))}]}


def to_torch(obj):
    """torch tensors over the same memory (torch.from_numpy; 16-bit floats via a view)."""
    if isinstance(obj, np.ndarray):
        if obj.dtype == np.dtype(ml_dtypes.bfloat16):
            return torch.from_numpy(obj.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        out = type(obj)()
        for k, v in obj.items():
            out[k] = to_torch(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_torch(v) for v in obj)
    return obj


# ---- the tools -------------------------------------------------------------------------------


def write_once(path, buf, fsync):
    with open(path, "wb", buffering=0) as f:
        n = f.write(buf)
        assert n == len(buf), "a single write() call wrote less than asked (file over 2 GiB?)"
        if fsync:
            os.fsync(f.fileno())


def write_chunks(path, buf, fsync, chunk=8 << 20):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        for off in range(0, len(buf), chunk):
            view = buf[off: off + chunk]
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def torch_save(path, tobj, fsync):
    if not fsync:
        torch.save(tobj, path)
        return
    with open(path, "wb") as f:
        torch.save(tobj, f)
        f.flush()
        os.fsync(f.fileno())


def timed(fn):
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def run_scenario(title, tools, runs, warmup, out_dir):
    """tools: [(name, fn(path))]; interleaved runs; returns {name: [seconds]}."""
    times = {name: [] for name, _ in tools}
    for r in range(warmup + runs):
        for name, fn in tools:
            path = os.path.join(out_dir, "target.pt")
            if os.path.exists(path):
                os.unlink(path)
            os.sync()
            dt = timed(lambda: fn(path))
            if r >= warmup:
                times[name].append(dt)
            os.unlink(path)
    print(f"\n### {title}\n")
    print("| tool | median ms | min ms | runs | ratio to baseline (median) |")
    print("|---|---:|---:|---:|---:|")
    base = None
    for name, _ in tools:
        med = statistics.median(times[name])
        if base is None or name.startswith("baseline"):
            base = med if name.startswith("baseline") or base is None else base
        print(f"| {name} | {med * 1e3:,.1f} | {min(times[name]) * 1e3:,.1f} | {len(times[name])} | "
              f"{med / base:.2f}x |")
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=2000, help="size of the state_dict in MB (default 2000)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--many", type=int, default=0, help="also time N small tensors (e.g. 50000)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args()

    out_dir = tempfile.mkdtemp(prefix="tf_bench_save_", dir=args.dir)
    use_torch = torch is not None and not args.no_torch
    results, checks = {}, []
    try:
        sd, dims = llm_state(args.mb * 1_000_000)
        nbytes = sum(a.nbytes for a in sd.values())
        ref = os.path.join(out_dir, "ref.pt")
        torchfree.save(sd, ref)
        with open(ref, "rb") as f:
            file_bytes = np.empty(os.path.getsize(ref), dtype=np.uint8)
            f.readinto(file_bytes)
        os.unlink(ref)
        print(f"# torchfree save benchmark\n\n{platform.platform()}, {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}, numpy {np.__version__}"
              + (f", torch {torch.__version__}" if use_torch else "")
              + f"\n\nstate_dict: {len(sd)} arrays, {nbytes / 1e9:.2f} GB ({dims}); file {file_bytes.nbytes / 1e9:.3f} GB;"
              f" {args.runs} runs (+{args.warmup} warm-up), interleaved; medians")
        tobj = to_torch(sd) if use_torch else None
        buf = memoryview(file_bytes)

        tools = [
            ("baseline: one write() of the same bytes", lambda p: write_once(p, buf, False)),
            ("reference: the same bytes in 8 MB write()s", lambda p: write_chunks(p, buf, False)),
            ("torchfree.save(atomic=False)", lambda p: torchfree.save(sd, p, atomic=False)),
        ]
        if use_torch:
            tools.append(("torch.save", lambda p: torch_save(p, tobj, False)))
        t1 = run_scenario("1a. 2 GB state_dict, no fsync", tools, args.runs, args.warmup, out_dir)
        tools = [
            ("baseline: one write() of the same bytes + fsync", lambda p: write_once(p, buf, True)),
            ("reference: the same bytes in 8 MB write()s + fsync", lambda p: write_chunks(p, buf, True)),
            ("torchfree.save() (atomic: fsync, rename, fsync dir)", lambda p: torchfree.save(sd, p)),
        ]
        if use_torch:
            tools.append(("torch.save + fsync", lambda p: torch_save(p, tobj, True)))
        t2 = run_scenario("1b. 2 GB state_dict, with fsync", tools, args.runs, args.warmup, out_dir)
        results["llm_nofsync"] = t1
        results["llm_fsync"] = t2

        med = {k: statistics.median(v) for k, v in {**t1, **t2}.items()}
        r1 = med["torchfree.save(atomic=False)"] / med["baseline: one write() of the same bytes"]
        r2 = (med["torchfree.save() (atomic: fsync, rename, fsync dir)"]
              / med["baseline: one write() of the same bytes + fsync"])
        checks.append(("save <= 1.1x one write(), no fsync", r1 <= 1.1, f"{r1:.3f}x"))
        checks.append(("save <= 1.1x one write(), with fsync", r2 <= 1.1, f"{r2:.3f}x"))
        r1c = med["torchfree.save(atomic=False)"] / med["reference: the same bytes in 8 MB write()s"]
        r2c = (med["torchfree.save() (atomic: fsync, rename, fsync dir)"]
               / med["reference: the same bytes in 8 MB write()s + fsync"])
        checks.append(("(reference) save vs 8 MB write()s, no fsync", True, f"{r1c:.3f}x"))
        checks.append(("(reference) save vs 8 MB write()s, with fsync", True, f"{r2c:.3f}x"))
        if use_torch:
            r3 = med["torch.save"] / med["torchfree.save(atomic=False)"]
            r4 = med["torch.save + fsync"] / med["torchfree.save() (atomic: fsync, rename, fsync dir)"]
            checks.append(("save faster than torch.save, no fsync", r3 > 1, f"torch.save is {r3:.2f}x slower"))
            checks.append(("save faster than torch.save, with fsync", r4 > 1, f"torch.save is {r4:.2f}x slower"))
        del tobj, buf, file_bytes, sd
        gc.collect()

        if args.many:
            opt = optimizer_state(args.many)
            topt = to_torch(opt) if use_torch else None
            tools = [("torchfree.save(atomic=False)", lambda p: torchfree.save(opt, p, atomic=False))]
            if use_torch:
                tools.append(("torch.save", lambda p: torch_save(p, topt, False)))
            t3 = run_scenario(f"2. optimizer state, {args.many} tensors, no fsync", tools, args.runs, args.warmup,
                              out_dir)
            results["many"] = t3
            if use_torch:
                r5 = statistics.median(t3["torch.save"]) / statistics.median(t3["torchfree.save(atomic=False)"])
                checks.append((f"{args.many} tensors: faster than torch.save", r5 > 1, f"torch.save is {r5:.1f}x slower"))

        print("\n### Checks\n")
        for name, ok, detail in checks:
            print(f"- {'PASS' if ok else 'FAIL'}: {name} ({detail})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"results": results, "checks": [(n, bool(o), d) for n, o, d in checks]}, f, indent=1)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if args.strict and not all(ok for _, ok, _ in checks):
        sys.exit(1)


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main()
