"""The `torchfree` command line, run as a subprocess (`python -m torchfree ...`): output and exit
status of info, diff and convert; conversions checked with the safetensors package and numpy."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors

import torchfree
from torchfree import safetensors as st

DATA = Path(__file__).resolve().parent / "data"
TRAIN = DATA / "train_ckpt.pt"
VIEWS = DATA / "sd_views.pt"
PROTO4 = DATA / "proto4.pt"  # has a bfloat16 tensor

# the subprocess imports the torchfree these tests import (an in-place build or the installed one)
ENV = dict(os.environ)
ENV["PYTHONPATH"] = os.pathsep.join(
    [str(Path(torchfree.__file__).resolve().parents[1])] + ([ENV["PYTHONPATH"]] if ENV.get("PYTHONPATH") else []))
ENV.pop("COLUMNS", None)


def run(*args, check=None, **kw):
    r = subprocess.run([sys.executable, "-m", "torchfree", *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=120, **kw)
    if check is not None:
        assert r.returncode == check, (r.returncode, r.stdout, r.stderr)
    return r


def assert_clean_error(r, *needles):
    """Exit status 2 and exactly one line on stderr: 'torchfree: error: ...'."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("torchfree: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def flat_of(path, **kw):
    return torchfree.flatten(torchfree.load(path, **kw))


def assert_flat_equal(got, exp):
    assert list(got) == list(exp)
    for k in exp:
        a, b = got[k], exp[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), k


# ---- help, usage -----------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", [[], ["info"], ["diff"], ["convert"]])
def test_help(cmd):
    r = run(*cmd, "--help", check=0)
    assert r.stdout.startswith("usage: torchfree")
    assert r.stderr == ""
    if cmd:
        assert f"torchfree {cmd[0]}" in r.stdout


def test_no_command_and_bad_usage():
    r = run(check=2)
    assert "usage: torchfree" in r.stderr and r.stdout == ""
    r = run("info", check=2)
    assert "required" in r.stderr
    r = run("frobnicate", "x", check=2)
    assert "invalid choice" in r.stderr
    r = run("--version", check=0)
    assert r.stdout.strip() == f"torchfree {torchfree.__version__}"


def test_console_script_declared():
    import tomllib

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert meta["scripts"] == {"torchfree": "torchfree.cli:main"}
    assert {"pytest", "safetensors"} <= set(meta["optional-dependencies"]["test"])
    from torchfree.cli import main

    assert main(["info", str(TRAIN), "--json"]) == 0


# ---- info --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [TRAIN, VIEWS, PROTO4])
def test_info_table_and_json(path):
    r = run("info", path, check=0)
    assert r.stdout == str(torchfree.scan(path)) + "\n"
    assert r.stderr == ""
    info = torchfree.scan(path)
    r = run("info", path, "--json", "--records", check=0)
    assert json.loads(r.stdout) == json.loads(info.to_json())
    d = json.loads(run("info", path, "--json", check=0).stdout)
    full = info.to_dict()
    assert {k: d.pop(k) for k in ("tensor_count", "storage_count")} == {"tensor_count": len(info.tensors),
                                                                         "storage_count": len(info.storages)}
    assert d.pop("tensors") == [{"name": t["name"], "dtype": t["torch_dtype"], "shape": t["shape"],
                                 "stride": t["stride"], "storage": t["storage_key"], "offset": t["storage_offset"],
                                 "nbytes": t["nbytes"], "location": t["location"]} for t in full["tensors"]]
    assert d == {k: v for k, v in full.items() if k not in ("tensors", "records", "storages")}


def test_info_safetensors_and_npz(tmp_path):
    s = tmp_path / "m.safetensors"
    st.save_file({"w": np.zeros((3, 4), np.float16), "b": np.ones(4, ml_dtypes.bfloat16)}, s, {"format": "pt"})
    r = run("info", s, check=0)
    assert "safetensors checkpoint" in r.stdout and "metadata: format=pt" in r.stdout
    assert "w " in r.stdout and "3x4" in r.stdout and "bfloat16" in r.stdout
    d = json.loads(run("info", s, "--json", check=0).stdout)
    assert d["format"] == "safetensors" and d["metadata"] == {"format": "pt"}
    assert [(t["name"], t["dtype"], t["shape"]) for t in d["tensors"]] == [("w", "float16", [3, 4]),
                                                                          ("b", "bfloat16", [4])]
    z = tmp_path / "m.npz"
    np.savez(z, **{"a.b": np.arange(6.0).reshape(2, 3), "c": np.asfortranarray(np.ones((2, 3), np.int32))})
    d = json.loads(run("info", z, "--json", check=0).stdout)
    assert d["format"] == "npz"
    assert {t["name"]: (t["dtype"], t["shape"], t["stride"]) for t in d["tensors"]} == {
        "a.b": ("float64", [2, 3], [3, 1]), "c": ("int32", [2, 3], [1, 2])}


# ---- errors ------------------------------------------------------------------------------------


def test_errors_are_one_line(tmp_path):
    assert_clean_error(run("info", tmp_path / "missing.pt"), "missing.pt", "No such file")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, not a checkpoint")
    assert_clean_error(run("info", junk), "junk.pt", "not a torch checkpoint")
    assert_clean_error(run("diff", TRAIN, junk), "junk.pt")
    assert_clean_error(run("convert", junk, tmp_path / "o.safetensors"), "junk.pt")
    assert_clean_error(run("info", tmp_path), str(tmp_path))
    assert_clean_error(run("convert", TRAIN, tmp_path / "o.xyz"), "o.xyz", "--to")
    assert_clean_error(run("convert", TRAIN, TRAIN), "same file")
    assert_clean_error(run("convert", TRAIN, tmp_path / "nodir" / "o.safetensors"), "nodir")
    assert_clean_error(run("diff", TRAIN, TRAIN, "--atol", "-1"), "--atol")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2]}   ")
    assert_clean_error(run("info", bad), "bad.safetensors")
    assert_clean_error(run("convert", bad, tmp_path / "o.npz"), "bad.safetensors")
    bad.write_bytes(b"\xff" * 8 + b"{}")
    assert_clean_error(run("info", bad), "bad.safetensors", "header length")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(TRAIN.read_bytes()[:300])
    assert_clean_error(run("info", truncated), "trunc.pt")
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob(".o.*"))


def test_unconvertible_dtype_is_one_line_error(tmp_path):
    z = tmp_path / "c.npz"
    np.savez(z, c=np.zeros(3, np.complex128))
    out = tmp_path / "c.safetensors"
    assert_clean_error(run("convert", z, out), "complex128")
    assert not out.exists() and list(tmp_path.iterdir()) == [z]  # no partial output, no temp file


def _evil_checkpoint(path):
    """A zip checkpoint whose pickle names a class outside torch's allowlist: {'a': evil.Thing()}."""
    pk = b"\x80\x02}X\x01\x00\x00\x00acevil\nThing\n)Rs."
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pk)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def test_unsafe_globals(tmp_path):
    evil = tmp_path / "evil.pt"
    _evil_checkpoint(evil)
    line = assert_clean_error(run("diff", evil, evil), "evil.Thing", "--unsafe-globals")
    assert "evil.pt" in line
    assert_clean_error(run("convert", evil, tmp_path / "o.npz"), "evil.Thing", "--unsafe-globals")
    r = run("diff", "--unsafe-globals", evil, evil, check=0)
    assert "same: 0 tensors identical" in r.stdout
    r = run("info", evil, check=0)  # info never needs it: it runs no constructor at all
    assert "other globals: evil.Thing" in r.stdout
    r = run("convert", "--unsafe-globals", evil, tmp_path / "o.npz", check=0)
    assert "not converted: a (evil.Thing)" in r.stderr
    assert np.load(tmp_path / "o.npz").files == []


# ---- diff --------------------------------------------------------------------------------------


def test_diff_same(tmp_path):
    r = run("diff", TRAIN, TRAIN, check=0)
    assert r.stdout.splitlines()[-1] == "same: 15 tensors identical"
    assert r.stderr == ""
    # across formats: the same tensors under the same dotted names
    s = tmp_path / "t.safetensors"
    st.save_file(flat_of(TRAIN), s)
    z = tmp_path / "t.npz"
    np.savez(z, **flat_of(TRAIN))
    for a, b in [(TRAIN, s), (s, z), (z, TRAIN)]:
        r = run("diff", a, b, check=0)
        assert r.stdout.splitlines()[-1] == "same: 15 tensors identical"


def test_diff_reports_every_kind_of_difference(tmp_path):
    flat = flat_of(TRAIN)
    other = collections.OrderedDict((k, np.array(v)) for k, v in flat.items())
    del other["model_state_dict.3.bias"]                                   # only in A
    other["extra.weight"] = np.zeros((2, 2), np.float32)                   # only in B
    other["model_state_dict.0.bias"] = flat["model_state_dict.0.bias"].astype(np.float16)  # dtype change
    other["model_state_dict.3.weight"] = flat["model_state_dict.3.weight"].reshape(3, 2)  # shape change
    w = other["model_state_dict.0.weight"]
    w[1, 2] += 0.25
    w[0, 0] -= 3.0                                                         # two values differ, max 3
    other["model_state_dict.1.num_batches_tracked"] = other["model_state_dict.1.num_batches_tracked"] + 1
    b = tmp_path / "b.safetensors"
    st.save_file(other, b)
    r = run("diff", TRAIN, b, check=1)
    out = r.stdout
    assert "only in A (1):\n  - model_state_dict.3.bias: float32 [2]" in out
    assert "only in B (1):\n  + extra.weight: float32 [2, 2]" in out
    assert "  ~ model_state_dict.0.bias: float32 -> float16 [3], max abs diff" in out
    assert "  ~ model_state_dict.3.weight: float32 [2, 3] -> float32 [3, 2]" in out
    assert "  ! model_state_dict.0.weight: float32 [3, 4]: 2 of 12 elements differ, max abs diff 3" in out
    assert "  ! model_state_dict.1.num_batches_tracked: int64 []: 1 of 1 elements differ, max abs diff 1" in out
    assert out.splitlines()[-1] == ("differ: 1 only in A, 1 only in B, 2 changed, 2 with different values; "
                                    "10 of 14 common tensors identical")
    # tolerance
    r = run("diff", "--atol", "0.5", TRAIN, b, check=1)
    assert "2 of 12" not in r.stdout and "1 of 12 elements differ, max abs diff 3" in r.stdout


def test_diff_nan_and_special_values(tmp_path):
    a = {"x": np.array([np.nan, 1.0, np.inf, -0.0], np.float32), "y": np.array([1, 2], np.uint64),
         "z": np.array([1.5, 2.5], ml_dtypes.bfloat16)}
    b = {"x": np.array([np.nan, 1.0, np.inf, 0.0], np.float32), "y": np.array([1, 2], np.uint64),
         "z": np.array([1.5, 2.5], ml_dtypes.bfloat16)}
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st.save_file(a, pa)
    st.save_file(b, pb)
    r = run("diff", pa, pb, check=0)  # NaN == NaN, -0.0 == 0.0
    assert "same: 3 tensors identical" in r.stdout
    b["x"][1] = np.nan
    b["z"][0] = 1.0
    b["y"][0] = 2**64 - 1
    st.save_file(b, pb)
    r = run("diff", pa, pb, check=1)
    assert "! x: float32 [4]: 1 of 4 elements differ, max abs diff inf" in r.stdout
    assert "! z: bfloat16 [2]: 1 of 2 elements differ, max abs diff 0.5" in r.stdout
    assert "! y: uint64 [2]: 1 of 2 elements differ, max abs diff 1.84467e+19" in r.stdout


def test_diff_large_tensor_in_chunks(tmp_path):
    n = (1 << 22) * 2 + 5  # more than two comparison chunks
    a = np.zeros(n, np.float32)
    b = a.copy()
    b[-1] = 2.0
    b[3] = -1.0
    st.save_file({"v": a}, tmp_path / "a.safetensors")
    st.save_file({"v": b}, tmp_path / "b.safetensors")
    r = run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", check=1)
    assert f"2 of {n:,} elements differ, max abs diff 2" in r.stdout


# ---- convert -----------------------------------------------------------------------------------


@pytest.mark.parametrize("src", [TRAIN, VIEWS])
def test_convert_pt_to_safetensors_read_by_package(tmp_path, src):
    out = tmp_path / "o.safetensors"
    r = run("convert", src, out, check=0)
    assert r.stdout == ""
    exp = flat_of(src)
    # the package's numpy loader knows numpy's own dtypes only; its raw reader gives every tensor
    raw = {k: v for k, v in safetensors.deserialize(out.read_bytes())}
    assert set(raw) == set(exp)
    numpy_native = {k for k, v in exp.items() if not v.dtype.name.startswith(("bfloat16", "float8"))}
    got = safetensors.safe_open(str(out), framework="np")
    for k, v in exp.items():
        assert st.DTYPES[raw[k]["dtype"]] == v.dtype and tuple(raw[k]["shape"]) == v.shape
        assert bytes(raw[k]["data"]) == np.ascontiguousarray(v).tobytes()
        if k in numpy_native:
            t = got.get_tensor(k)
            assert t.dtype == v.dtype
            np.testing.assert_array_equal(t, v)
    with safetensors.safe_open(str(out), framework="np") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers' from_pretrained wants
    assert_flat_equal(st.load_file(out), exp)
    if src == TRAIN:
        assert "torchfree: note: 15 non-tensor value(s) not converted: epoch (int)" in r.stderr
    r = run("convert", "-q", src, out, check=0)  # overwrite, quietly
    assert r.stderr == ""


def test_convert_pt_to_npz_read_by_numpy(tmp_path):
    out = tmp_path / "o.npz"
    r = run("convert", PROTO4, out, check=0)
    assert "stored as float32" in r.stderr and "bf (bfloat16)" in r.stderr
    exp = flat_of(PROTO4)
    with np.load(out, allow_pickle=False) as z:
        assert z.files == list(exp)
        for k, v in exp.items():
            if v.dtype == ml_dtypes.bfloat16:
                assert z[k].dtype == np.float32
                np.testing.assert_array_equal(z[k], v.astype(np.float32))
            else:
                assert z[k].dtype == v.dtype
                np.testing.assert_array_equal(z[k], v)
    # and back to safetensors, values kept
    s = tmp_path / "o.safetensors"
    run("convert", out, s, check=0)
    got = st.load_file(s)
    assert got["bf"].dtype == np.float32 and list(got) == list(exp)
    assert st.metadata(s) == {"format": "np"}


def test_convert_safetensors_npz_safetensors(tmp_path):
    d = {"a.w": np.arange(12, dtype=np.int16).reshape(3, 4), "b": np.array(True), "c": np.ones(3, np.complex64),
         "e": np.zeros((0, 2), np.float64)}
    s = tmp_path / "in.safetensors"
    st.save_file(d, s, {"format": "pt", "k": "v"})
    z = tmp_path / "mid.npz"
    run("convert", s, z, check=0)
    with np.load(z) as f:
        for k, v in d.items():
            np.testing.assert_array_equal(f[k], v)
    s2 = tmp_path / "out.safetensors"
    run("convert", s, s2, check=0)
    assert st.metadata(s2) == {"format": "pt", "k": "v"}  # safetensors -> safetensors keeps metadata
    assert_flat_equal(st.load_file(s2), d)
    s3 = tmp_path / "out3"
    run("convert", z, s3, "--to", "safetensors", check=0)
    assert_flat_equal(st.load_file(s3), d)


def test_convert_round_trip_pt_safetensors_pt(tmp_path):
    """.pt -> .safetensors -> .pt: the tensors come back equal (flat, by dotted name)."""
    for src in (TRAIN, VIEWS, PROTO4):
        s = tmp_path / (src.stem + ".safetensors")
        back = tmp_path / (src.stem + ".back.pt")
        run("convert", "-q", src, s, check=0)
        run("convert", s, back, check=0)
        got = torchfree.load(back)
        assert isinstance(got, collections.OrderedDict)
        assert_flat_equal(got, flat_of(src))
        r = run("diff", src, back, check=0)
        assert r.stdout.splitlines()[-1].startswith("same:")


@pytest.mark.needs_torch
def test_converted_pt_loads_in_torch(tmp_path, torch):
    s = tmp_path / "v.safetensors"
    run("convert", VIEWS, s, check=0)
    back = tmp_path / "v.pt"
    run("convert", s, back, check=0)
    from conftest import TORCH_TO_NP, np_bytes, torch_bytes

    sd = torch.load(back, weights_only=True)
    exp = flat_of(VIEWS)
    assert list(sd) == list(exp)
    for k, v in exp.items():
        t = sd[k]
        assert tuple(t.shape) == v.shape and TORCH_TO_NP[str(t.dtype)[6:]] == v.dtype, k
        assert np.array_equal(torch_bytes(t), np_bytes(v)), k
    # and what the safetensors package's torch loader reads from our file
    import safetensors.torch

    got = safetensors.torch.load_file(str(s))
    assert set(got) == set(exp)
    for k, v in exp.items():
        assert TORCH_TO_NP[str(got[k].dtype)[6:]] == v.dtype, k
        assert np.array_equal(torch_bytes(got[k]), np_bytes(v)), k


def test_convert_npz_to_pt(tmp_path):
    z = tmp_path / "a.npz"
    np.savez(z, **{"x.y": np.arange(5, dtype=np.int32), "z": np.eye(3)})
    out = tmp_path / "a.pth"
    run("convert", z, out, check=0)
    got = torchfree.load(out)
    assert list(got) == ["x.y", "z"]
    np.testing.assert_array_equal(got["z"], np.eye(3))


# ---- progress bar ----------------------------------------------------------------------------


def _big_npz(path):
    np.savez(path, big=np.zeros((65 << 20) // 4, np.float32))


def _run_on_pty(args):
    """Run with stderr on a pseudo-terminal; returns (exit status, what the terminal showed)."""
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([sys.executable, "-m", "torchfree", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=slave, env=ENV)
        os.close(slave)
        chunks = []
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:
                break
            if not b:
                break
            chunks.append(b)
        rc = p.wait(timeout=120)
        p.stdout.close()
    finally:
        os.close(master)
    return rc, b"".join(chunks).decode()


def test_progress_bar_on_terminal_only(tmp_path):
    src = tmp_path / "big.npz"
    _big_npz(src)
    rc, shown = _run_on_pty(["convert", src, tmp_path / "o.safetensors"])
    assert rc == 0
    assert "o.safetensors [" in shown and "100%" in shown and "65.0 MiB / 65.0 MiB" in shown
    # piped: nothing
    r = run("convert", src, tmp_path / "o2.safetensors", check=0)
    assert r.stderr == "" and r.stdout == ""
    # small conversions stay quiet even on a terminal; --progress forces it, --no-progress stops it
    rc, shown = _run_on_pty(["convert", "-q", TRAIN, tmp_path / "s.safetensors"])
    assert rc == 0 and shown == ""
    r = run("convert", "-q", "--progress", TRAIN, tmp_path / "s.safetensors", check=0)
    assert "s.safetensors [" in r.stderr and "100%" in r.stderr
    for out in ("s.pt", "s.npz"):
        r = run("convert", "-q", "--progress", TRAIN, tmp_path / out, check=0)
        assert f"{out} [" in r.stderr and "100%" in r.stderr and r.stderr.endswith("\n")
    rc, shown = _run_on_pty(["convert", "--no-progress", src, tmp_path / "o.npz"])
    assert rc == 0 and shown == ""


def test_progress_unit():
    import io

    from torchfree.cli import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    p = Progress(200 << 20, "x", stream=s)
    assert p.enabled
    for _ in range(200):
        p(1 << 20)
    p.close()
    text = s.getvalue()
    assert text.startswith("\rx [") and text.endswith("\n")
    assert "[############################] 100% 200.0 MiB / 200.0 MiB" in text
    s2 = io.StringIO()  # not a terminal
    p = Progress(200 << 20, "x", stream=s2)
    p(100)
    p.close()
    assert s2.getvalue() == ""


# ---- pipes ---------------------------------------------------------------------------------------


def test_info_into_a_closed_pipe_is_quiet(tmp_path):
    s = tmp_path / "many.safetensors"
    st.save_file({f"layer.{i}.some_long_parameter_name.weight": np.zeros(2, np.float32) for i in range(4000)}, s)
    p = subprocess.Popen([sys.executable, "-m", "torchfree", "info", str(s)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV)
    first = p.stdout.readline()
    p.stdout.close()  # like `| head -1`
    err = p.stderr.read()
    rc = p.wait(timeout=60)
    p.stderr.close()
    assert b"safetensors checkpoint" in first
    assert rc == 0 and err == b"", err


def test_sharded_safetensors_index(tmp_path):
    flat = flat_of(TRAIN)
    names = list(flat)
    wm = {}
    for i, part in enumerate((names[:7], names[7:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        st.save_file({k: flat[k] for k in part}, tmp_path / fname, {"format": "pt"})
        wm.update({k: fname for k in part})
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {"total_size": 264}, "weight_map": wm}))
    r = run("info", idx, check=0)
    assert "sharded safetensors checkpoint" in r.stdout and "15 tensors" in r.stdout
    r = run("diff", TRAIN, idx, check=0)
    assert r.stdout.splitlines()[-1] == "same: 15 tensors identical"
    out = tmp_path / "one.npz"
    run("convert", idx, out, check=0)
    with np.load(out) as z:
        assert z.files == names


@pytest.mark.needs_torch
def test_sharded_bin_index_with_stale_weight_map(tmp_path, torch):
    """diff goes by what the shards hold, not by the index's weight_map."""
    torch.save({"x.w": torch.ones(2, 3), "x.b": torch.zeros(3)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"y.w": torch.arange(4.0)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    idx = tmp_path / "pytorch_model.bin.index.json"
    idx.write_text(json.dumps({"weight_map": {"x.w": "pytorch_model-00001-of-00002.bin",
                                              "y.w": "pytorch_model-00002-of-00002.bin",
                                              "ghost": "pytorch_model-00002-of-00002.bin"}}))
    ref = tmp_path / "ref.safetensors"
    st.save_file({"x.w": np.ones((2, 3), np.float32), "x.b": np.zeros(3, np.float32),
                  "y.w": np.arange(4, dtype=np.float32)}, ref)
    r = run("diff", idx, ref, check=0)
    assert r.stdout.splitlines()[-1] == "same: 3 tensors identical"
    out = tmp_path / "all.npz"
    run("convert", idx, out, check=0)
    assert np.load(out).files == ["x.w", "x.b", "y.w"]


@pytest.mark.parametrize("argv", [["info", "x.pt"], ["info", "--json", "x.pt"], ["info", "x.pt", "--json"]])
def test_quick_info_args_match_argparse(argv):
    """`info [--json] FILE` skips building the parser: the same arguments argparse would give."""
    from torchfree import cli

    assert vars(cli._quick_args(argv)) == vars(cli._parser().parse_args(argv))


@pytest.mark.parametrize("argv", [["info", "-x.pt"], ["info"], ["info", "a", "b"], ["info", "--json", "--json", "a"],
                                  ["--traceback", "info", "a"], ["diff", "a", "b"], ["info", ""], ["info", "--help"]])
def test_other_args_go_to_argparse(argv):
    from torchfree import cli

    assert cli._quick_args(argv) is None
