#!/usr/bin/env python3
"""scan / `torchfree info` benchmark.

Writes a ~2 GB checkpoint with torch.save (a few hundred float16 / float32 tensors, LLaMA-like
names) into a temporary directory, then, in the same run:

1. times ``torchfree.scan(path)`` against ``torchfree.load(path, mmap=False)`` (a load that copies
   every byte), in this process, median of --runs (after one warm-up each).
   Target: scan < 1% of the copying load.
2. times the whole process ``python -m torchfree info FILE`` (and the ``torchfree`` console script
   when one is on PATH) against ``python -c "import numpy"``, median of --runs subprocesses each.
   Target: torchfree info <= 2x import numpy.
3. reports the biggest import costs of ``python -X importtime -c "import torchfree"``.

Prints a markdown table with the ratios and PASS/FAIL per target.

    python bench/bench_scan.py [--size-mb 2048] [--runs 7] [--dir D --keep] [--strict]

The page cache is not dropped (that needs root): the file is read once after it is written and
every tool gets a warm-up, so the numbers are for a file warm in the page cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_torchfree():
    try:
        import torchfree  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.join(REPO, "pyext"))
        import torchfree  # noqa: F401
    return sys.modules["torchfree"]


def child_env(tf) -> dict:
    """Environment for subprocesses: they import the same torchfree as this process."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(tf.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


# ---- fixture --------------------------------------------------------------------------------


def make_state(torch, total_bytes: int) -> OrderedDict:
    """LLaMA-like state_dict of about total_bytes: fp16 matrices, fp32 norms/biases."""
    h, inter, vocab = 2048, 5632, 32000
    if total_bytes < 500_000_000:
        h, inter, vocab = 512, 1408, 8000
    kv = h // 4
    per_layer = 2 * (2 * h * h + 2 * kv * h + 3 * inter * h)
    fixed = 2 * 2 * vocab * h
    layers = max(1, round((total_bytes - fixed) / per_layer))
    g = torch.Generator().manual_seed(0)

    def w(shape, dtype):
        return torch.empty(shape, dtype=dtype).uniform_(-0.05, 0.05, generator=g)

    sd = OrderedDict()
    sd["model.embed_tokens.weight"] = w((vocab, h), torch.float16)
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)),
                            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, h)),
                            ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter))):
            sd[p + name + ".weight"] = w(shape, torch.float16)
        for name in ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"):
            sd[p + name] = w((h if "q_proj" in name else kv,), torch.float32)
        sd[p + "input_layernorm.weight"] = torch.ones(h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h)
    sd["model.norm.weight"] = torch.ones(h)
    sd["lm_head.weight"] = w((vocab, h), torch.float16)
    return sd


def build(path: str, size_mb: int) -> None:
    meta = path + ".json"
    params = {"size_mb": size_mb, "v": 1}
    if os.path.exists(path) and os.path.exists(meta):
        with open(meta) as f:
            m = json.load(f)
        if m.get("params") == params and m.get("size") == os.path.getsize(path):
            return
    import torch

    sd = make_state(torch, size_mb * 1_000_000)
    torch.save(sd, path + ".tmp")
    del sd
    gc.collect()
    os.replace(path + ".tmp", path)
    with open(meta, "w") as f:
        json.dump({"params": params, "size": os.path.getsize(path)}, f)


def warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass


# ---- timing ---------------------------------------------------------------------------------


def time_calls(fn, runs: int) -> list:
    out = []
    res = fn()  # warm-up
    del res
    gc.collect()
    for _ in range(runs):
        gc.disable()
        t0 = time.perf_counter_ns()
        res = fn()
        t1 = time.perf_counter_ns()
        gc.enable()
        del res
        gc.collect()
        out.append((t1 - t0) / 1e6)
    return out


def time_process(cmd, runs: int, env) -> list:
    out = []
    subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env, check=True)  # warm-up
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env, check=True)
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def importtime(env, runs: int = 7, top: int = 12):
    """[(self_us, cumulative_us, module)] of `import torchfree` (per module, the median over `runs`
    processes), biggest self cost first, and the median cumulative cost of numpy, ml_dtypes and
    torchfree."""
    per: dict = {}
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torchfree"], capture_output=True,
                           text=True, env=env, check=True)
        for line in r.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            _, rest = line.split(":", 1)
            self_us, cum_us, name = (x.strip() for x in rest.split("|"))
            per.setdefault(name.strip(), []).append((int(self_us), int(cum_us)))
    rows = [(int(statistics.median(s for s, _ in v)), int(statistics.median(c for _, c in v)), name)
            for name, v in per.items()]
    totals = {name: cum for _, cum, name in rows if name in ("numpy", "torchfree", "ml_dtypes")}
    return sorted(rows, reverse=True)[:top], totals


def fmt(ms: float) -> str:
    return f"{ms:,.1f}" if ms >= 10 else f"{ms:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=2048, help="checkpoint size in MB (default 2048)")
    ap.add_argument("--runs", type=int, default=7, help="timed runs per tool (at least 5; default 7)")
    ap.add_argument("--dir", help="fixture folder (default: a fresh temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the fixture")
    ap.add_argument("--json", help="also write the raw timings here")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    args = ap.parse_args(argv)
    runs = max(args.runs, 5)

    tf = import_torchfree()
    env = child_env(tf)
    folder = args.dir or tempfile.mkdtemp(prefix="torchfree-bench-scan-")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"llm_{args.size_mb}mb.pt")
    try:
        t0 = time.time()
        build(path, args.size_mb)
        warm(path)
        info = tf.scan(path)
        print(f"fixture: {path}: {os.path.getsize(path) / 1e9:.2f} GB, {len(info.tensors)} tensors "
              f"({', '.join(f'{k} {v / 1e9:.2f} GB' for k, v in info.dtype_totals.items())}); "
              f"ready in {time.time() - t0:.0f} s", flush=True)
        print(f"python {platform.python_version()}, numpy {sys.modules['numpy'].__version__}, "
              f"{platform.machine()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)

        scan_ms = time_calls(lambda: tf.scan(path), runs)
        load_ms = time_calls(lambda: tf.load(path, mmap=False), runs)
        numpy_ms = time_process([sys.executable, "-c", "import numpy"], runs, env)
        info_ms = time_process([sys.executable, "-m", "torchfree", "info", path], runs, env)
        script = shutil.which("torchfree")
        script_ms = time_process([script, "info", path], runs, env) if script else None
        top, totals = importtime(env)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)

    med = statistics.median
    rows = [
        ("torchfree.scan(path)", scan_ms, med(scan_ms) / med(load_ms), "x load(mmap=False)"),
        ("torchfree.load(path, mmap=False) [copies]", load_ms, 1.0, "x load(mmap=False)"),
        ('process: python -c "import numpy"', numpy_ms, 1.0, "x import numpy"),
        ("process: python -m torchfree info FILE", info_ms, med(info_ms) / med(numpy_ms), "x import numpy"),
    ]
    if script_ms:
        rows.append(("process: torchfree info FILE (console script)", script_ms, med(script_ms) / med(numpy_ms),
                     "x import numpy"))
    print()
    print("| measurement | median ms | min ms | runs | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, ms, ratio, unit in rows:
        print(f"| {name} | {fmt(med(ms))} | {fmt(min(ms))} | {len(ms)} | {ratio:.4g}{unit} |")
    checks = [
        ("scan < 1% of a copying load", med(scan_ms) < 0.01 * med(load_ms),
         f"{100 * med(scan_ms) / med(load_ms):.3f}%"),
        ("`torchfree info` process <= 2x `python -c \"import numpy\"`", med(info_ms) <= 2 * med(numpy_ms),
         f"{med(info_ms) / med(numpy_ms):.2f}x"),
    ]
    print()
    for desc, ok, got in checks:
        print(f"- [{'PASS' if ok else 'FAIL'}] {desc}: {got}")
    print()
    print("`python -X importtime -c \"import torchfree\"`, biggest self costs (us, median of 7 runs):")
    print()
    print("| module | self us | cumulative us |")
    print("|---|---:|---:|")
    for s, c, name in top:
        print(f"| {name} | {s:,} | {c:,} |")
    tot = totals.get("torchfree", 0)
    np_cum = totals.get("numpy", 0)
    print()
    print(f"import torchfree: {tot / 1000:.1f} ms cumulative, of which numpy {np_cum / 1000:.1f} ms, "
          f"ml_dtypes {totals.get('ml_dtypes', 0) / 1000:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scan_ms": scan_ms, "load_ms": load_ms, "numpy_ms": numpy_ms, "info_ms": info_ms,
                       "script_ms": script_ms, "importtime_top": top, "import_totals": totals,
                       "checks": [(d, ok, got) for d, ok, got in checks]}, f, indent=1)
    return 1 if args.strict and not all(ok for _, ok, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
