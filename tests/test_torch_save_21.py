"""torchfree.torch.save in training loops (issue 21): atomic by default, fsync as an option,
in place on request, background saves (a Future; snapshot at call time; ordered; errors from
.result(); exit waits), device tags, and 50 kills at random moments of atomic saves."""

from __future__ import annotations

import copy
import os
import pickletools
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

import torchfree
from torchfree import _core

pytestmark = pytest.mark.needs_torch

PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(torchfree.__file__)))


def _tt():
    import torchfree.torch as tt

    return tt


def _records(path):
    """{record name without the archive folder: bytes} but the serialization id."""
    with zipfile.ZipFile(path) as z:
        return {n.split("/", 1)[1]: z.read(n) for n in z.namelist() if not n.endswith("serialization_id")}


def _state(torch, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 64, generator=g)
    return {"w": w, "view": w[3:9, 1:], "step": torch.tensor(seed), "bf": torch.randn(33, generator=g).bfloat16(),
            "meta": {"epoch": seed, "lr": 0.1}}


def _same(torch, a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].stride() == b[k].stride()
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_background_save_snapshots_at_call_time(torch, tmp_path):
    tt = _tt()
    sd = _state(torch)
    expect = copy.deepcopy(sd)  # views stay views of one storage
    fut = tt.save(sd, tmp_path / "bg.pt", background=True)
    sd["w"].add_(1.0)  # the loop goes on training: the file holds the state of the call
    sd["step"].fill_(99)
    assert fut.result(timeout=60) is None and fut.done()
    got = torch.load(tmp_path / "bg.pt")
    _same(torch, got, expect)
    assert got["view"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()  # still one storage
    # the bytes are torch.save's (the archive folder, named after the file, and the id aside)
    torch.save(expect, tmp_path / "plain.pt")
    assert _records(tmp_path / "bg.pt") == _records(tmp_path / "plain.pt")


def test_background_saves_run_in_order(torch, tmp_path):
    tt = _tt()
    target = tmp_path / "ckpt.pt"
    futs = [tt.save({"v": torch.full((50_000,), float(i))}, target, background=True) for i in range(6)]
    for f in futs:
        f.result(timeout=60)
    assert torch.load(target)["v"][0].item() == 5.0  # the last one asked is the last one written
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no temporary left


def test_background_errors_come_from_result(torch, tmp_path):
    tt = _tt()
    fut = tt.save({"w": torch.ones(3)}, tmp_path / "nodir" / "x.pt", background=True)
    with pytest.raises(RuntimeError, match="Parent directory .*nodir does not exist"):
        fut.result(timeout=60)
    with pytest.raises(TypeError, match="path"):
        tt.save({"w": torch.ones(3)}, open(tmp_path / "f.pt", "wb"), background=True)


def test_background_save_of_what_only_torch_writes(torch, tmp_path):
    """A quantized tensor is written by torch's writer: before save() returns, the future done."""
    tt = _tt()
    q = torch.quantize_per_tensor(torch.randn(8), 0.1, 3, torch.quint8)
    before = sum(n for (kind, _), n in tt._fallbacks.items() if kind == "save")
    fut = tt.save({"q": q}, tmp_path / "q.pt", background=True)
    assert fut.done() and fut.result() is None
    assert sum(n for (kind, _), n in tt._fallbacks.items() if kind == "save") == before + 1
    assert torch.equal(torch.load(tmp_path / "q.pt")["q"].int_repr(), q.int_repr())


def test_interpreter_exit_waits_for_background_saves(torch, tmp_path):
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        import torch, torchfree.torch as tt
        sd = {"w": torch.arange(8_000_000, dtype=torch.float32)}
        tt.save(sd, sys.argv[2], background=True)
        sd["w"].zero_()
        print("returned", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code, PKG_DIR, str(tmp_path / "exit.pt")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "returned", out.stderr
    assert torch.equal(torch.load(tmp_path / "exit.pt")["w"], torch.arange(8_000_000, dtype=torch.float32))


def test_atomic_false_writes_in_place_and_atomic_replaces(torch, tmp_path):
    tt = _tt()
    p = tmp_path / "m.pt"
    tt.save({"a": torch.ones(4)}, p)
    ino = os.stat(p).st_ino
    tt.save({"a": torch.zeros(4)}, p, atomic=False)
    assert os.stat(p).st_ino == ino and torch.equal(torch.load(p)["a"], torch.zeros(4))
    tt.save({"a": torch.full((4,), 2.0)}, p)
    assert os.stat(p).st_ino != ino and torch.equal(torch.load(p)["a"], torch.full((4,), 2.0))
    # a file this process maps is replaced even with atomic=False: the mapping keeps its bytes
    mapped = torchfree.load(p, mmap=True)
    tt.save({"a": torch.full((4,), 3.0)}, p, atomic=False)
    assert (mapped["a"] == 2.0).all() and torch.equal(torch.load(p)["a"], torch.full((4,), 3.0))


def test_fsync_is_an_option(torch, tmp_path, monkeypatch):
    tt = _tt()
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    tt.save({"a": torch.ones(4)}, tmp_path / "s.pt")
    assert len(calls) == 2  # the file, then its folder after the rename
    calls.clear()
    tt.save({"a": torch.ones(4)}, tmp_path / "s.pt", fsync=False)
    tt.save({"a": torch.ones(4)}, tmp_path / "s.pt", atomic=False)
    assert calls == [] and torch.equal(torch.load(tmp_path / "s.pt")["a"], torch.ones(4))


def test_device_location_tags_are_written_as_torch_writes_them(torch, tmp_path):
    """A storage copied from a device keeps its tag ("cuda:0"): written afresh for each
    persistent id, as torch's location_tag makes a new string per call; "cpu" is memoized."""
    a = np.arange(6, dtype=np.float32)
    dev = _core.storage_over(a, 1, "cuda:0")  # dtype id 1: float32
    cpu = _core.storage_over(np.ones(2, np.float32), 1)
    assert dev.location == "cuda:0" and cpu.location == "cpu"
    sd = {"d": np.ndarray((6,), np.float32, buffer=dev), "d2": np.ndarray((2,), np.float32, buffer=dev, offset=8),
          "c": np.ndarray((2,), np.float32, buffer=cpu)}
    torchfree.save(sd, tmp_path / "dev.pt")
    with zipfile.ZipFile(tmp_path / "dev.pt") as z:
        pkl = z.read("dev/data.pkl")
    strings = [arg for op, arg, _ in pickletools.genops(pkl) if op.name == "BINUNICODE"]
    assert strings.count("cuda:0") == 2 and strings.count("cpu") == 1
    got = torch.load(tmp_path / "dev.pt", map_location="cpu")
    assert torch.equal(got["d"], torch.from_numpy(a)) and torch.equal(got["d2"], torch.from_numpy(a[2:4]))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "dev.pt")
    with pytest.raises(TypeError, match="location"):
        _core.storage_over(a, 1, 5)


# ---- 50 kills at random moments of atomic saves ---------------------------------------------

ZYGOTE = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch, torchfree.torch as tt
torch.set_num_threads(1)  # forked below: no thread pool may exist
target, n = sys.argv[2], int(sys.argv[3])

def save(version, fsync):
    w = torch.from_numpy(np.full(n, version, dtype=np.int32))
    tt.save({"version": version, "w": w, "tail": w[-1000:], "b": torch.full((1000,), version)}, target, fsync=fsync)

took = {}
for fsync in (True, False):  # how long one save takes here now: the kills are spread over it
    t = time.perf_counter()
    save(0, fsync)
    took[fsync] = time.perf_counter() - t
print("ready %f %f" % (took[True], took[False]), flush=True)
for line in sys.stdin:
    base, fsync = int(line.split()[0]), line.split()[1] == "1"
    pid = os.fork()
    if pid == 0:
        version = base
        while True:
            version += 1
            save(version, fsync)
            os.write(1, b"%d\n" % version)
    print("child %d" % pid, flush=True)
    os.waitpid(pid, 0)
    print("dead", flush=True)
"""

N = 2_000_000  # 8 MB per version


def _check(torch, path, lo, hi):
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
    got = torch.load(path)
    v = got["version"]
    assert lo <= v <= hi, (v, lo, hi)
    assert got["w"].shape == (N,) and bool((got["w"] == v).all()) and bool((got["b"] == v).all())
    assert got["tail"].untyped_storage().data_ptr() == got["w"].untyped_storage().data_ptr()
    return v


@pytest.mark.slow
def test_fifty_kills_leave_the_old_file_or_the_new_one(torch, tmp_path):
    target = tmp_path / "ckpt.pt"
    z = subprocess.Popen([sys.executable, "-c", ZYGOTE, PKG_DIR, str(target), str(N)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = z.stdout.readline().split()
        assert ready and ready[0] == "ready", z.stderr.read()
        took = {True: float(ready[1]), False: float(ready[2])}
        rng = random.Random(4321)
        current, outcomes, interrupted = 0, {"old": 0, "new": 0}, 0  # the zygote's timing saves wrote 0
        for trial in range(50):
            base = (trial + 1) * 1000
            fsync = trial % 5 == 0  # the default (fsync) every fifth time: fsyncs are slow on a busy disk
            z.stdin.write(f"{base} {int(fsync)}\n")
            z.stdin.flush()
            line = z.stdout.readline().split()
            assert line[0] == "child", line
            pid = int(line[1])
            time.sleep(rng.uniform(0.0, 2.5 * took[fsync]))  # most kills land in a save, some after one
            os.kill(pid, signal.SIGKILL)
            done = []
            for out in iter(z.stdout.readline, ""):
                if out.strip() == "dead":
                    break
                done.append(int(out))
            old = done[-1] if done else current
            new = old + 1 if done else base + 1
            v = _check(torch, target, min(old, new), max(old, new))
            assert v in (old, new), (v, old, new)
            outcomes["old" if v == old else "new"] += 1
            current = v
            for name in os.listdir(tmp_path):  # a killed save leaves its temporary folder, never a target
                if name != "ckpt.pt":
                    assert name.startswith(".ckpt.pt.") and name.endswith(".tmpdir"), name
                    for inner in os.listdir(tmp_path / name):
                        assert inner == "ckpt.pt"
                        os.unlink(tmp_path / name / inner)
                    os.rmdir(tmp_path / name)
                    interrupted += 1
        print(f"torch.save kill test: {outcomes}, {interrupted} saves interrupted mid-write, one save took "
              f"{took[True] * 1e3:.0f} ms with fsync, {took[False] * 1e3:.0f} ms without")
        assert interrupted > 0, outcomes  # some kills landed in the middle of a save
    finally:
        z.stdin.close()
        z.kill()
        z.wait()
