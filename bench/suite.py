#!/usr/bin/env python3
"""torchfree benchmark suite: every scenario x every tool, in one run, with the machine's limits.

    python bench/suite.py                 # full: ~2.5 GB of fixtures in a temp dir (~10 min on 2 CPUs)
    python bench/suite.py --quick         # small fixtures, same scenarios (~1-2 min)
    python bench/suite.py --only optim,llm --scenarios load-mmap,load-copy

Fixtures (written with torch.save when torch is installed, else torchfree.save):
  resnet  a ResNet-50-shaped float32 state_dict (320 tensors, ~100 MB)
  llm     a LLaMA-like bf16/fp16 state_dict (~2 GB, a few hundred tensors)
  optim   an Adam optimizer state_dict of 50,000 tensors (~200 MB)
  views   many tensors (20,000) over a few storages (8)
  *-legacy  the same objects in torch's legacy (non-zip) format
  and for safetensors, the same tensors in a .safetensors file (views saved contiguous).

Scenarios: load-mmap, load-copy, scan, open (one tensor), save, info (the whole process
`torchfree info FILE`, the command pip installs), import. Tools: torchfree, torch, safetensors, tinygrad's
torch_load, a naive zipfile+pickle+numpy loader (bench/naive_loader.py), and the limits
(readinto into fresh memory, mmap with MAP_POPULATE, write() of the same bytes, pread of
one tensor's bytes, the interpreter's start). A peer that is not installed gets a row saying so.

Method: all tools of one scenario run in this process, round-robin (each run index times every
tool once), after one untimed warm-up each; gc is off inside the timed region; each result is
kept alive until the clock stops and freed outside it. Peak RSS is the process's high-water
mark during the call (reset through /proc/self/clear_refs before it) minus the RSS just before
it: the memory the call adds. The page cache is not dropped: every file is warm.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import mmap as mmap_mod
import glob
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
# an in-place build (setup.py build_ext --inplace) is used when there is one, else the installed package
_PYEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyext")
if not os.environ.get("TORCHFREE_BENCH_INSTALLED") and glob.glob(os.path.join(_PYEXT, "torchfree", "_core*.so")):
    sys.path.insert(1, _PYEXT)

import ml_dtypes  # noqa: E402

import naive_loader  # noqa: E402
import torchfree  # noqa: E402
from _llm import llm_layout  # noqa: E402

# the whole-process rows run the torchfree this process imported
IN_PLACE = os.path.dirname(os.path.abspath(torchfree.__file__)) == os.path.join(_PYEXT, "torchfree")

BF16 = np.dtype(ml_dtypes.bfloat16)


def _opt_import(name):
    try:
        return __import__(name, fromlist=["_"]), None
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
        return None, f"not installed ({type(e).__name__})"


torch, TORCH_ERR = _opt_import("torch")
tt = _opt_import("torchfree.torch")[0] if torch is not None else None  # torch's stand-ins
st_numpy, ST_ERR = _opt_import("safetensors.numpy")
if st_numpy is not None:
    from safetensors import safe_open
tg_state, TG_ERR = _opt_import("tinygrad.nn.state")

# ---- fixtures --------------------------------------------------------------------------------


def resnet50_layout(div=1):
    """[(name, shape, kind)] of torchvision's resnet50().state_dict() (320 entries), channels / div."""
    out = []

    def conv(n, co, ci, k):
        out.append((n + ".weight", (co, ci, k, k), "f32"))

    def bn(n, c):
        out.extend((f"{n}.{s}", (c,), "f32") for s in ("weight", "bias", "running_mean", "running_var"))
        out.append((n + ".num_batches_tracked", (), "i64"))

    c = lambda x: max(1, x // div)  # noqa: E731
    conv("conv1", c(64), 3, 7)
    bn("bn1", c(64))
    inpl = c(64)
    for li, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), 1):
        planes = c(planes)
        for b in range(blocks):
            p = f"layer{li}.{b}."
            conv(p + "conv1", planes, inpl, 1)
            bn(p + "bn1", planes)
            conv(p + "conv2", planes, planes, 3)
            bn(p + "bn2", planes)
            conv(p + "conv3", planes * 4, planes, 1)
            bn(p + "bn3", planes * 4)
            if b == 0:
                conv(p + "downsample.0", planes * 4, inpl, 1)
                bn(p + "downsample.1", planes * 4)
            inpl = planes * 4
    out += [("fc.weight", (1000, inpl), "f32"), ("fc.bias", (1000,), "f32")]
    return out


def _rand(rng, shape, dtype):
    n = math.prod(shape) * np.dtype(dtype).itemsize
    a = rng.integers(0, 256, n, dtype=np.uint8).view(dtype).reshape(shape)
    if a.dtype.kind == "f":  # finite values (random bits could be NaN: fine, but keep them plain)
        a[~np.isfinite(a)] = 0
    return a


def make_flat(layout, seed):
    rng = np.random.default_rng(seed)
    dts = {"bf16": BF16, "f16": np.dtype(np.float16), "f32": np.dtype(np.float32)}
    sd = collections.OrderedDict()
    for name, shape, kind in layout:
        if kind == "ones":
            sd[name] = np.ones(shape, np.float32)
        elif kind == "i64":
            sd[name] = np.array(12345, np.int64).reshape(shape)
        else:
            sd[name] = _rand(rng, shape, dts[kind])
    return sd


def make_optim(n_tensors, total_bytes, seed=0):
    """An Adam state_dict: n_tensors // 3 params of (step, exp_avg, exp_avg_sq); the first few also
    get max_exp_avg_sq so that the total is exactly n_tensors. Log-uniform float32 sizes."""
    n_params = max(1, n_tensors // 3)
    n_max = n_tensors - 3 * n_params
    r = random.Random(seed)
    raw = [math.exp(r.uniform(math.log(16), math.log(16384))) for _ in range(n_params)]
    scale = total_bytes / 4 / 2 / sum(raw)
    rng = np.random.default_rng(seed)
    state = {}
    for i, x in enumerate(raw):
        n = max(1, int(round(x * scale)))
        k = i % 4
        shape = (n,) if k == 0 or n < 64 else (n // 16, 16) if k < 3 else (3, 5, max(1, n // 15))
        st = {"step": np.array(float(1000 + i % 7), np.float32),
              "exp_avg": rng.standard_normal(shape, np.float32),
              "exp_avg_sq": rng.random(shape, np.float32)}
        if i < n_max:
            st["max_exp_avg_sq"] = rng.random(shape, np.float32)
        state[i] = st
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
               "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
               "fused": None, "params": list(range(n_params))}]
    return {"state": state, "param_groups": groups}


def make_views(bases_np, n_views):
    """{name: view} over the given 2-D bases: rows, column slices (strided) and row blocks."""
    out = collections.OrderedDict()
    nb = len(bases_np)
    for i in range(n_views):
        b = bases_np[i % nb]
        j = (i // nb) % b.shape[0]
        k = i % 3
        if k == 0:
            v = b[j]
        elif k == 1:
            v = b[:, j % b.shape[1]]
        else:
            v = b[j: j + 4]
        out[f"views.{i}"] = v
    return out


def to_torch(obj):
    """torch tensors over the same memory (from_numpy; bfloat16 through an int16 view)."""
    if isinstance(obj, np.ndarray):
        if obj.dtype == BF16:
            return torch.from_numpy(obj.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return type(obj)((k, to_torch(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_torch(v) for v in obj)
    return obj


def flat_arrays(obj):
    """{dotted name: contiguous ndarray} (what a safetensors file holds)."""
    return collections.OrderedDict((k, np.ascontiguousarray(a)) for k, a in torchfree.flatten(obj).items())


class Fixture:
    def __init__(self, name, desc, obj_np, obj_torch, legacy=False):
        self.name, self.desc, self.obj_np, self.obj_torch, self.legacy = name, desc, obj_np, obj_torch, legacy
        self.path = self.st_path = None
        self.n_tensors = self.tensor_bytes = 0
        self.size = 0

    @property
    def zip(self):
        return not self.legacy


def sizes(args):
    if args.tiny:
        return dict(resnet_div=16, llm=4_000_000, optim=(600, 600_000), views=(4, 64, 600))
    if args.quick:
        return dict(resnet_div=4, llm=64_000_000, optim=(5_000, 20_000_000), views=(8, 256, 2_000))
    return dict(resnet_div=1, llm=2_000_000_000, optim=(50_000, 200_000_000), views=(8, 1024, 20_000))


def build_fixtures(args, d):
    sz = sizes(args)
    specs = []
    want = set(args.only.split(",")) if args.only else None

    def wanted(n):
        return want is None or n in want or n.split("-")[0] in want

    # (name, description, builder of (numpy obj, torch obj or None))
    def resnet():
        o = make_flat(resnet50_layout(sz["resnet_div"]), 3)
        return o, (to_torch(o) if torch else None)

    def llm():
        o = make_flat(llm_layout(sz["llm"]), 1)
        return o, (to_torch(o) if torch else None)

    def optim():
        o = make_optim(*sz["optim"])
        return o, (to_torch(o) if torch else None)

    def views():
        nb, rows, nv = sz["views"]
        rng = np.random.default_rng(4)
        bases = [rng.standard_normal((rows, 1024), np.float32) for _ in range(nb)]
        o = make_views(bases, nv)
        t = make_views([torch.from_numpy(b) for b in bases], nv) if torch else None
        return o, t

    for name, build in (("resnet", resnet), ("optim", optim), ("views", views), ("llm", llm)):
        if not (wanted(name) or (not args.no_legacy and wanted(name + "-legacy"))):
            continue
        t0 = time.perf_counter()
        o, t = build()
        fx = Fixture(name, "", o, t)
        fx.path = os.path.join(d, name + ".pt")
        arrays = [a for a in torchfree.flatten(o).values() if isinstance(a, np.ndarray)]
        fx.n_tensors = len(arrays)
        bases = {}
        for a in arrays:
            b = a
            while isinstance(b.base, np.ndarray):
                b = b.base
            bases[id(b)] = b.nbytes
        fx.tensor_bytes = sum(bases.values())
        if wanted(name):
            save_fixture(fx, fx.path, legacy=False)
            if st_numpy is not None:
                fx.st_path = os.path.join(d, name + ".safetensors")
                st_numpy.save_file(flat_arrays(o), fx.st_path)
                warm(fx.st_path)
            fx.size = os.path.getsize(fx.path)
            fx.desc = f"{name} ({fx.n_tensors:,} tensors, {fmt_bytes(fx.tensor_bytes)})"
            specs.append(fx)
        if not args.no_legacy and wanted(name + "-legacy"):
            lf = Fixture(name + "-legacy", "", o, t, legacy=True)
            lf.path = os.path.join(d, name + "-legacy.pt")
            lf.n_tensors, lf.tensor_bytes = fx.n_tensors, fx.tensor_bytes
            save_fixture(lf, lf.path, legacy=True)
            lf.size = os.path.getsize(lf.path)
            lf.desc = f"{name}, legacy format ({fx.n_tensors:,} tensors, {fmt_bytes(fx.tensor_bytes)})"
            specs.append(lf)
        print(f"  fixture {name}: {fx.n_tensors:,} tensors, {fmt_bytes(fx.tensor_bytes)} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return specs


def save_fixture(fx, path, legacy):
    if torch is not None:
        torch.save(fx.obj_torch, path, _use_new_zipfile_serialization=not legacy)
    else:
        torchfree.save(fx.obj_np, path, format="legacy" if legacy else "zip")
    warm(path)


def warm(path):
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


# ---- measuring -------------------------------------------------------------------------------


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


_CLEAR_REFS = os.path.exists("/proc/self/clear_refs")
LAST_ANON_KB = 0


def _reset_peak():
    global _CLEAR_REFS
    if _CLEAR_REFS:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            _CLEAR_REFS = False


class Row:
    def __init__(self, scenario, fixture, tool, *, kind="", gbytes=None, note=""):
        self.scenario, self.fixture, self.tool, self.kind = scenario, fixture, tool, kind
        self.gbytes = gbytes  # bytes moved, for GB/s (None: not meaningful)
        self.times, self.rss_kb, self.anon_kb, self.note = [], [], [], note
        self.fn = self.check = self.setup = self.child = None

    @property
    def ok(self):
        return bool(self.times)

    def med(self):
        return statistics.median(self.times) if self.times else None

    def min(self):
        return min(self.times) if self.times else None


# A run of a row whose one call takes under BATCH_BELOW_MS is the mean of back-to-back calls filling
# about BATCH_MS (as timeit does): each run starts after a gc.collect() of this process's big heap,
# which leaves the CPU caches and TLBs cold, and on this project's VM the first microseconds after
# it cost 30x their warm time (`sum(range(10))`: 7 us instead of 0.2 us): one sub-millisecond call
# measured that, for every tool alike, more than the tool. The other rows of such a scenario whose
# call takes under BATCH_MS / 2 are timed the same way (see run_rows).
BATCH_BELOW_MS, BATCH_MS, BATCH_MAX = 2.0, 20.0, 200


def timed(fn, setup=None, batch=1):
    if setup is not None:
        setup()
    gc.collect()
    gc.disable()
    _reset_peak()
    rss0 = _status_kb("VmRSS")
    anon0 = _status_kb("RssAnon")
    try:
        t0 = time.perf_counter_ns()
        res = fn()
        for _ in range(batch - 1):
            res = None
            res = fn()
        t1 = time.perf_counter_ns()
    finally:
        gc.enable()
    peak = _status_kb("VmHWM") if _CLEAR_REFS else 0
    global LAST_ANON_KB
    LAST_ANON_KB = max(0, _status_kb("RssAnon") - anon0)  # private memory the result holds
    return res, (t1 - t0) / 1e6 / batch, max(0, peak - rss0)


def run_rows(rows, runs, warmup):
    for r in rows:
        if r.child is not None and r.fn is None and not r.note:
            if EXCLUDE and any(x in r.tool for x in EXCLUDE):
                r.note = "excluded (--exclude)"
            else:
                run_child_row(r, runs, warmup)
    live = [r for r in rows if r.fn is not None]
    budget = {}
    for r in live:
        if EXCLUDE and any(x in r.tool for x in EXCLUDE):
            r.fn, r.note = None, "excluded (--exclude)"
            continue
        try:
            for w in range(max(warmup, 1)):
                res, ms, kb = timed(r.fn, r.setup)
                budget[id(r)] = max(1, min(runs, int(MAX_ROW_S * 1000 / max(ms, 1e-3))))
                if ms > MAX_ROW_S * 1000:  # too slow to repeat: its warm-up call is its one run
                    r.times.append(ms)
                    r.rss_kb.append(kb)
                    budget[id(r)] = 0
                    break
                if w == 0 and r.check is not None:
                    bad = r.check(res)
                    if bad:
                        r.note = (r.note + "; " if r.note else "") + "CHECK FAILED: " + bad
                del res
        except Exception as e:  # noqa: BLE001 - a peer failing on a file is a result, not a crash
            r.fn = None
            r.note = f"failed: {type(e).__name__}: {str(e)[:80]}"
    batch, warm = {}, {}
    for r in live:
        if r.fn is not None and r.setup is None and budget.get(id(r)) and r.times == []:
            warm[id(r)] = timed(r.fn)[1]  # one more warm call, to size the batch
    # when one row of the scenario is timed as back-to-back calls, so is every row fast enough for two
    # of them in BATCH_MS: all rows compared are then timed alike (back-to-back calls reuse the memory
    # the call before freed, a single call after the harness's gc.collect() gets fresh pages)
    some = any(ms < BATCH_BELOW_MS for ms in warm.values())
    for r in live:
        ms = warm.get(id(r))
        if ms is not None and (ms < BATCH_BELOW_MS or (some and ms < BATCH_MS / 2)):
            batch[id(r)] = max(2, min(BATCH_MAX, int(BATCH_MS / max(ms, 1e-3))))
            r.note = (r.note + "; " if r.note else "") + f"a run: mean of {batch[id(r)]} back-to-back calls"
    for i in range(runs):
        # each round runs the rows in its own order (a shuffle seeded by the round), so that no row
        # always follows the same one: on this machine a row right after one that freed, fragmented
        # or fsynced gigabytes ran up to 2x slower (a rotation of one order would keep every row's
        # predecessor)
        order = live[:]
        random.Random(i).shuffle(order)
        for r in order:
            if r.fn is None or i >= budget.get(id(r), runs):  # noqa: SIM102
                continue
            try:
                res, ms, kb = timed(r.fn, r.setup, batch.get(id(r), 1))
            except Exception as e:  # noqa: BLE001
                r.fn = None
                r.note = f"failed: {type(e).__name__}: {str(e)[:80]}"
                continue
            del res
            r.times.append(ms)
            r.rss_kb.append(kb)
            r.anon_kb.append(LAST_ANON_KB)
    for r in live:
        if r.ok and len(r.times) < runs:
            r.note = (r.note + "; " if r.note else "") + (
                f"{len(r.times)} run{'s' if len(r.times) > 1 else ''} (slow: the suite caps a row at ~{MAX_ROW_S:.0f} s)")
    gc.collect()


_LAUNCHER = r"""
import json, os, sys, time
for line in sys.stdin:
    cmd, env = json.loads(line)
    t0 = time.perf_counter_ns()
    fa = [(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0), (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)]
    pid = os.posix_spawn(cmd[0], cmd, env, file_actions=fa)
    _, status, ru = os.wait4(pid, 0)
    t1 = time.perf_counter_ns()
    print(json.dumps([(t1 - t0) / 1e6, ru.ru_maxrss, os.waitstatus_to_exitcode(status)]), flush=True)
"""


class Launcher:
    """A small Python process that spawns the measured commands: a child forked from this big
    process would inherit its RSS high-water mark (and pay for copying its page tables)."""

    def __init__(self):
        self.p = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

    def run(self, cmd, env):
        self.p.stdin.write(json.dumps([cmd, env]) + "\n")
        self.p.stdin.flush()
        ms, kb, rc = json.loads(self.p.stdout.readline())
        return ms, kb, rc

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def run_process_rows(rows, runs, warmup):
    """Rows whose .cmd is a command line: wall time of the whole process, its own peak RSS."""
    for r in rows:
        if r.cmd is not None:
            p = subprocess.run(r.cmd, capture_output=True, text=True, env=r.env)
            if p.returncode != 0:
                r.note = f"failed: exit {p.returncode}: {p.stderr.strip()[-80:]}"
                r.cmd = None
    la = Launcher()
    try:
        for _ in range(max(0, warmup - 1)):
            for r in rows:
                if r.cmd is not None:
                    la.run(r.cmd, r.env)
        for _ in range(runs):
            for r in rows:
                if r.cmd is None:
                    continue
                ms, kb, rc = la.run(r.cmd, r.env)
                r.times.append(ms)
                r.rss_kb.append(kb)
    finally:
        la.close()


# ---- result checks ---------------------------------------------------------------------------


def count_leaves(obj):
    n = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, (int, float, str, bytes, bool, type(None))):
            continue
        else:
            n += 1
    return n


def leaf_check(n_expected):
    def check(res):
        n = count_leaves(res)
        return None if n == n_expected else f"{n} tensors, expected {n_expected}"
    return check


# ---- the scenarios ---------------------------------------------------------------------------


def st_load_all_safe_open(path):
    out = {}
    with safe_open(path, framework="np") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def tg_lazy(path):
    return tg_state.torch_load(path)


def tg_materialize(path):
    """tinygrad's torch_load, then every tensor copied into CPU memory (.to("CPU").realize():
    raw bytes, no dtype conversion), as a model's load_state_dict would do."""
    from tinygrad import Tensor

    sd = tg_state.torch_load(path)
    ts = [t for t in _tg_leaves(sd)]
    cpu = [t.to("CPU") for t in ts]
    Tensor.realize(*cpu)
    return cpu


def _tg_leaves(o):
    from tinygrad import Tensor

    if isinstance(o, Tensor):
        yield o
    elif isinstance(o, dict):
        for v in o.values():
            yield from _tg_leaves(v)
    elif isinstance(o, (list, tuple)):
        for v in o:
            yield from _tg_leaves(v)


CHILD_TIMEOUT = 150  # seconds for all of one isolated row (--child-timeout)
CHILD_FNS = {"tinygrad-lazy": lambda p: tg_lazy(p), "tinygrad-copy": lambda p: tg_materialize(p)}


def child_main(argv):
    """suite.py --child NAME PATH RUNS WARMUP: time one tool in this process, print JSON."""
    name, path, runs, warmup, max_row_s = argv[0], argv[1], int(argv[2]), int(argv[3]), float(argv[4])
    fn = CHILD_FNS[name]
    out = {"times": [], "rss": []}
    try:
        for _ in range(warmup):
            res, ms, kb = timed(lambda: fn(path))
            del res
            if ms > max_row_s * 1000:  # too slow to repeat: the warm-up call is the one run
                out["times"], out["rss"], runs = [ms], [kb], 0
                break
        for _ in range(runs):
            res, ms, kb = timed(lambda: fn(path))
            del res
            out["times"].append(ms)
            out["rss"].append(kb)
            print(json.dumps(out), flush=True)  # what is done so far, should a later run time out
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {str(e)[:80]}"
    print(json.dumps(out), flush=True)


def run_child_row(r, runs, warmup):
    """A row timed in its own process with a time limit: a peer that takes minutes on a file
    (tinygrad on 50,000 tensors) then reads '> N s' instead of holding up the whole run."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", r.child, r.child_path, str(runs), str(warmup),
           str(MAX_ROW_S)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=child_env())
        lines = p.stdout.strip().splitlines()
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        lines = out.strip().splitlines()
        r.note = f"stopped after {CHILD_TIMEOUT:.0f} s (--child-timeout)"
        if not lines:
            r.note = f"no call finished in {CHILD_TIMEOUT:.0f} s (--child-timeout)"
    if lines:
        got = json.loads(lines[-1])
        r.times, r.rss_kb = got["times"], got["rss"]
        if got.get("error"):
            r.note = "failed: " + got["error"]
        elif r.times and len(r.times) < runs:
            r.note = (r.note + "; " if r.note else "") + (
                f"{len(r.times)} run{'s' if len(r.times) > 1 else ''} (slow: the suite caps a row at ~{MAX_ROW_S:.0f} s)")
    elif not r.note:
        r.note = f"failed: {p.stderr.strip()[-80:]}"
    r.note = (r.note + "; " if r.note else "") + "own process"


def limit_readinto(path, size, populate=False):
    """The file read into fresh memory: numpy's (which asks for transparent huge pages) or an
    anonymous mapping populated up front (4 KiB pages, no compaction stalls)."""
    if populate:
        buf = mmap_mod.mmap(-1, max(size, 1), flags=mmap_mod.MAP_PRIVATE | mmap_mod.MAP_ANONYMOUS
                            | getattr(mmap_mod, "MAP_POPULATE", 0))
    else:
        buf = np.empty(size, np.uint8)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < size:
            n = f.readinto(mv[done: done + (1 << 30)])
            if not n:
                break
            done += n
    return buf


def limit_populate(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap_mod.mmap(fd, 0, flags=mmap_mod.MAP_PRIVATE | getattr(mmap_mod, "MAP_POPULATE", 0),
                             prot=mmap_mod.PROT_READ)
    finally:
        os.close(fd)


def scenario_load(fx, mode, rows_out):
    sc = f"load ({'mmap' if mode == 'mmap' else 'copy'})"
    rows = []

    def add(tool, fn, *, kind="", gbytes=None, check=True, note="", err=None):
        r = Row(sc, fx, tool, kind=kind, gbytes=gbytes, note=note)
        r.child_path = fx.path
        if err:
            r.note = err
        else:
            r.fn = fn
            if check:
                r.check = leaf_check(fx.n_tensors)
        rows.append(r)
        return r

    p = fx.path
    if mode == "mmap":
        if fx.legacy:
            return
        add("torchfree.load(mmap=True)", lambda: torchfree.load(p, mmap=True), kind="torchfree")
        add("torch.load(weights_only=True, mmap=True)",
            lambda: torch.load(p, weights_only=True, mmap=True), err=TORCH_ERR)
        add("safetensors safe_open + get_tensor(all)", lambda: st_load_all_safe_open(fx.st_path), err=ST_ERR,
            note="copies each tensor out of its map", check=False)
        add("tinygrad torch_load (lazy DISK tensors)", None, err=TG_ERR, check=False).child = "tinygrad-lazy"
        add("limit: mmap(MAP_POPULATE) of the file", lambda: limit_populate(p), kind="limit",
            gbytes=fx.size, check=False)
    else:
        add("torchfree.load(mmap=False)", lambda: torchfree.load(p, mmap=False), kind="torchfree",
            gbytes=fx.size)
        add("torch.load (default: weights_only=True)", lambda: torch.load(p), err=TORCH_ERR, gbytes=fx.size)
        add("torch.load(weights_only=False)", lambda: torch.load(p, weights_only=False), err=TORCH_ERR,
            gbytes=fx.size)
        if fx.zip:
            add("safetensors.numpy.load_file", lambda: st_numpy.load_file(fx.st_path), err=ST_ERR,
                gbytes=os.path.getsize(fx.st_path) if fx.st_path else None, check=False,
                note="same tensors, own file" + (" (views stored contiguous)" if fx.name == "views" else ""))
            add("naive zipfile+pickle+numpy", lambda: naive_loader.load(p), gbytes=fx.size)
        add("tinygrad torch_load + .to('CPU').realize()", None, err=TG_ERR, gbytes=fx.size,
            check=False).child = "tinygrad-copy"
        add("limit: readinto fresh memory (np.empty)", lambda: limit_readinto(p, fx.size), kind="limit",
            gbytes=fx.size, check=False)
        add("limit: readinto fresh memory (mmap, MAP_POPULATE)", lambda: limit_readinto(p, fx.size, True),
            kind="limit", gbytes=fx.size, check=False)
    rows_out.extend(rows)
    return rows


def scenario_scan(fx, rows_out):
    if fx.legacy:
        return []
    p = fx.path
    rows = []
    # every row lists each tensor's name, shape and dtype, as the safetensors one must
    r = Row("scan", fx, "torchfree.scan", kind="torchfree", note="lists names, shapes, dtypes")
    r.fn = lambda: [(t.name, t.shape, t.dtype) for t in torchfree.scan(p).tensors]
    rows.append(r)
    r = Row("scan", fx, "naive zipfile+pickle, no data", note="lists names, shapes, dtypes")
    r.fn = lambda: [(k, m.shape, m.dtype) for k, m in naive_loader.scan(p)[0].items()]
    rows.append(r)
    r = Row("scan", fx, "safetensors safe_open: keys, shapes, dtypes")
    if st_numpy is None:
        r.note = ST_ERR
    else:
        def st_meta():
            with safe_open(fx.st_path, framework="np") as f:
                return [(k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()]
        r.fn = st_meta
    rows.append(r)
    rows_out.extend(rows)
    return rows


def scenario_open(fx, rows_out):
    if fx.legacy:
        return []
    p = fx.path
    names = [k for k, v in torchfree.flatten(fx.obj_np).items() if isinstance(v, np.ndarray)]
    # the biggest tensor of the middle third: a real weight, not a 0-d step
    mid = names[len(names) // 3: 2 * len(names) // 3] or names
    name = max(mid, key=lambda k: torchfree.flatten(fx.obj_np)[k].nbytes) if len(mid) < 2000 else mid[len(mid) // 2]
    nbytes = np.ascontiguousarray(torchfree.flatten(fx.obj_np)[name]).nbytes
    sc = f"open one tensor ({fmt_bytes(nbytes)})"
    rows = []

    def add(tool, fn, kind="", err=None, note=""):
        r = Row(sc, fx, tool, kind=kind, note=note, gbytes=None)
        if err:
            r.note = err
        else:
            r.fn = fn
        rows.append(r)

    def tf_open(mm):
        def f():
            with torchfree.open(p, mmap=mm) as ck:
                return ck[name]  # mmap=False: its own storage read from the file; else a view of the map
        return f

    add("torchfree.open(mmap=False)[name]", tf_open(False), kind="torchfree")
    add("torchfree.open()[name] (mapped)", tf_open(None))
    add("safetensors safe_open().get_tensor(name)",
        (lambda: _st_one(fx.st_path, name)) if st_numpy else None, err=ST_ERR)
    add("torch.load(mmap=True)[name]", lambda: _torch_one(p, name), err=TORCH_ERR)
    add("naive zipfile+pickle, one record", lambda: naive_loader.open_one(p, name))
    # the limit: read just that tensor's bytes into fresh memory (offset from torchfree.scan)
    off = _tensor_file_offset(p, name)
    if off is None:
        add("limit: pread of the tensor's bytes", None, kind="limit", err="offset unknown")
    else:
        def pread():
            buf = np.empty(nbytes, np.uint8)
            with open(p, "rb", buffering=0) as f:
                f.seek(off)
                f.readinto(buf)
            return buf
        add("limit: pread of the tensor's bytes", pread, kind="limit")
    rows_out.extend(rows)
    return rows


def _st_one(path, name):
    with safe_open(path, framework="np") as f:
        return f.get_tensor(name)


def _torch_one(path, name):
    return _dotted(torch.load(path, weights_only=True, mmap=True), name).clone()


def _dotted(obj, name):
    """obj's leaf at the dotted name (keys may hold dots themselves, as state_dict keys do)."""
    if name == "":
        return obj
    if isinstance(obj, dict):
        if name in obj:
            return obj[name]
        for k, v in obj.items():
            ks = str(k)
            if name.startswith(ks + "."):
                try:
                    return _dotted(v, name[len(ks) + 1:])
                except KeyError:
                    pass
    elif isinstance(obj, (list, tuple)):
        head, _, rest = name.partition(".")
        return _dotted(obj[int(head)], rest)
    raise KeyError(name)


def _tensor_file_offset(path, name):
    """File offset of the tensor's first byte (zip local header parsed here, outside the timing)."""
    import struct
    import zipfile

    try:
        t = torchfree.scan(path)[name]
        with zipfile.ZipFile(path) as zf:
            prefix = naive_loader._prefix(zf)
            zi = zf.getinfo(f"{prefix}/data/{t.storage_key}")
        with open(path, "rb") as f:
            f.seek(zi.header_offset)
            h = f.read(30)
        n, m = struct.unpack("<HH", h[26:30])
        return zi.header_offset + 30 + n + m + t.storage_offset * np.dtype(t.dtype).itemsize
    except Exception:  # noqa: BLE001
        return None


def scenario_save(fx, d, rows_out, args):
    out = os.path.join(d, "out.bin")
    sc = "save" + (" (legacy format)" if fx.legacy else "")
    fmt = "legacy" if fx.legacy else "zip"
    torchfree.save(fx.obj_np, out, format=fmt)
    # the bytes to write, in numpy memory as the savers' tensors are (transparent huge pages where
    # the kernel gives them; a bytes object gets none and was measured slower to write from)
    ref = np.fromfile(out, np.uint8)
    size = len(ref)

    def fresh():
        for q in (out, out + ".st"):
            if os.path.exists(q):
                os.unlink(q)
        os.sync()

    rows = []

    def add(tool, fn, kind="", err=None, note="", nbytes=size):
        r = Row(sc, fx, tool, kind=kind, note=note, gbytes=nbytes)
        r.setup = fresh
        if err:
            r.note = err
        else:
            r.fn = fn
        rows.append(r)

    def write(fsync, step=2 << 20, reserve=False):
        # on this project's machine (Linux 6.18, ext4, a VM) writes of 8 MB or more get large
        # page-cache folios and were fastest when memory was unfragmented, but took 2-4x longer
        # right after a row that left it fragmented (direct compaction stalls); 2 MB writes were
        # within 3% of the best 8 MB times but also stalled after some rows, 512 KB ones never
        # (~8% slower). Reserving the file's blocks first (fallocate, as torchfree.save does on
        # ext4) made the same writes 1.5x faster there. Each is timed; the fastest is the limit.
        def f():
            with open(out, "wb", buffering=0) as fh:
                if reserve:
                    try:
                        os.posix_fallocate(fh.fileno(), 0, size)
                    except (OSError, AttributeError):
                        pass
                mv = memoryview(ref)
                done = 0
                while done < size:
                    done += fh.write(mv[done: done + step])
                if fsync:
                    os.fsync(fh.fileno())
        return f

    add("torchfree.save(atomic=False)", lambda: torchfree.save(fx.obj_np, out, format=fmt, atomic=False),
        kind="torchfree", note="no fsync, as torch.save")
    add("torchfree.save() (atomic: fsync + rename)", lambda: torchfree.save(fx.obj_np, out, format=fmt))
    add("torch.save", lambda: torch.save(fx.obj_torch, out, _use_new_zipfile_serialization=not fx.legacy),
        err=TORCH_ERR)
    tt_args = dict(_use_new_zipfile_serialization=not fx.legacy)
    add("torchfree.torch.save(atomic=False)", lambda: tt.save(fx.obj_torch, out, atomic=False, **tt_args),
        kind="torchfree", err=TORCH_ERR, note="torch tensors, in place, no fsync, as torch.save")
    add("torchfree.torch.save(fsync=False)", lambda: tt.save(fx.obj_torch, out, fsync=False, **tt_args),
        err=TORCH_ERR, note="atomic rename, no fsync")
    add("torchfree.torch.save() (atomic: fsync + rename)", lambda: tt.save(fx.obj_torch, out, **tt_args),
        err=TORCH_ERR)
    add("torchfree.torch.save(background=True): loop blocked", lambda: _background_save(out, fx, tt_args),
        err=TORCH_ERR, note="until it returns: the snapshot (one memory copy); the write goes on")
    add("torchfree.torch.save(background=True).result()",
        lambda: tt.save(fx.obj_torch, out, background=True, **tt_args).result(), err=TORCH_ERR,
        note="snapshot + atomic write with fsync")
    if not fx.legacy:
        flat = flat_arrays(fx.obj_np) if st_numpy else None
        add("safetensors.numpy.save_file", lambda: st_numpy.save_file(flat, out + ".st"), err=ST_ERR,
            nbytes=size, note="views saved contiguous" if fx.name == "views" else "")
    add("limit: write() the same bytes, 2 MB calls", write(False), kind="limit")
    add("limit: write() the same bytes, 512 kB calls", write(False, 512 << 10), kind="limit")
    add("limit: fallocate + write() the same bytes, 512 kB calls", write(False, 512 << 10, True), kind="limit")
    add("limit: fallocate + write() + fsync, 512 kB calls", write(True, 512 << 10, True))
    rows_out.extend(rows)
    return rows


_PENDING = []


def _background_save(out, fx, tt_args):
    """A background save, timed until it returns; the write finishes before the next round."""
    while _PENDING:
        _PENDING.pop().result()
    _PENDING.append(tt.save(fx.obj_torch, out + ".bg", background=True, **tt_args))


_COMPILED = []


def child_env():
    """The environment of the whole-process rows: they import the torchfree this process imported
    (the in-place build where there is one, else the installed package)."""
    env = dict(os.environ)
    if IN_PLACE and not _COMPILED:
        # an installed torchfree has its bytecode compiled, as numpy and safetensors do; the in-place
        # one may have none (PYTHONDONTWRITEBYTECODE): compiled once here, so that the measured
        # processes do not compile torchfree's modules at each start
        import compileall

        compileall.compile_dir(os.path.join(_PYEXT, "torchfree"), quiet=1)
        _COMPILED.append(True)
    if IN_PLACE:
        env["PYTHONPATH"] = _PYEXT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def scenario_info(fx, rows_out):
    if fx.legacy:
        return []
    py = sys.executable
    env = child_env()
    rows = []

    def add(tool, cmd, kind="", err=None):
        r = Row("info (whole process)", fx, tool, kind=kind, note="peak RSS: the whole process")
        r.cmd, r.env = (None if err else cmd), env
        if err:
            r.note = err
        rows.append(r)

    # the `torchfree` command pip installs (README): the script itself where installed, else the
    # same three lines pip's launcher runs (`python -m` would add runpy's ~3 ms import)
    exe = os.path.join(os.path.dirname(py), "torchfree")
    cmd = [exe] if not IN_PLACE and os.access(exe, os.X_OK) else [
        py, "-c", "import re, sys\nfrom torchfree.cli import main\n"
        "sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\nsys.exit(main())"]
    add("torchfree info FILE", cmd + ["info", fx.path], kind="torchfree")
    add("python: torch.load(mmap=True), print names+shapes",
        [py, "-c", "import sys, torch\n"
         "o = torch.load(sys.argv[1], weights_only=True, mmap=True)\n"
         "def w(o, p=''):\n"
         "  if isinstance(o, dict):\n"
         "    for k, v in o.items(): w(v, f'{p}.{k}' if p else str(k))\n"
         "  elif isinstance(o, (list, tuple)):\n"
         "    for i, v in enumerate(o): w(v, f'{p}.{i}' if p else str(i))\n"
         "  elif isinstance(o, torch.Tensor): print(p, o.dtype, tuple(o.shape))\n"
         "w(o)", fx.path], err=TORCH_ERR)
    add("python: safetensors safe_open, print names+shapes",
        [py, "-c", "import sys\nfrom safetensors import safe_open\n"
         "with safe_open(sys.argv[1], 'np') as f:\n"
         "  for k in f.keys(): s = f.get_slice(k); print(k, s.get_dtype(), s.get_shape())",
         fx.st_path or ""], err=ST_ERR)
    # torchfree's info of a zip file imports no numpy (the safetensors script needs it for 'np'):
    # the floor is the interpreter's own start; numpy's import is shown beside it
    add("limit: python -c pass (the interpreter's start)", [py, "-c", "pass"], kind="limit")
    add("reference: python -c 'import numpy'", [py, "-c", "import numpy"], kind="ref")
    rows_out.extend(rows)
    return rows


def scenario_import(rows_out):
    py = sys.executable
    env = child_env()
    rows = []
    for tool, mod, kind in (("import numpy", "numpy", "limit"), ("import numpy, torchfree", "numpy, torchfree",
                                                                  "torchfree"),
                            ("import torchfree (alone: it imports numpy on first need)", "torchfree", "ref"),
                            ("import torch", "torch", ""), ("import safetensors.numpy", "safetensors.numpy", ""),
                            ("import tinygrad", "tinygrad", "")):
        r = Row("import (whole process)", None, tool, kind=kind, note="peak RSS: the whole process")
        r.cmd, r.env = [py, "-c", "import " + mod], env
        first = mod.split(",")[-1].strip()
        if first != "numpy" and subprocess.run([py, "-c", "import " + mod], env=env,
                                              capture_output=True).returncode != 0:
            r.cmd, r.note = None, "not installed"
        rows.append(r)
    rows_out.extend(rows)
    return rows


def importtime_ms(mod, runs=7):
    """Median cumulative `-X importtime` of mod and of numpy (us -> ms) over runs processes."""
    env = child_env()
    got = {mod: [], "numpy": []}
    for _ in range(runs):
        p = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import numpy, {mod}"], env=env,
                           capture_output=True, text=True)
        for line in p.stderr.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[2].rstrip() in (f" {mod}", " numpy"):
                got[parts[2].strip()].append(int(parts[1]) / 1000)
    return {k: statistics.median(v) if v else None for k, v in got.items()}


# ---- report ----------------------------------------------------------------------------------


def fmt_bytes(n):
    for unit, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= s:
            return f"{n / s:.3g} {unit}"
    return f"{n} B"


def fmt_ms(v):
    if v is None:
        return "—"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_ratio(x):
    if x is None:
        return "—"
    return f"{x:.3g}×" if x < 100 else f"{x:,.0f}×"


def group_rows(rows):
    groups = collections.OrderedDict()
    for r in rows:
        groups.setdefault((r.scenario, r.fixture.name if r.fixture else ""), []).append(r)
    return groups


def print_table(rows, file=sys.stdout):
    print("| scenario | file | tool | median ms | min ms | GB/s | peak RSS added | × limit | × torchfree | note |",
          file=file)
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|", file=file)
    for (sc, fxn), rs in group_rows(rows).items():
        lim = best_limit(rs)
        tf = next((r for r in rs if r.kind == "torchfree" and r.ok), None)
        for r in rs:
            fxd = r.fixture.desc if r.fixture else ""
            if not r.ok:
                print(f"| {sc} | {fxd} | {r.tool} | — | — | — | — | — | — | {r.note or 'not run'} |", file=file)
                continue
            gbs = f"{r.gbytes / r.med() / 1e6:.2f}" if r.gbytes else ""
            rss = max(r.rss_kb) if r.rss_kb else None
            rss_s = "" if rss is None or not (_CLEAR_REFS or r.fixture is None or sc.startswith("info")) \
                else fmt_bytes(rss * 1024)
            if r.anon_kb and rss_s:
                anon = max(r.anon_kb) * 1024
                if anon < 0.5 * rss * 1024:  # mostly mapped file pages (page cache), not private memory
                    rss_s += f" ({fmt_bytes(anon)} private)"
            print(f"| {sc} | {fxd} | {r.tool} | {fmt_ms(r.med())} | {fmt_ms(r.min())} | {gbs} | {rss_s} | "
                  f"{fmt_ratio(r.med() / lim.med()) if lim else '—'} | "
                  f"{fmt_ratio(r.med() / tf.med()) if tf else '—'} | {r.note} |", file=file)


def best_limit(rs):
    """The fastest limit row of a scenario (the readinto limit has two ways to get fresh memory)."""
    lims = [r for r in rs if r.kind == "limit" and r.ok]
    return min(lims, key=lambda r: r.med()) if lims else None


def find(rows, scenario, fixture, tool_prefix):
    for r in rows:
        if r.scenario.startswith(scenario) and (fixture is None or (r.fixture and r.fixture.name == fixture)) \
                and r.tool.startswith(tool_prefix) and r.ok:
            return r
    return None


def targets(rows, imp):
    out = []

    def add(desc, ok, measured):
        out.append((desc, ok, measured))

    def ratio(a, b):
        return a.med() / b.med() if a and b else None

    tf = find(rows, "load (mmap)", "optim", "torchfree")
    th = find(rows, "load (mmap)", "optim", "torch.load")
    st = find(rows, "load (copy)", "optim", "safetensors")
    if tf and th:
        add("optim mmap load ≥ 50× faster than torch.load(weights_only=True, mmap=True)", th.med() >= 50 * tf.med(),
            f"{th.med() / tf.med():.1f}× ({fmt_ms(tf.med())} vs {fmt_ms(th.med())} ms)")
    if tf and st:
        add("optim mmap load ≥ 5× faster than safetensors load_file", st.med() >= 5 * tf.med(),
            f"{st.med() / tf.med():.1f}× ({fmt_ms(tf.med())} vs {fmt_ms(st.med())} ms)")
    r = find(rows, "load (mmap)", "llm", "torchfree")
    if r:
        add(f"llm ({r.fixture.desc}) mmap load < 2 ms", r.med() < 2, f"{fmt_ms(r.med())} ms")
    r = find(rows, "load (copy)", "llm", "torchfree")
    lim = best_limit([x for x in rows if x.scenario == "load (copy)" and x.fixture and x.fixture.name == "llm"])
    if r and lim:
        add("llm copy load ≤ 1.1× readinto", ratio(r, lim) <= 1.1, f"{ratio(r, lim):.2f}× "
            f"({fmt_ms(r.med())} vs {fmt_ms(lim.med())} ms)")
    for fxn in ("llm", "optim", "resnet", "views"):
        r = find(rows, "scan", fxn, "torchfree")
        if r:
            per = r.med() / (r.fixture.n_tensors / 1000)
            add(f"scan < 1 ms per 1,000 tensors ({fxn})", per < 1, f"{per:.3f} ms per 1,000 ({fmt_ms(r.med())} ms)")
    r = find(rows, "save", "llm", "torchfree.save(atomic")
    lim = best_limit([x for x in rows if x.scenario == "save" and x.fixture and x.fixture.name == "llm"])
    if r and lim:
        add("llm save ≤ 1.1× the fastest write of the same bytes (no fsync)", ratio(r, lim) <= 1.1,
            f"{ratio(r, lim):.2f}× ({fmt_ms(r.med())} vs {fmt_ms(lim.med())} ms, {lim.tool[7:]})")
    ra, lf = find(rows, "save", "llm", "torchfree.save() (atomic"), find(rows, "save", "llm", "limit: fallocate + write() +")
    if ra and lf:
        add("llm atomic save ≤ 1.1× fallocate + write() + fsync", ratio(ra, lf) <= 1.1, f"{ratio(ra, lf):.2f}×")
    for peer in ("torch.save", "safetensors"):
        p = find(rows, "save", "llm", peer)
        if r and p:
            add(f"llm save faster than {peer}", r.med() < p.med(), f"{p.med() / r.med():.2f}× faster")
    if imp:
        a, b = find(rows, "import", None, "import numpy, torchfree"), find(rows, "import", None, "import numpy")
        if a and b:
            add("import torchfree adds ≤ 30 ms to import numpy (process wall)", a.med() - b.med() <= 30,
                f"{a.med() - b.med():.1f} ms ({fmt_ms(b.med())} -> {fmt_ms(a.med())} ms); -X importtime: "
                f"torchfree {imp.get('torchfree') or 0:.1f} ms after numpy {imp.get('numpy') or 0:.1f} ms")
    for mode, fxn in (("load (mmap)", "llm"), ("load (mmap)", "optim"), ("load (copy)", "llm")):
        r = find(rows, mode, fxn, "torchfree")
        if r and r.rss_kb and _CLEAR_REFS:
            peak = max(r.rss_kb) * 1024
            if mode == "load (mmap)":
                anon = max(r.anon_kb) * 1024 if r.anon_kb else 0
                add(f"{fxn} mmap load peak RSS adds only metadata", peak < 0.05 * r.fixture.tensor_bytes + 64e6,
                    f"{fmt_bytes(peak)} for {fmt_bytes(r.fixture.tensor_bytes)} of tensors, of which "
                    f"{fmt_bytes(anon)} private (the rest: mapped page-cache pages of the file)")
            else:
                add(f"{fxn} copy load peak RSS ≤ 1.05× tensor bytes", peak <= 1.05 * r.fixture.tensor_bytes,
                    f"{peak / r.fixture.tensor_bytes:.3f}× ({fmt_bytes(peak)})")
    # every row where a peer does the same work: is torchfree first?
    for (sc, fxn), rs in group_rows(rows).items():
        tfr = next((x for x in rs if x.kind == "torchfree" and x.ok), None)
        if not tfr:
            continue
        if sc.startswith("import"):
            continue  # its target is the time added to numpy's import
        peers = [x for x in rs if x.ok and x.kind == "" and not x.tool.startswith(("torchfree", "limit"))
                 and "lazy" not in x.tool]
        if peers:
            best = min(peers, key=lambda x: x.med())
            add(f"{sc}, {fxn}: torchfree leads", tfr.med() <= best.med(),
                f"torchfree {fmt_ms(tfr.med())} ms, best peer {best.tool} {fmt_ms(best.med())} ms")
    return out


def loadavg():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def versions():
    v = [f"Python {platform.python_version()}", f"numpy {np.__version__}"]
    for name, mod in (("torch", torch), ("safetensors", st_numpy)):
        if mod is not None:
            v.append(f"{name} {getattr(__import__(name), '__version__', '?')}")
    if tg_state is not None:
        try:
            from importlib.metadata import version
            v.append(f"tinygrad {version('tinygrad')}")
        except Exception:  # noqa: BLE001
            pass
    return ", ".join(v)


EXCLUDE = ()
MAX_ROW_S = 60  # a tool whose warm-up call takes longer gets fewer timed runs (noted in its row)

SCENARIOS = ("load-mmap", "load-copy", "scan", "open", "save", "info", "import")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small fixtures (optim 5,000 tensors, llm 64 MB)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke run
    ap.add_argument("--runs", type=int, default=5, help="timed runs per tool (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per tool first (default 1)")
    ap.add_argument("--max-row-s", type=float, default=60,
                    help="a tool slower than this per call gets fewer timed runs (default 60 s)")
    ap.add_argument("--only", default="", help="fixtures: resnet,optim,views,llm and/or X-legacy")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ",".join(SCENARIOS))
    ap.add_argument("--no-legacy", action="store_true", help="skip the legacy-format fixtures")
    ap.add_argument("--threads", action="store_true", help="also run bench_threads.py (GIL / 2-thread loads)")
    ap.add_argument("--child-timeout", type=float, default=150,
                    help="seconds for all runs of a tool timed in its own process (tinygrad; default 150)")
    ap.add_argument("--exclude", default="", help="skip tools whose name contains one of these (comma list)")
    ap.add_argument("--dir", help="fixture directory (default: a new temp dir, deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the fixture directory")
    ap.add_argument("--json", help="write raw timings to this file")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    global MAX_ROW_S, EXCLUDE, CHILD_TIMEOUT
    MAX_ROW_S = args.max_row_s
    CHILD_TIMEOUT = args.child_timeout
    EXCLUDE = tuple(x for x in args.exclude.split(",") if x)
    scen = set(args.scenarios.split(","))
    bad = scen - set(SCENARIOS)
    if bad:
        raise SystemExit(f"unknown scenarios: {sorted(bad)}")
    if args.runs < 5 and not args.tiny:
        print("note: fewer than 5 runs", file=sys.stderr)
    d = args.dir or tempfile.mkdtemp(prefix="torchfree-bench-")
    os.makedirs(d, exist_ok=True)
    la0 = loadavg()
    t_start = time.perf_counter()
    print(f"fixtures in {d} ...", file=sys.stderr, flush=True)
    rows = []
    imp = None
    try:
        fixtures = build_fixtures(args, d)
        for fx in fixtures:
            t0 = time.perf_counter()
            group = []
            if "load-mmap" in scen:
                group += scenario_load(fx, "mmap", rows) or []
            if "load-copy" in scen:
                group += scenario_load(fx, "copy", rows) or []
            if "scan" in scen:
                group += scenario_scan(fx, rows)
            if "open" in scen:
                group += scenario_open(fx, rows)
            # each scenario round-robins its own tools
            for _, rs in group_rows(group).items():
                run_rows(rs, args.runs, args.warmup)
            if "save" in scen:
                run_rows(scenario_save(fx, d, rows, args), args.runs, args.warmup)
            if "info" in scen:
                run_process_rows(scenario_info(fx, rows), args.runs, args.warmup)
            print(f"  {fx.name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            fx.obj_np = fx.obj_torch = None
            for q in (fx.path, fx.st_path):
                if q and os.path.exists(q) and not args.keep:
                    os.unlink(q)
        if "import" in scen:
            run_process_rows(scenario_import(rows), max(args.runs, 7) if not args.tiny else args.runs,
                             args.warmup)
            imp = importtime_ms("torchfree", runs=3 if args.tiny else 7)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(d, ignore_errors=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, {platform.machine()} "
          f"{platform.system()} {platform.release()}; {versions()}; {args.runs} runs + {args.warmup} warm-up "
          f"per tool, round-robin; load average {la0} at start, {loadavg()} at end; "
          f"{time.perf_counter() - t_start:.0f} s\n")
    print_table(rows)
    print()
    tg = targets(rows, imp)
    for desc, ok, measured in tg:
        print(f"- [{'PASS' if ok else 'MISS'}] {desc}: {measured}")
    if args.threads:
        import bench_threads

        print()
        bench_threads.main([])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [dict(scenario=r.scenario, fixture=r.fixture.name if r.fixture else None,
                                     tool=r.tool, times_ms=r.times, rss_kb=r.rss_kb, note=r.note) for r in rows],
                       "targets": tg, "loadavg": [la0, loadavg()], "importtime": imp}, f, indent=1)
    return 1 if args.strict and not all(ok for _, ok, _ in tg) else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
