"""Saving over a file that live arrays or tensors of this process map (issue 18).

A resume loop loads last.ckpt, trains, and saves over last.ckpt. When the loaded tensors map the
file, a writer that truncates or rewrites it in place pulls the pages away from under them: the
next read of one kills the process with SIGBUS (and leaves the file torn), or, for a page the file
still covers, silently shows the new file's bytes. torchfree's writers replace such a file (a new
file renamed over its name: the mappings keep the old inode), whatever ``atomic`` says, or refuse
before touching it (a file object); ``torchfree.torch.load`` maps only when asked, as torch.load.

Each pattern runs in a child process (a SIGBUS must fail the test, not the session), which saves
the same state first to a file never loaded (``ref``): the target must then read back with the
same values, bit for bit (torch.load where torch is installed, and torchfree.load).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import torchfree

PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(torchfree.__file__)))


def run_child(code: str, *args) -> str:
    """Run ``code`` in a fresh process importing this torchfree; assert it exited 0 (a SIGBUS shows
    as -7); its stdout."""
    env = dict(os.environ, PYTHONPATH=PKG_DIR)
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code), *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=300)
    if r.returncode < 0:
        why = f"killed by {signal.Signals(-r.returncode).name}"
    else:
        why = f"exit status {r.returncode}"
    assert r.returncode == 0, f"child {why}\n{r.stdout}\n{r.stderr}"
    return r.stdout.strip()


def _np_leaves(obj, path=""):
    if isinstance(obj, np.ndarray):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _np_leaves(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _np_leaves(v, f"{path}.{i}")
    else:
        yield path, obj


def _torch_same(torch, a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        flat = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
        assert torch.equal(flat(a), flat(b)), f"{path}: values differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _torch_same(torch, a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _torch_same(torch, x, y, f"{path}.{i}")
    else:
        assert a == b, path


def assert_same_file_values(path, ref, torch=None):
    """``path`` holds what ``ref`` holds, bit for bit: by torchfree.load, and by torch.load when
    ``torch`` is given or already imported (the torch-free tests also run under the sanitizers'
    build of .ci/run, where importing torch is not wanted)."""
    torch = torch or sys.modules.get("torch")
    if torch is not None:
        _torch_same(torch, torch.load(path), torch.load(ref))
    got = dict(_np_leaves(torchfree.load(path, mmap=False)))
    exp = dict(_np_leaves(torchfree.load(ref, mmap=False)))
    assert list(got) == list(exp)
    for k, v in exp.items():
        if isinstance(v, np.ndarray):
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k
        else:
            assert got[k] == v, k


# ---- torchfree.load / open / safetensors: no torch needed ---------------------------------------

NUMPY_RESUME = r"""
import os, sys
import numpy as np
import torchfree
d, how, atomic = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
p, ref = os.path.join(d, "last.pt"), os.path.join(d, "ref.pt")
rng = np.random.default_rng(0)
state = {"model": {f"l{i}.weight": rng.standard_normal((300, 300), np.float32) for i in range(4)},
         "opt": {"exp_avg": rng.standard_normal(100_000).astype(np.float32)}, "step": 0}
torchfree.save(state, p)
kept = []
for step in range(1, 4):
    ino = os.stat(p).st_ino
    if how == "load":
        ck = torchfree.load(p)  # mapped (torchfree.load's default)
        model = ck["model"]
    else:
        ck = torchfree.open(p)
        ck.__enter__()
        model = {k: ck["model." + k] for k in ("l0.weight", "l1.weight", "l2.weight", "l3.weight")}
    assert not model["l0.weight"].flags.owndata  # a view of the mapping
    new = {"model": {k: (v if k == "l0.weight" else v + step) for k, v in model.items()},
           "opt": {"exp_avg": (ck["opt"]["exp_avg"] if how == "load" else ck["opt.exp_avg"]) * 0.5},
           "step": step}
    torchfree.save(new, ref)  # the same state, to a file never loaded
    torchfree.save(new, p, atomic=atomic)  # l0.weight is saved from the mapping of p itself
    assert os.stat(p).st_ino != ino  # replaced, not rewritten
    total = sum(float(a.sum(dtype=np.float64)) for a in model.values())  # every mapped page read again
    kept.append((ck, model, total))
    if how == "open":
        ck.__exit__(None, None, None)  # arrays outlive the Checkpoint: the mapping stays noted
for ck, model, total in kept:  # arrays of every earlier version: still their own values
    assert sum(float(a.sum(dtype=np.float64)) for a in model.values()) == total
print("ok")
"""


@pytest.mark.parametrize("atomic", [False, True])
@pytest.mark.parametrize("how", ["load", "open"])
def test_numpy_resume_overwrite(tmp_path, how, atomic):
    assert run_child(NUMPY_RESUME, tmp_path, how, int(atomic)) == "ok"
    assert_same_file_values(tmp_path / "last.pt", tmp_path / "ref.pt")
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "ref.pt"]  # no temporary file left


def test_numpy_resume_overwrite_read_by_torch(torch, tmp_path):
    assert run_child(NUMPY_RESUME, tmp_path, "load", 0) == "ok"
    assert_same_file_values(tmp_path / "last.pt", tmp_path / "ref.pt", torch)
    assert torch.load(tmp_path / "last.pt")["step"] == 3


def _state(v):
    rng = np.random.default_rng(v)
    return {"w": rng.standard_normal((256, 256), np.float32), "b": np.full(1000, v, np.int64), "v": v}


def test_unmapped_atomic_false_writes_in_place(tmp_path):
    p = tmp_path / "a.pt"
    torchfree.save(_state(1), p)
    ino = os.stat(p).st_ino
    torchfree.save(_state(2), p, atomic=False)  # nothing maps it: written in place, as torch.save
    assert os.stat(p).st_ino == ino
    sd = torchfree.load(p, mmap=False)  # owns its memory: maps nothing
    torchfree.save(_state(3), p, atomic=False)
    assert os.stat(p).st_ino == ino and sd["v"] == 2 and torchfree.load(p)["v"] == 3


def test_mapping_noted_while_arrays_live(tmp_path):
    from torchfree import _files

    p = tmp_path / "a.pt"
    torchfree.save(_state(1), p)
    st = os.stat(p)
    sd = torchfree.load(p)
    assert _files._noted(st)
    w = sd["w"]
    del sd
    assert _files._noted(st)  # one array keeps the mapping
    del w
    assert not _files._noted(st)
    torchfree.load(p, mmap=False)
    assert not _files._noted(st)
    with torchfree.open(p) as ck:
        w = ck["w"]
    assert _files._noted(st)
    del w, ck
    assert not _files._noted(st)


def test_atomic_false_rename_keeps_mode_links(tmp_path):
    p = tmp_path / "a.pt"
    torchfree.save(_state(1), p)
    os.chmod(p, 0o640)
    link = tmp_path / "link.pt"
    os.symlink(p.name, link)
    hard = tmp_path / "hard.pt"
    os.link(p, hard)
    sd = torchfree.load(p)
    w = sd["w"].copy()
    torchfree.save(_state(2), link, atomic=False)  # through a symlink: the file it names is replaced
    assert os.path.islink(link) and stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert torchfree.load(p, mmap=False)["v"] == 2
    assert os.stat(hard).st_ino != os.stat(p).st_ino  # the hard link keeps the old inode
    sd2 = torchfree.load(hard)  # maps the old inode (as sd does), through its other name
    torchfree.save(_state(3), hard, atomic=False)  # replaced at that name; p is another file now
    assert torchfree.load(hard, mmap=False)["v"] == 3 and torchfree.load(p, mmap=False)["v"] == 2
    assert (sd["w"] == w).all() and (sd2["w"] == w).all() and sd["v"] == sd2["v"] == 1
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "hard.pt", "link.pt"]


def test_file_object_over_mapped_file_refused(tmp_path):
    p = tmp_path / "a.pt"
    torchfree.save(_state(1), p)
    before = p.read_bytes()
    sd = torchfree.load(p)
    with open(p, "r+b") as f:
        with pytest.raises(OSError, match="map") as e:
            torchfree.save(_state(2), f)
        assert e.value.errno == errno.ETXTBSY and "mmap=False" in str(e.value)
        assert f.tell() == 0
    assert p.read_bytes() == before and sd["v"] == 1 and sd["w"].sum() == _state(1)["w"].sum()
    from torchfree import safetensors as st

    with open(p, "r+b") as f:
        with pytest.raises(OSError, match="map"):
            st.save_file({"w": np.ones(3, np.float32)}, f)
    assert p.read_bytes() == before
    del sd
    with open(p, "r+b") as f:  # mapped by nothing now: written through, as asked
        torchfree.save(_state(2), f)
    assert torchfree.load(p, mmap=False)["v"] == 2


def test_mapped_file_that_cannot_be_replaced(tmp_path, monkeypatch):
    from torchfree import _files

    p = tmp_path / "a.pt"
    torchfree.save(_state(1), p)
    before = p.read_bytes()
    sd = torchfree.load(p)

    def no_rename(a, b):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(_files.os, "replace", no_rename)
    with pytest.raises(PermissionError, match="renamed over it, which failed") as e:
        torchfree.save(_state(2), p, atomic=False)
    assert e.value.filename == str(p) and "left as it was" in str(e.value)
    assert p.read_bytes() == before and sd["v"] == 1
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]


def test_safetensors_load_file_then_save_file(tmp_path):
    from torchfree import safetensors as st

    p = tmp_path / "m.safetensors"
    st.save_file({"a": np.arange(100_000, dtype=np.float32), "b": np.ones((64, 64), np.float16)}, p)
    ino = os.stat(p).st_ino
    got = st.load_file(p)  # each array over a mapping of its own
    st.save_file({"a": got["a"] * 2, "b": got["b"]}, p)
    assert os.stat(p).st_ino != ino
    assert (got["a"] == np.arange(100_000, dtype=np.float32)).all() and (got["b"] == 1).all()
    again = st.load_file(p, mmap=False)
    assert (again["a"] == 2 * np.arange(100_000, dtype=np.float32)).all()
    del got
    ino = os.stat(p).st_ino
    st.save_file(again, p)  # nothing maps it: in place
    assert os.stat(p).st_ino == ino


def test_numpy_memmap_seen_through_proc_maps(tmp_path):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps")
    p = tmp_path / "a.pt"
    torchfree.save(_state(1), p)
    mm = np.memmap(p, dtype=np.uint8, mode="r")  # a mapping torchfree did not make
    head = bytes(mm[:4096])
    ino = os.stat(p).st_ino
    torchfree.save(_state(2), p, atomic=False)
    assert os.stat(p).st_ino != ino and bytes(mm[:4096]) == head and mm.sum() > 0
    assert torchfree.load(p, mmap=False)["v"] == 2


CLI_OVER_MAPPED = r"""
import os, sys
import numpy as np
import torchfree
from torchfree import cli
d = sys.argv[1]
p, q = os.path.join(d, "out.pt"), os.path.join(d, "in.pt")
torchfree.save({"w": np.arange(200_000, dtype=np.float32)}, p)
torchfree.save({"w": np.ones(200_000, np.float32)}, q)
sd = torchfree.load(p)  # this process maps out.pt
assert cli.main(["convert", q, p]) == 0  # convert writes out.pt: replaced, never rewritten
assert (sd["w"] == np.arange(200_000, dtype=np.float32)).all()
assert cli.main(["convert", q, os.path.join(d, "x.safetensors")]) == 0
from torchfree import safetensors as st
m = st.load_file(os.path.join(d, "x.safetensors"))
assert cli.main(["convert", p, os.path.join(d, "x.safetensors")]) == 0
assert (m["w"] == 1).all()
print("ok")
"""


def test_cli_convert_onto_mapped_path(tmp_path):
    assert run_child(CLI_OVER_MAPPED, tmp_path) == "ok"
    got = torchfree.load(tmp_path / "out.pt", mmap=False)
    assert (got["w"] == 1).all()
    from torchfree import safetensors as st

    assert (st.load_file(tmp_path / "x.safetensors", mmap=False)["w"] == 1).all()
    # IN and OUT one file (through a hard link too): refused before anything is read or written
    os.link(tmp_path / "out.pt", tmp_path / "same.pt")
    env = dict(os.environ, PYTHONPATH=PKG_DIR)
    r = subprocess.run([sys.executable, "-m", "torchfree", "convert", str(tmp_path / "out.pt"),
                        str(tmp_path / "same.pt")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "same file" in r.stderr
    assert (torchfree.load(tmp_path / "out.pt", mmap=False)["w"] == 1).all()


# ---- torchfree.torch: a real model and optimizer ------------------------------------------------

TORCH_RESUME = r"""
import os, sys
import torch
import torchfree.torch as tft
d, pattern = sys.argv[1], sys.argv[2]
p, ref = os.path.join(d, "last.ckpt"), os.path.join(d, "ref.ckpt")
torch.manual_seed(0)


def make():
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 8))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 64, generator=g), torch.randn(32, 8, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


model, opt = make()
train(model, opt, 3, 0)
torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0}, p)
if pattern == "install":
    tft.install()
if pattern == "config_mmap":
    from torch.utils.serialization import config
    config.load.mmap = True  # torch's own default-mmap setting: torchfree.torch.load maps
real_save = tft._originals.get("save", torch.save)
for epoch in range(1, 4):
    if pattern == "plain":
        ck = tft.load(p)  # torch.load's defaults: copies
    elif pattern == "install":
        ck = torch.load(p)  # patched
    else:  # mmap, config_mmap
        ck = tft.load(p, mmap=True) if pattern == "mmap" else tft.load(p)
    model, opt = make()
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    # frozen after resuming: Adam skips it, so its state stays the loaded tensors, never written
    # (and, when mapped, pages that only the file backs)
    model[0].requires_grad_(False)
    train(model, opt, 2, epoch)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}
    real_save(state, ref)  # the same state, to a file never loaded
    if pattern in ("mmap", "config_mmap"):
        with tft.patched():
            torch.save(state, p)
    else:
        torch.save(state, p)  # torch's own (patched under install())
    frozen = opt.state[model[0].weight]["exp_avg"]
    assert float(frozen.abs().sum()) > 0  # still readable
    del ck
print("ok")
"""


@pytest.mark.parametrize("pattern", ["plain", "install", "mmap", "config_mmap"])
def test_torch_resume_overwrite(torch, tmp_path, pattern):
    assert run_child(TORCH_RESUME, tmp_path, pattern) == "ok"
    assert_same_file_values(tmp_path / "last.ckpt", tmp_path / "ref.ckpt", torch)
    assert torch.load(tmp_path / "last.ckpt")["epoch"] == 3
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "ref.ckpt"]


def test_torch_load_maps_only_when_asked(torch, tmp_path):
    import torchfree.torch as tft
    from torch.utils.serialization import config
    from torchfree import _files

    p = tmp_path / "a.pt"
    torch.save({"w": torch.arange(1000.0)}, p)
    st = os.stat(p)
    sd = tft.load(p)
    assert not _files._noted(st)  # torch.load's default: read, not mapped
    sd = tft.load(p, mmap=True)
    assert _files._noted(st)
    del sd
    prev = config.load.mmap
    config.load.mmap = True
    try:
        sd = tft.load(p)
        assert _files._noted(st)
        with tft.patched():
            sd2 = torch.load(p)
        del sd
        assert _files._noted(st)
        del sd2
    finally:
        config.load.mmap = prev
    assert not _files._noted(st)
    with tft.patched():
        sd = torch.load(p)
    assert not _files._noted(st) and sd["w"][999] == 999.0


@pytest.mark.parametrize("mmap", [None, False, True])
def test_torch_copy_load_callable_sees_bytes(torch, tmp_path, mmap):
    """Copying from the file (torch's default now), a storage map_location hands to torch during
    the load (a callable; a device restore likewise) is read before that, not after unpickling
    with the others."""
    import torchfree.torch as tft

    p = tmp_path / "a.pt"
    g = torch.Generator().manual_seed(0)
    sd = {f"t{i}": torch.randn(50 + i * 37, generator=g) for i in range(40)}
    sd["view"] = sd["t3"][5:20]
    torch.save(sd, p)
    seen = []

    def to_copy(storage, loc):
        seen.append(bytes(storage[:8]))
        return storage.clone()

    got = tft.load(p, map_location=to_copy, mmap=mmap)
    exp_seen, seen[:] = seen[:], []
    exp = torch.load(p, map_location=to_copy)
    assert exp_seen == seen
    _torch_same(torch, got, exp)
    assert got["view"].untyped_storage().data_ptr() == got["t3"].untyped_storage().data_ptr()
    _torch_same(torch, tft.load(p, map_location=lambda s, loc: s, mmap=mmap), exp)
    _torch_same(torch, tft.load(p, map_location={"cpu": "cpu"}, mmap=mmap), exp)


def test_torch_file_object_over_mapped_file_refused(torch, tmp_path):
    import torchfree.torch as tft

    p = tmp_path / "a.pt"
    torch.save({"w": torch.arange(100_000.0)}, p)
    before = p.read_bytes()
    sd = tft.load(p, mmap=True)
    for save in (tft.save, torchfree.save):
        with open(p, "r+b") as f:
            with pytest.raises(OSError, match="mmap=False") as e:
                save({"w": torch.zeros(3)} if save is tft.save else {"w": np.zeros(3)}, f)
            assert e.value.errno == errno.ETXTBSY
    with tft.patched(), open(p, "r+b") as f:
        with pytest.raises(OSError, match="map"):
            torch.save({"w": torch.zeros(3)}, f)
    assert p.read_bytes() == before and float(sd["w"][-1]) == 99_999.0


TORCH_MMAP_THEN_TORCHFREE = r"""
import os, sys
import numpy as np
import torch
import torchfree
d = sys.argv[1]
p, ref = os.path.join(d, "a.pt"), os.path.join(d, "ref.pt")
torch.save({"w": torch.arange(300_000.0), "b": torch.ones(70_000)}, p)
sd = torch.load(p, mmap=True)  # torch's own mapping: found in /proc/self/maps
new = {"w": sd["w"].numpy() * 2, "b": sd["b"].numpy()}  # b: a view of torch's mapping
torchfree.save(new, ref)
torchfree.save(new, p, atomic=False)
assert float(sd["w"][-1]) == 299_999.0 and float(sd["b"].sum()) == 70_000.0
print("ok")
"""


def test_torch_mmap_then_torchfree_save_atomic_false(torch, tmp_path):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps")
    assert run_child(TORCH_MMAP_THEN_TORCHFREE, tmp_path) == "ok"
    assert_same_file_values(tmp_path / "a.pt", tmp_path / "ref.pt", torch)
