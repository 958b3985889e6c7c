"""Issue 19 fixes: `open` of a checkpoint with globals outside the allowlist lists and reads its
tensors, `.load()` keeping weights_only's rules (item 5); `load`/`scan`/`open`/`info` of a
safetensors file, recognised by its header (item 9)."""

from __future__ import annotations

import collections
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import torchfree
import torchfree.safetensors


# ---- item 5: open() of a checkpoint with unknown globals -------------------------------------------


class Hyper:
    """A stand-in for Lightning's hyper_parameters object (pickled by class, never importable by us)."""

    def __init__(self, lr, layers):
        self.lr, self.layers = lr, layers


def _unknown_globals_ckpt(torch, path, legacy=False):
    g = torch.Generator().manual_seed(0)
    sd = collections.OrderedDict([
        ("fc1.weight", torch.randn(4, 3, generator=g)),
        ("fc1.bias", torch.randn(4, generator=g).to(torch.bfloat16)),
        ("emb", torch.arange(10, dtype=torch.int64)),
    ])
    sd["view"] = sd["emb"][2:8:2]
    obj = {"state_dict": sd, "hyper_parameters": Hyper(1e-3, [3, 4]), "tags": frozenset({"a", "b"}), "epoch": 7}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return obj


def _same(arr, t, torch):
    ref = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    got = arr.astype(np.float32) if t.dtype == torch.bfloat16 else arr
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if t.dtype == torch.bfloat16:
        assert arr.view(np.uint16).tobytes() == t.view(torch.int16).numpy().tobytes()
    assert got.tobytes() == ref.tobytes()


@pytest.mark.needs_torch
@pytest.mark.parametrize("legacy", [False, True])
def test_open_reads_tensors_past_unknown_globals(torch, tmp_path, legacy):
    p = tmp_path / "lightning.ckpt"
    _unknown_globals_ckpt(torch, p, legacy)
    ref = torch.load(p, weights_only=False)
    with pytest.raises(torchfree.UnsafeGlobalError):
        torchfree.load(p)  # load keeps weights_only's rules
    with torchfree.open(p) as ck:
        names = [f"state_dict.{k}" for k in ref["state_dict"]]
        assert [k for k in ck.keys() if k.startswith("state_dict.")] == names
        for k, t in ref["state_dict"].items():
            _same(ck[f"state_dict.{k}"], t, torch)
        info = ck.info
        assert [t.name for t in info.tensors if t.name.startswith("state_dict.")] == names
        assert any("Hyper" in g for g in info.globals) and "builtins.frozenset" in info.globals
        # the whole object: weights_only's rules, as torchfree.load
        with pytest.raises(torchfree.UnsafeGlobalError, match="Hyper"):
            ck.load()
    with torchfree.open(p, weights_only=False) as ck:
        whole = ck.load()
        assert isinstance(whole["hyper_parameters"], torchfree.Opaque)
        _same(whole["state_dict"]["fc1.weight"], ref["state_dict"]["fc1.weight"], torch)


@pytest.mark.needs_torch
def test_open_file_object_with_unknown_globals(torch, tmp_path):
    p = tmp_path / "lightning.ckpt"
    _unknown_globals_ckpt(torch, p)
    ref = torch.load(p, weights_only=False)
    with builtins_open(p) as fh, torchfree.open(fh) as ck:
        _same(ck["state_dict.fc1.weight"], ref["state_dict"]["fc1.weight"], torch)
        with pytest.raises(torchfree.UnsafeGlobalError):
            ck.load()
    ck = torchfree.open(p.read_bytes())
    _same(ck["state_dict.view"], ref["state_dict"]["view"], torch)
    ck.close()


def builtins_open(p):
    import builtins

    return builtins.open(p, "rb")


def test_open_unknown_global_without_torch(tmp_path):
    """The same with a checkpoint torchfree writes and a hand-made global (no torch needed)."""
    import pickle
    import zipfile

    p = tmp_path / "sd.pt"
    sd = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    torchfree.save(sd, p)
    # add an unknown global's instance to data.pkl's top-level dict: rewrite the pickle by hand
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
        members = {n: z.read(n) for n in names}
    pkl = next(n for n in names if n.endswith("/data.pkl"))
    data = members[pkl]
    assert data[-1:] == b"."
    # before STOP the top-level dict is on the stack: SETITEM("cfg", mymod.Cfg())
    extra = b"X\x03\x00\x00\x00cfg" + b"cmymod\nCfg\n)\x81" + b"s"
    members[pkl] = data[:-1] + extra + b"."
    q = tmp_path / "sd2.pt"
    with zipfile.ZipFile(q, "w", zipfile.ZIP_STORED) as z:
        for n in names:
            z.writestr(n, members[n])
    with pytest.raises(torchfree.UnsafeGlobalError):
        torchfree.load(q)
    with torchfree.open(q) as ck:
        assert list(ck.keys()) == ["w"]
        np.testing.assert_array_equal(ck["w"], sd["w"])
        assert "mymod.Cfg" in ck.info.globals
        with pytest.raises(torchfree.UnsafeGlobalError, match="mymod.Cfg"):
            ck.load()
    assert isinstance(torchfree.open(q, weights_only=False).load()["cfg"], torchfree.Opaque)
    del pickle


# ---- item 9: safetensors files through load / scan / open / info ------------------------------------


def _st_file(path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {
        "embed.weight": rng.standard_normal((5, 4)).astype(np.float32),
        "embed.half": rng.standard_normal((3, 2)).astype(np.float16),
        "ids": np.arange(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "u8": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "d": rng.standard_normal(3),
        "scalar": np.array(3, dtype=np.int32),
        "empty": np.zeros((0, 3), np.float32),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def _assert_bitwise(got, ref):
    assert isinstance(got, collections.OrderedDict)
    assert list(got) == list(ref)
    for k, r in ref.items():
        g = got[k]
        assert isinstance(g, np.ndarray), k
        assert g.dtype == r.dtype and g.shape == r.shape, k
        assert g.tobytes() == r.tobytes(), k


@pytest.mark.parametrize("name", ["model.safetensors", "model.bin", "weights"])
def test_load_safetensors_by_content(tmp_path, name):
    from safetensors.numpy import load_file as ref_load

    p = tmp_path / name
    _st_file(p)
    ref = ref_load(str(p))
    ours = torchfree.safetensors.load_file(p)
    _assert_bitwise(ours, ref)
    _assert_bitwise(torchfree.load(p), ref)
    _assert_bitwise(torchfree.load(str(p), mmap=False), ref)
    _assert_bitwise(torchfree.load(p, mmap=True), ref)
    _assert_bitwise(torchfree.load(p, map_location="cpu"), ref)
    a = torchfree.load(p, mmap=False)["embed.weight"]
    assert a.flags.owndata or a.base is not None
    a[0, 0] = 99  # writable, and never reaches the file
    _assert_bitwise(torchfree.load(p), ref)


def test_load_safetensors_bytes_and_file_object(tmp_path):
    from safetensors.numpy import load_file as ref_load

    p = tmp_path / "m.safetensors"
    _st_file(p)
    ref = ref_load(str(p))
    raw = p.read_bytes()
    for src in (raw, bytearray(raw), memoryview(raw), io.BytesIO(raw)):
        out = torchfree.load(src)
        _assert_bitwise(out, ref)
        out["ids"][0] = 5  # arrays the caller owns
    fh = io.BytesIO(b"junk" + raw)
    fh.seek(4)
    _assert_bitwise(torchfree.load(fh), ref)


def test_load_safetensors_meta(tmp_path):
    p = tmp_path / "m.safetensors"
    t = _st_file(p)
    out = torchfree.load(p, map_location="meta")
    assert list(out) == list(torchfree.safetensors.load_file(p))  # header order
    assert sorted(out) == sorted(t)
    for k, v in t.items():
        assert out[k] == torchfree.MetaArray(v.shape, v.dtype)
    out = torchfree.load(p, map_location={"cpu": "meta"})
    assert isinstance(out["ids"], torchfree.MetaArray)
    with pytest.raises(TypeError, match="safetensors"):
        torchfree.load(p, map_location=lambda s, loc: s)


def test_scan_safetensors(tmp_path):
    from safetensors import safe_open as ref_open

    p = tmp_path / "m.bin"
    t = _st_file(p)
    info = torchfree.scan(p)
    assert isinstance(info, torchfree.CheckpointInfo)
    assert info.format == "safetensors"
    by = {ti.name: ti for ti in info.tensors}
    with ref_open(str(p), "np") as f:
        assert sorted(by) == sorted(f.keys())
        for k in f.keys():
            assert by[k].shape == t[k].shape and by[k].dtype == t[k].dtype
            assert by[k].nbytes == t[k].nbytes
    assert info.total_bytes == sum(v.nbytes for v in t.values())
    assert info == torchfree.safetensors.scan(p)
    # from bytes too
    b = torchfree.scan(p.read_bytes())
    assert b.format == "safetensors" and [x.name for x in b.tensors] == [x.name for x in info.tensors]


def test_open_safetensors(tmp_path):
    from safetensors import safe_open as ref_open

    p = tmp_path / "m.pt"
    t = _st_file(p)
    with torchfree.open(p) as ck, ref_open(str(p), "np") as ref:
        assert isinstance(ck, torchfree.Checkpoint)
        assert sorted(ck.keys()) == sorted(ref.keys()) and len(ck) == len(t)
        assert "ids" in ck and "nope" not in ck
        for k in ref.keys():
            g, r = ck[k], ref.get_tensor(k)
            assert g.dtype == r.dtype and g.shape == r.shape and g.tobytes() == r.tobytes()
        assert ck["ids"] is ck["ids"]
        assert ck.get("nope") is None
        assert ck.info.format == "safetensors"
        _assert_bitwise(ck.load(), collections.OrderedDict((k, ref.get_tensor(k)) for k in ck.keys()))
        assert dict(ck.items()).keys() == set(t)
    with pytest.raises(ValueError, match="closed"):
        ck["ids"]
    with torchfree.open(p, map_location="meta") as ck:
        assert ck["ids"] == torchfree.MetaArray((7,), np.dtype(np.int64))


def _corrupt(tmp_path, raw, name="bad.bin"):
    q = tmp_path / name
    q.write_bytes(raw)
    return q


@pytest.mark.parametrize("fn", ["load", "scan", "open"])
def test_corrupted_safetensors_header_names_the_problem(tmp_path, fn):
    p = tmp_path / "m.safetensors"
    _st_file(p)
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    cases = []
    # JSON cut short
    cases.append((raw[:8] + b"{" + b" " * (n - 1) + raw[8 + n :], "JSON"))
    # a tensor whose offsets run past the data section
    h = dict(header)
    h["ids"] = dict(h["ids"], data_offsets=[0, 10**9])
    hb = json.dumps(h).encode()
    cases.append((struct.pack("<Q", len(hb)) + hb + raw[8 + n :], "ids"))
    # an unknown dtype
    h = dict(header)
    h["ids"] = dict(h["ids"], dtype="Q99")
    hb = json.dumps(h).encode()
    cases.append((struct.pack("<Q", len(hb)) + hb + raw[8 + n :], "Q99"))
    # a length field past the end of the file
    cases.append((struct.pack("<Q", len(raw)) + raw[8:], "length"))
    for i, (bad, what) in enumerate(cases):
        q = _corrupt(tmp_path, bad, f"bad{i}.bin")
        with pytest.raises(torchfree.CheckpointError, match=what) as ei:
            getattr(torchfree, fn)(q)
        assert "safetensors" in str(ei.value)


def test_not_safetensors_still_a_torch_error(tmp_path):
    q = _corrupt(tmp_path, b"hello world, not a checkpoint at all")
    with pytest.raises(torchfree.FormatError, match="not a torch checkpoint"):
        torchfree.load(q)


def test_info_cli_safetensors(tmp_path):
    p = tmp_path / "m.bin"
    t = _st_file(p)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(torchfree.__file__)))
    r = subprocess.run([sys.executable, "-m", "torchfree", "info", str(p), "--json"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["format"] == "safetensors"
    assert sorted(x["name"] for x in d["tensors"]) == sorted(t)


def test_open_safetensors_bytes_and_file_object(tmp_path):
    from safetensors.numpy import load_file as ref_load

    p = tmp_path / "m.safetensors"
    _st_file(p)
    ref = ref_load(str(p))
    raw = p.read_bytes()
    for src in (raw, io.BytesIO(raw)):
        with torchfree.open(src) as ck:
            assert list(ck.keys()) == list(ref)
            for k, r in ref.items():
                assert ck[k].dtype == r.dtype and ck[k].tobytes() == r.tobytes()
            whole = ck.load()
            _assert_bitwise(whole, ref)
            whole["ids"][0] = 42  # load's arrays are its own
            assert ck["ids"][0] == ref["ids"][0]
            assert ck.info.format == "safetensors" and ck.info.path is None
    assert torchfree.scan(io.BytesIO(raw)).format == "safetensors"
    with pytest.raises(ValueError, match="mmap"):
        torchfree.open(raw, mmap=True)


def test_safetensors_header_length_like_a_pickle_proto(tmp_path):
    """A header length whose low byte is 0x80 (a pickle's PROTO opcode) is still safetensors."""
    from safetensors.numpy import load_file as ref_load, save_file

    t = {"w": np.arange(4, dtype=np.float32)}
    for pad in range(300):
        p = tmp_path / f"m{pad}.bin"
        save_file(t, str(p), metadata={"pad": "x" * pad})
        if p.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a 0x80 length byte")
    _assert_bitwise(torchfree.load(p), ref_load(str(p)))
    assert torchfree.scan(p).format == "safetensors"
