"""Crash safety of torchfree.save(path): a writer process is SIGKILLed at random moments
while it saves new versions over one file; afterwards the file is always a complete
checkpoint, either the last version whose save returned or the one being saved."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import torchfree

# the children import the same torchfree package as this process
PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(torchfree.__file__)))

CHILD = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import torchfree
target, n, version = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
print("ready", flush=True)
while True:
    version += 1
    w = np.full(n, version, dtype=np.int32)
    obj = {"version": version, "w": w, "tail": w[-1000:], "b": np.full(1000, version, dtype=np.int64),
           "meta": {"name": "v%d" % version}}
    torchfree.save(obj, target)
    print(version, flush=True)
"""

N = 2_000_000  # 8 MB per version: a save takes a few tens of ms with its fsyncs


def check(path, lo, hi):
    """The file is a complete checkpoint of a version in [lo, hi]; returns it."""
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every record complete, with its CRC
    got = torchfree.load(path, mmap=False)
    v = got["version"]
    assert lo <= v <= hi, (v, lo, hi)
    assert got["w"].shape == (N,) and (got["w"] == v).all()
    assert (got["b"] == v).all() and got["meta"]["name"] == f"v{v}"
    assert np.shares_memory(got["w"], got["tail"])
    return v


def save_version(path, v):
    w = np.full(N, v, dtype=np.int32)
    torchfree.save({"version": v, "w": w, "tail": w[-1000:], "b": np.full(1000, v, dtype=np.int64),
                    "meta": {"name": "v%d" % v}}, path)


@pytest.mark.slow
def test_kill_while_saving(tmp_path):
    target = tmp_path / "ckpt.pt"
    save_version(target, 0)
    rng = random.Random(1234)
    current = 0  # the version the file holds
    outcomes = {"old": 0, "new": 0}
    leftovers = 0  # kills that interrupted a save (its temporary file was left)
    t0 = time.monotonic()
    for trial in range(50):
        base = (trial + 1) * 1000  # this child saves versions base+1, base+2, ...
        child = subprocess.Popen([sys.executable, "-c", CHILD, PKG_DIR, str(target), str(N), str(base)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = child.stdout.readline().strip()
        assert line == b"ready", child.stderr.read().decode()
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        assert child.returncode == -signal.SIGKILL
        done = [int(x) for x in out.split()]
        old = done[-1] if done else current  # the last save that returned
        new = old + 1 if done else base + 1  # the save that was running
        v = check(target, min(old, new), max(old, new))
        assert v in (old, new), (v, old, new)
        outcomes["old" if v == old else "new"] += 1
        current = v
        for name in os.listdir(tmp_path):  # a killed save's temporary file never replaced the target
            if name != "ckpt.pt":
                assert name.startswith(".ckpt.pt.") and name.endswith(".tmp"), name
                os.unlink(tmp_path / name)
                leftovers += 1
    print(f"kill test: {outcomes}, {leftovers} saves interrupted mid-write")
    assert time.monotonic() - t0 < 60
    assert leftovers > 0, outcomes  # some kills landed in the middle of a save
