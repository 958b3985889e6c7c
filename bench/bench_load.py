#!/usr/bin/env python3
"""Load benchmark for torchfree.

Generates PyTorch checkpoints with torch into a temporary directory, times
loading them with torchfree, with torch, and with a plain-Python baseline for
each scenario, prints a markdown table and a list of target checks, then
deletes the fixtures.

    python bench/bench_load.py [--quick] [--dir D] [--runs N] [--keep]

Scenarios (all measured in the same process and the same run):

1. "optimizer state": an Adam-like optimizer state_dict with ~50,000 tensors
   (~200 MB float32 of varied shapes, plus one scalar "step" per parameter).
   Baseline "50,000 numpy views": mmap the file and create one numpy array per
   tensor over the mapping (np.ndarray(shape, dtype, buffer=mm, offset=...))
   with the same shapes, dtypes and offsets as the tensors in the file.
   Targets: torchfree mmap >= 20x faster than torch.load(mmap=True);
            torchfree mmap <= 5x the numpy-views time.

2. "2 GB model": an LLM-like state_dict (a few hundred float16 / bfloat16 /
   float32 tensors, ~2 GB). Baseline "readinto": read the whole file into a
   fresh np.empty buffer with f.readinto (fresh memory each run).
   Targets: torchfree mmap=True < 5 ms (absolute);
            torchfree mmap=False <= 1.2x readinto.

The page cache is NOT dropped (that needs root): every file is read once right
after it is written, and every tool gets one untimed warm-up run, so all
numbers are for files warm in the page cache.  The garbage collector is
disabled inside the timed region (as timeit does; --gc keeps it enabled), and
each result is kept alive until the clock has stopped, then deleted and
gc.collect()-ed before the next run.
"""

from __future__ import annotations

import argparse
import builtins
import gc
import json
import math
import mmap
import os
import pickle
import platform
import random
import re
import shutil
import statistics
import struct
import sys
import tempfile
import time
import zipfile
from collections import OrderedDict

import numpy as np

from _llm import llm_config, llm_layout  # bench/ is on sys.path when a bench script runs

try:
    import ml_dtypes  # bfloat16 for the numpy baselines / comparisons

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except Exception:  # pragma: no cover - ml_dtypes missing
    ml_dtypes = None
    _BF16 = None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_VERSION = 2  # bump when the fixture layout changes (invalidates --dir reuse)


# --------------------------------------------------------------------------
# optional imports
# --------------------------------------------------------------------------

def import_torchfree():
    """Return (module, None) or (None, reason).  Tries the installed package
    first, then <repo>/pyext (an in-place build).  A package without a
    callable load() (e.g. an empty namespace directory) counts as missing."""
    errors = []

    def attempt(label):
        try:
            import torchfree  # noqa: F401

            mod = sys.modules["torchfree"]
            if callable(getattr(mod, "load", None)):
                return mod
            errors.append(f"{label}: torchfree has no load() ({getattr(mod, '__path__', '')})")
        except Exception as e:  # not installed / not built yet
            errors.append(f"{label}: {type(e).__name__}: {e}")
        for name in [m for m in sys.modules if m == "torchfree" or m.startswith("torchfree.")]:
            del sys.modules[name]
        return None

    mod = attempt("installed")
    if mod is not None:
        return mod, None
    pyext = os.path.join(REPO, "pyext")
    if os.path.isdir(os.path.join(pyext, "torchfree")) and pyext not in sys.path:
        sys.path.insert(0, pyext)
        mod = attempt(pyext)
        if mod is not None:
            return mod, None
        sys.path.remove(pyext)
    return None, "; ".join(errors)


def import_torch():
    try:
        import torch

        return torch, None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

def opt_state_layout(n_tensors: int, total_bytes: int, seed: int = 0):
    """(shapes, n_max): shapes of the exp_avg tensors of n_tensors // 3 params.

    Each parameter contributes 3 tensors (step, exp_avg, exp_avg_sq); the
    first n_max = n_tensors % 3 params also get an amsgrad-style
    max_exp_avg_sq, so the total is exactly n_tensors.  The float32 payload
    adds up to about total_bytes.  Sizes are log-uniform (16 .. 16k elements
    before scaling), shapes 1-D, 2-D or 3-D."""
    n_params = max(1, n_tensors // 3)
    n_max = n_tensors - 3 * n_params if n_tensors >= 3 else 0
    rng = random.Random(seed)
    raw = [math.exp(rng.uniform(math.log(16), math.log(16384))) for _ in range(n_params)]
    target_numel = total_bytes / 4 / 2  # two float32 tensors per param
    scale = target_numel / sum(raw)
    shapes = []
    for i, r in enumerate(raw):
        n = max(1, int(round(r * scale)))
        kind = i % 4
        if kind == 0 or n < 64:
            shapes.append((n,))
        elif kind in (1, 2):
            k = rng.choice((4, 8, 16, 32, 64))
            shapes.append((max(1, n // k), k))
        else:
            a = rng.choice((2, 3, 4))
            b = rng.choice((3, 5, 7))
            shapes.append((a, b, max(1, n // (a * b))))
    return shapes, n_max


def make_opt_state(torch, n_tensors: int, total_bytes: int):
    shapes, n_max = opt_state_layout(n_tensors, total_bytes)
    g = torch.Generator().manual_seed(0)
    state = {}
    for i, shp in enumerate(shapes):
        st = {
            "step": torch.tensor(float(1000 + i % 7)),
            "exp_avg": torch.randn(shp, generator=g),
            "exp_avg_sq": torch.rand(shp, generator=g),
        }
        if i < n_max:
            st["max_exp_avg_sq"] = torch.rand(shp, generator=g)
        state[i] = st
    param_groups = [
        {
            "lr": 1e-3,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.0,
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "params": list(range(len(shapes))),
        }
    ]
    return {"state": state, "param_groups": param_groups}


def make_llm_state(torch, total_bytes: int):
    g = torch.Generator().manual_seed(1)

    def w(shape, dtype):
        t = torch.empty(shape, dtype=torch.float32 if dtype == torch.float32 else dtype)
        t.normal_(0.0, 0.02, generator=g)
        return t

    dtypes = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
    sd = OrderedDict()
    for name, shape, kind in llm_layout(total_bytes):
        sd[name] = torch.ones(shape, dtype=torch.float32) if kind == "ones" else w(shape, dtypes[kind])
    return sd


def warm_file(path):
    """Read the whole file once so that it is in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass


def build_fixture(torch, path, params, maker):
    """Write the fixture unless an identical one (same params) is already there."""
    meta_path = path + ".json"
    if os.path.exists(path) and os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("params") == params and meta.get("size") == os.path.getsize(path):
                return False
        except Exception:
            pass
    obj = maker()
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    del obj
    gc.collect()
    os.replace(tmp, path)
    with open(meta_path, "w") as f:
        json.dump({"params": params, "size": os.path.getsize(path)}, f)
    return True


# --------------------------------------------------------------------------
# tensor layout of a checkpoint, read without torch (for the numpy baseline)
# --------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": _BF16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _Storage:
    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype


class _TensorSpec:
    __slots__ = ("key", "dtype", "offset", "shape", "stride")

    def __init__(self, key, dtype, offset, shape, stride):
        self.key, self.dtype, self.offset, self.shape, self.stride = key, dtype, offset, shape, stride


def _rebuild(storage, storage_offset, size, stride, *rest):
    key, dtype = storage
    return _TensorSpec(key, dtype, storage_offset, tuple(size), tuple(stride))


class _SpecUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "builtins" and name in ("set", "frozenset", "slice", "complex"):
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    def persistent_load(self, pid):
        typename, storage_type, key, location, numel = pid
        assert typename == "storage", pid
        return (key, storage_type.dtype)


def tensor_specs(path):
    """[(absolute byte offset, shape, numpy dtype)] of every tensor in the file,
    in pickle order, computed with zipfile + a stub unpickler (no torch)."""
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        pkl_name = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n))
        specs = []

        def walk(o):
            if isinstance(o, _TensorSpec):
                specs.append(o)
            elif isinstance(o, dict):
                for v in o.values():
                    walk(v)
            elif isinstance(o, (list, tuple)):
                for v in o:
                    walk(v)

        walk(_SpecUnpickler(zf.open(pkl_name)).load())
        data_off = {}
        for info in zf.infolist():
            m = re.fullmatch(r"[^/]+/data/([^/]+)", info.filename)
            if not m:
                continue
            f.seek(info.header_offset)
            hdr = f.read(30)
            sig, = struct.unpack("<I", hdr[:4])
            assert sig == 0x04034B50 and info.compress_type == zipfile.ZIP_STORED
            n_len, x_len = struct.unpack("<HH", hdr[26:30])
            data_off[m.group(1)] = info.header_offset + 30 + n_len + x_len
    out = []
    for s in specs:
        assert s.stride == tuple(_contig_strides(s.shape)), "baseline assumes contiguous tensors"
        out.append((data_off[s.key] + s.offset * s.dtype.itemsize, s.shape, s.dtype))
    return out


def _contig_strides(shape):
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= d
    return list(reversed(st))


# --------------------------------------------------------------------------
# result inspection (outside the timed region)
# --------------------------------------------------------------------------

def leaves(obj, out=None):
    """All array-like leaves (numpy arrays or torch tensors) in a nested result."""
    if out is None:
        out = []
    if isinstance(obj, dict):
        for v in obj.values():
            leaves(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            leaves(v, out)
    elif hasattr(obj, "shape") and hasattr(obj, "dtype"):
        out.append(obj)
    return out


def as_bytes(x):
    """Raw little-endian bytes of a numpy array or a torch tensor."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x).view(np.uint8).tobytes()
    t = x.detach().contiguous()
    return t.reshape(-1).view(__import__("torch").uint8).numpy().tobytes()


def rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------

class Row:
    def __init__(self, scenario, tool, times_ns=None, note="", baseline=False):
        self.scenario, self.tool, self.times_ns, self.note, self.baseline = (
            scenario, tool, times_ns, note, baseline)

    @property
    def ok(self):
        return bool(self.times_ns)

    @property
    def median_ms(self):
        return statistics.median(self.times_ns) / 1e6 if self.ok else None

    @property
    def min_ms(self):
        return min(self.times_ns) / 1e6 if self.ok else None


def _timed_call(fn, keep_gc):
    gc.collect()
    if not keep_gc:
        gc.disable()
    try:
        t0 = time.perf_counter_ns()
        res = fn()
        t1 = time.perf_counter_ns()
    finally:
        gc.enable()
    return res, t1 - t0


class Group:
    """The tools of one scenario, measured together.

    run() gives every tool its untimed warm-up call(s) first, then does
    `runs` rounds in which each tool is timed once (round-robin), so that
    noise from other processes spreads over all tools instead of landing on
    whichever ran at the wrong moment (--sequential times each tool's runs
    back to back instead).  Each result is kept alive until the clock has
    stopped, then released and collected before the next call.  check(result)
    runs on the first warm-up result only, outside the timed region.  RSS is
    read right before each timed call and after its release; a growth summed
    over a tool's timed runs above 64 MB is reported (memory not given back
    between runs; allocator retention from the warm-up does not count)."""

    def __init__(self, rows, scenario, args):
        self.rows, self.scenario, self.args = rows, scenario, args
        self.tools = []

    def add(self, tool, fn, check=None, baseline=False, unavailable=None):
        row = Row(self.scenario, tool, None, "not available" if unavailable else "", baseline)
        self.rows.append(row)
        if not unavailable:
            self.tools.append({"row": row, "fn": fn, "check": check, "times": [], "rss": 0.0})
        return row

    def _call(self, t, timed):
        if t["row"].note.startswith("error"):
            return
        try:
            rss0 = rss_mb()
            res, dt = _timed_call(t["fn"], self.args.gc)
        except Exception as e:
            t["row"].note = f"error: {type(e).__name__}: {e}"
            print(f"  {t['row'].tool}: ERROR {type(e).__name__}: {e}", flush=True)
            return
        if not timed and t["check"] is not None and not t.get("checked"):
            t["checked"] = True
            t["row"].note = t["check"](res) or ""
        del res
        gc.collect()
        if timed:
            t["times"].append(dt)
            t["rss"] += rss_mb() - rss0

    def run(self):
        a = self.args
        for r in self.rows:
            if r.scenario == self.scenario and r.note == "not available":
                print(f"  {r.tool}: not available", flush=True)
        for t in self.tools:
            for _ in range(a.warmup):
                self._call(t, False)
        if a.sequential:
            for t in self.tools:
                for _ in range(a.runs):
                    self._call(t, True)
        else:
            for _ in range(a.runs):
                for t in self.tools:
                    self._call(t, True)
        for t in self.tools:
            row = t["row"]
            if row.note.startswith("error"):
                continue
            row.times_ns = t["times"]
            if t["rss"] > 64:
                row.note = (row.note + "; " if row.note else "") + \
                    f"RSS grew {t['rss']:.0f} MB over the timed runs"
            print(f"  {row.tool}: median {row.median_ms:.3f} ms, min {row.min_ms:.3f} ms"
                  f"{'  [' + row.note + ']' if row.note else ''}", flush=True)


# --------------------------------------------------------------------------
# scenarios
# --------------------------------------------------------------------------

def make_checker(expected_specs, path, reference=None, sample=16):
    """check(result): leaf count / dtypes / shapes vs the file, and raw bytes of
    a few sampled tensors vs the bytes in the file."""
    n_exp = len(expected_specs)
    nbytes_exp = sum(int(np.prod(s)) * d.itemsize for _, s, d in expected_specs)
    rng = random.Random(42)
    picks = sorted(rng.sample(range(n_exp), min(sample, n_exp)))

    def check(res):
        ls = leaves(res)
        problems = []
        if len(ls) != n_exp:
            problems.append(f"{len(ls)} arrays, expected {n_exp}")
        else:
            nb = sum(int(np.prod(x.shape)) * _itemsize(x) for x in ls)
            if nb != nbytes_exp:
                problems.append(f"{nb} bytes, expected {nbytes_exp}")
            with open(path, "rb") as f:
                for i in picks:
                    off, shape, dt = expected_specs[i]
                    x = ls[i]
                    if tuple(x.shape) != tuple(shape):
                        problems.append(f"tensor {i}: shape {tuple(x.shape)} != {shape}")
                        break
                    f.seek(off)
                    want = f.read(int(np.prod(shape)) * dt.itemsize)
                    if as_bytes(x) != want:
                        problems.append(f"tensor {i}: bytes differ from the file")
                        break
        return ("CHECK FAILED: " + ", ".join(problems)) if problems else ""

    return check


def _itemsize(x):
    if isinstance(x, np.ndarray):
        return x.itemsize
    return x.element_size()


def scenario_opt_state(args, torch, tf, tf_err, rows):
    path = os.path.join(args.fixture_dir, "opt_state.pt")
    params = {"v": FIXTURE_VERSION, "n": args.s1_tensors, "bytes": args.s1_bytes}
    t0 = time.perf_counter()
    made = build_fixture(torch, path, params,
                         lambda: make_opt_state(torch, args.s1_tensors, args.s1_bytes))
    warm_file(path)
    specs = tensor_specs(path)
    size = os.path.getsize(path)
    name = f"1. optimizer state ({len(specs):,} tensors, {size / 1e6:.0f} MB)"
    print(f"\n## {name}\nfixture {path}: {size / 1e6:.1f} MB, {len(specs):,} tensors "
          f"({'written' if made else 'reused'} in {time.perf_counter() - t0:.1f} s)", flush=True)
    check = make_checker(specs, path)

    def numpy_views():
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        nd = np.ndarray
        return [nd(shape, dt, mm, off) for off, shape, dt in specs]

    g = Group(rows, name, args)
    base = g.add(f"baseline: {len(specs):,} numpy views", numpy_views, check=check, baseline=True)
    g.add("torchfree.load(mmap=True)", lambda: tf.load(path, mmap=True), check=check,
          unavailable=tf_err)
    g.add("torch.load(weights_only=True, mmap=True)",
          lambda: torch.load(path, weights_only=True, mmap=True), check=check)
    if not args.no_reference:
        g.add("torchfree.load(mmap=False) [reference]", lambda: tf.load(path, mmap=False),
              check=check, unavailable=tf_err)
        g.add("torch.load(weights_only=True, mmap=False) [reference]",
              lambda: torch.load(path, weights_only=True, mmap=False), check=check)
    g.run()
    return base, size, len(specs)


def scenario_llm(args, torch, tf, tf_err, rows):
    h, inter, vocab, kv, layers = llm_config(args.s2_bytes)
    path = os.path.join(args.fixture_dir, "llm.pt")
    params = {"v": FIXTURE_VERSION, "bytes": args.s2_bytes}
    t0 = time.perf_counter()
    made = build_fixture(torch, path, params, lambda: make_llm_state(torch, args.s2_bytes))
    warm_file(path)
    specs = tensor_specs(path)
    size = os.path.getsize(path)
    name = f"2. LLM state_dict ({size / 1e9:.2f} GB, {len(specs)} tensors)"
    print(f"\n## {name}\nfixture {path}: {size / 1e6:.1f} MB, {len(specs)} tensors, "
          f"hidden={h} inter={inter} vocab={vocab} layers={layers} "
          f"({'written' if made else 'reused'} in {time.perf_counter() - t0:.1f} s)", flush=True)
    check = make_checker(specs, path)

    def readinto():
        buf = np.empty(size, np.uint8)  # fresh, untouched memory (malloc -> mmap)
        mv = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            got = 0
            while got < size:  # Linux caps one read() at ~2 GiB; loop for short reads
                n = f.readinto(mv[got:])
                if not n:
                    raise EOFError(path)
                got += n
        mv.release()
        return buf

    g = Group(rows, name, args)
    base = g.add("baseline: readinto whole file", readinto, baseline=True)
    g.add("torchfree.load(mmap=True)", lambda: tf.load(path, mmap=True), check=check,
          unavailable=tf_err)
    g.add("torchfree.load(mmap=False)", lambda: tf.load(path, mmap=False), check=check,
          unavailable=tf_err)
    g.add("torch.load(weights_only=True, mmap=True) [reference]",
          lambda: torch.load(path, weights_only=True, mmap=True), check=check)
    g.add("torch.load(weights_only=True, mmap=False) [reference]",
          lambda: torch.load(path, weights_only=True, mmap=False), check=check)
    g.run()
    return base, size, len(specs)


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def fmt_ms(v):
    if v is None:
        return "-"
    if v < 10:
        return f"{v:.3f}"
    if v < 1000:
        return f"{v:.1f}"
    return f"{v:,.0f}"


def _fmt_ratio(x):
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _loadavg():
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def print_table(rows):
    base_of = {r.scenario: r for r in rows if r.baseline}
    print("| scenario | tool | median ms | min ms | runs | ratio to baseline (median) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        b = base_of.get(r.scenario)
        if r.ok:
            ratio = f"{_fmt_ratio(r.median_ms / b.median_ms)}x" if b is not None and b.ok else "-"
            print(f"| {r.scenario} | {r.tool} | {fmt_ms(r.median_ms)} | {fmt_ms(r.min_ms)} | "
                  f"{len(r.times_ns)} | {ratio} |")
        else:
            print(f"| {r.scenario} | {r.tool} | {r.note} | - | 0 | - |")
    notes = [r for r in rows if r.ok and r.note]
    if notes:
        print()
        for r in notes:
            print(f"- note: {r.scenario} / {r.tool}: {r.note}")


def find(rows, scenario_prefix, tool_prefix):
    for r in rows:
        if r.scenario.startswith(scenario_prefix) and r.tool.startswith(tool_prefix):
            return r
    return None


def targets(rows):
    """[(description, status, measured)] with status PASS / FAIL / N/A."""
    out = []

    def add(desc, ok, measured):
        out.append((desc, "N/A" if ok is None else ("PASS" if ok else "FAIL"), measured))

    def bad(*rs):
        for r in rs:
            if r is None or not r.ok:
                return (r.note if r is not None else "not measured")
            if r.note.startswith("CHECK FAILED"):
                return None
        return ""

    tf = find(rows, "1.", "torchfree.load(mmap=True)")
    th = find(rows, "1.", "torch.load(weights_only=True, mmap=True)")
    nv = find(rows, "1.", "baseline")
    desc = "1. torchfree.load(mmap=True) >= 20x faster than torch.load(mmap=True)"
    why = bad(tf, th)
    if why:
        add(desc, None, why)
    else:
        ratio = th.median_ms / tf.median_ms
        add(desc, ratio >= 20 and not tf.note.startswith("CHECK"), f"{ratio:.1f}x faster")
    desc = "1. torchfree.load(mmap=True) <= 5x the numpy-views time"
    why = bad(tf, nv)
    if why:
        add(desc, None, why)
    else:
        ratio = tf.median_ms / nv.median_ms
        add(desc, ratio <= 5 and not tf.note.startswith("CHECK"), f"{ratio:.2f}x numpy views")

    tm = find(rows, "2.", "torchfree.load(mmap=True)")
    desc = "2. torchfree.load(mmap=True) < 5 ms (absolute)"
    why = bad(tm)
    if why:
        add(desc, None, why)
    else:
        add(desc, tm.median_ms < 5 and not tm.note.startswith("CHECK"), f"{tm.median_ms:.3f} ms")
    tc = find(rows, "2.", "torchfree.load(mmap=False)")
    ri = find(rows, "2.", "baseline")
    desc = "2. torchfree.load(mmap=False) <= 1.2x readinto"
    why = bad(tc, ri)
    if why:
        add(desc, None, why)
    else:
        ratio = tc.median_ms / ri.median_ms
        add(desc, ratio <= 1.2 and not tc.note.startswith("CHECK"), f"{ratio:.2f}x readinto")
    return out


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 5,000 tensors / 20 MB and a 200 MB model")
    p.add_argument("--dir", default=None,
                   help="directory for the fixtures (default: a new temp dir). Fixtures "
                        "already in D with the same parameters are reused.")
    p.add_argument("--keep", action="store_true", help="do not delete the fixtures at the end")
    p.add_argument("--runs", type=int, default=7, help="timed runs per tool (>= 5, default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs (default 1)")
    p.add_argument("--sequential", action="store_true",
                   help="time each tool's runs back to back (default: round-robin over the tools)")
    p.add_argument("--gc", action="store_true",
                   help="keep the garbage collector enabled inside the timed region")
    p.add_argument("--only", choices=("1", "2"), help="run only one scenario")
    p.add_argument("--tensors", type=int, help="scenario 1 tensor count (default 50,000)")
    p.add_argument("--s1-mb", type=float, help="scenario 1 float32 payload in MB (default 200)")
    p.add_argument("--s2-mb", type=float, help="scenario 2 checkpoint size in MB (default 2000)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the mmap=False reference rows of scenario 1")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target check FAILs")
    a = p.parse_args(argv)
    if a.runs < 5:
        p.error("--runs must be >= 5")
    a.s1_tensors = a.tensors or (5_000 if a.quick else 50_000)
    a.s1_bytes = int((a.s1_mb or (20 if a.quick else 200)) * 1e6)
    a.s2_bytes = int((a.s2_mb or (200 if a.quick else 2000)) * 1e6)
    return a


def main(argv=None):
    args = parse_args(argv)
    torch, torch_err = import_torch()
    if torch is None:
        print(f"torch is required to generate the fixtures: {torch_err}", file=sys.stderr)
        return 2
    tf, tf_err = import_torchfree()

    print("# torchfree load benchmark")
    print(f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
          f"torchfree {str(getattr(tf, '__version__', '?')) + ' (' + str(tf.__file__) + ')' if tf else 'not available: ' + tf_err}")
    print(f"{platform.platform()}, {os.cpu_count()} CPUs; runs={args.runs} warmup={args.warmup} "
          f"{'sequential' if args.sequential else 'round-robin'}; "
          f"gc {'enabled' if args.gc else 'disabled'} in timed region; files warm in the page cache; "
          f"{_loadavg()} at start")

    if args.dir:
        made_dir = not os.path.exists(args.dir)
        os.makedirs(args.dir, exist_ok=True)
        args.fixture_dir = os.path.abspath(args.dir)
        cleanup = [os.path.join(args.fixture_dir, n)
                   for n in ("opt_state.pt", "opt_state.pt.json", "opt_state.pt.tmp",
                             "llm.pt", "llm.pt.json", "llm.pt.tmp")]
        if made_dir:
            cleanup.append(args.fixture_dir)  # removed last, only if empty
    else:
        args.fixture_dir = tempfile.mkdtemp(prefix="torchfree-bench-")
        cleanup = [args.fixture_dir]

    rows = []
    t_start = time.perf_counter()
    try:
        if args.only in (None, "1"):
            scenario_opt_state(args, torch, tf, tf_err, rows)
            if not args.keep:  # free the disk before writing the 2 GB fixture
                os.remove(os.path.join(args.fixture_dir, "opt_state.pt"))
        if args.only in (None, "2"):
            scenario_llm(args, torch, tf, tf_err, rows)
    finally:
        if not args.keep:
            for c in cleanup:
                if os.path.isdir(c):
                    if args.dir:
                        try:
                            os.rmdir(c)  # a --dir we created: remove only if empty
                        except OSError:
                            pass
                    else:
                        shutil.rmtree(c, ignore_errors=True)
                elif os.path.exists(c):
                    os.remove(c)
    print(f"\n(total {time.perf_counter() - t_start:.0f} s; {_loadavg()} at end: other processes "
          f"on the machine add noise, compare min with median)\n")
    print("## Results\n")
    print_table(rows)
    print("\n## Targets\n")
    checks = targets(rows)
    for desc, status, measured in checks:
        print(f"- [{status}] {desc}: {measured}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "argv": sys.argv[1:], "torch": torch.__version__,
                "torchfree": getattr(tf, "__file__", None),
                "rows": [{"scenario": r.scenario, "tool": r.tool, "times_ns": r.times_ns,
                          "median_ms": r.median_ms, "min_ms": r.min_ms, "note": r.note,
                          "baseline": r.baseline} for r in rows],
                "targets": [{"check": d, "status": s, "measured": m} for d, s, m in checks],
            }, f, indent=1)
    if args.strict and any(s == "FAIL" for _, s, _ in checks):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
