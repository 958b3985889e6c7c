"""Issue 19, item 6: quantized and sparse tensors are listed by flatten, scan, open().keys(),
info and convert, as the tensors they are.

The files are the kinds PyTorch's own ``test/quantization/serialized/`` data holds, made here
with torch 2.13's ``torch.ao.quantization``: dynamic-quantized Linear and LSTM, static quantized
Conv2d + Linear (prepare / convert), their state_dicts saved with ``torch.save``, and the
modules scripted and traced with ``torch.jit``; plus plain dicts of quantized and sparse
tensors. Each is compared with torch (``int_repr()``, ``q_scale()``, per-channel scales, zero
points and axis, ``torch.jit.load(f).state_dict()``) and with the archive's tensor records:
every ``data/`` record must be viewed by a listed tensor.
"""

import json
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest

import torchfree
from torchfree import QuantInfo, QuantizedArray, SparseArray


def _build(torch, path, kind):
    """Write one file of the given kind; return the eager torch object it was made from."""
    nn = torch.nn
    tq = torch.ao.quantization
    torch.manual_seed(0)
    warnings.simplefilter("ignore")

    class LW(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 3, num_layers=2)

        def forward(self, x):
            return self.lstm(x)[0]

    class Static(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = tq.QuantStub()
            self.c = nn.Conv2d(2, 3, 3)
            self.fc = nn.Linear(12, 5)
            self.dq = tq.DeQuantStub()

        def forward(self, x):
            x = self.c(self.q(x))
            return self.dq(self.fc(x.reshape(x.shape[0], -1)))

    model, example = kind.split("-")
    if model == "dyn":
        m = tq.quantize_dynamic(nn.Sequential(nn.Linear(4, 3)), {nn.Linear}, dtype=torch.qint8)
        x = torch.randn(2, 4)
    elif model == "lstm":
        m = tq.quantize_dynamic(LW(), {nn.LSTM}, dtype=torch.qint8)
        x = torch.randn(5, 1, 4)
    else:
        m = Static().eval()
        m.qconfig = tq.get_default_qconfig("fbgemm")  # per-channel weights
        tq.prepare(m, inplace=True)
        m(torch.randn(2, 2, 4, 4))
        tq.convert(m, inplace=True)
        x = torch.randn(2, 2, 4, 4)
    if example == "sd":
        torch.save(m.state_dict(), path)
    elif example == "script":
        torch.jit.save(torch.jit.script(m), path)
    else:
        torch.jit.save(torch.jit.trace(m, x), path)
    return m.state_dict()


KINDS = ["dyn-sd", "dyn-script", "dyn-trace", "lstm-sd", "lstm-script", "static-sd", "static-script",
         "static-trace"]


def _torch_quantized(torch, obj, out, seen=None):
    """Every quantized tensor under obj (ScriptObjects through their __getstate__), in walk order."""
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return out
    seen[id(obj)] = obj  # kept: a __getstate__ tuple's id is not reused while the walk runs
    if isinstance(obj, torch.Tensor):
        if obj.is_quantized:
            out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _torch_quantized(torch, v, out, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _torch_quantized(torch, v, out, seen)
    elif isinstance(obj, torch.ScriptObject):
        _torch_quantized(torch, obj.__getstate__(), out, seen)
    return out


def _same_quantized(torch, q, t):
    """QuantizedArray q is torch's quantized tensor t, bit for bit."""
    assert isinstance(q, QuantizedArray)
    assert q.dtype == str(t.dtype) and q.shape == tuple(t.shape)
    assert q.int_repr.dtype == t.int_repr().numpy().dtype
    assert np.array_equal(q.int_repr, t.int_repr().numpy())
    assert q.qscheme == str(t.qscheme())
    if t.qscheme() == torch.per_tensor_affine:
        assert q.axis is None and q.scale == t.q_scale() and q.zero_point == t.q_zero_point()
    else:
        assert q.axis == t.q_per_channel_axis()
        assert np.array_equal(q.scale, t.q_per_channel_scales().numpy())
        assert q.scale.tobytes() == t.q_per_channel_scales().numpy().tobytes()
        assert np.array_equal(q.zero_point, t.q_per_channel_zero_points().numpy())


def _qkey(q):
    return (q.dtype, q.shape, q.int_repr.tobytes(), np.asarray(q.scale).tobytes(), np.asarray(q.zero_point).tobytes())


def _records(path):
    """Keys of the archive's tensor records (the names after data/)."""
    with zipfile.ZipFile(path) as z:
        return {n.split("/data/", 1)[1] for n in z.namelist() if "/data/" in n and not n.endswith("/")}


def _referenced(infos):
    keys = set()
    for t in infos:
        if t.storage_key is not None:
            keys.add(t.storage_key)
        keys |= _referenced(t.parts)
    return keys


def _record_bytes(path, key):
    with zipfile.ZipFile(path) as z:
        (name,) = [n for n in z.namelist() if n.endswith("/data/" + key)]
        return z.read(name)


@pytest.mark.needs_torch
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_models_list_every_qint8_weight(torch, tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    eager_sd = _build(torch, path, kind)
    expected = _torch_quantized(torch, eager_sd, [])
    assert expected and all(t.dtype == torch.qint8 for t in expected)

    info = torchfree.scan(path)
    with torchfree.open(path) as ck:
        keys = list(ck.keys())
        got = {k: ck[k] for k in keys}
    assert [t.name for t in info.tensors] == keys
    if kind.endswith("-sd"):  # torch.load reads these: flatten of load names them alike
        assert list(torchfree.flatten(torchfree.load(path, weights_only=False))) == keys

    qs = [v for v in got.values() if isinstance(v, QuantizedArray)]
    # every quantized tensor torch made is listed, bit for bit (the same ones, in walk order)
    assert sorted(map(_qkey, qs)) == sorted(_qkey(_tf(t)) for t in expected)
    by_key = {_qkey(_tf(t)): t for t in expected}
    for q in qs:
        _same_quantized(torch, q, by_key[_qkey(q)])
    for t in info.tensors:
        if t.dtype in ("torch.qint8", "torch.quint8"):
            q = got[t.name]
            assert t.quant == QuantInfo(q.qscheme, q.scale if q.axis is None else tuple(q.scale.tolist()),
                                        q.zero_point if q.axis is None else tuple(q.zero_point.tolist()), q.axis)
            assert t.shape == q.shape and t.nbytes == q.int_repr.nbytes
            raw = _record_bytes(path, t.storage_key)
            assert raw[t.storage_offset:t.storage_offset + t.nbytes] == np.ascontiguousarray(q.int_repr).tobytes()

    # every tensor record of the archive is viewed by a listed tensor
    assert _referenced(info.tensors) == _records(path)

    if not kind.endswith("-sd"):  # what torch's own state_dict() of the loaded module has
        jsd = torch.jit.load(path).state_dict()
        for name, t in jsd.items():
            if name in got:
                assert np.array_equal(np.asarray(got[name]), t.detach().numpy())


def _tf(t):
    """torch quantized tensor -> QuantizedArray (for the keys)."""
    ir = t.int_repr().numpy()
    if t.qscheme() == __import__("torch").per_tensor_affine:
        return QuantizedArray(ir, str(t.dtype), t.q_scale(), t.q_zero_point())
    return QuantizedArray(ir, str(t.dtype), t.q_per_channel_scales().numpy(), t.q_per_channel_zero_points().numpy(),
                          t.q_per_channel_axis())


@pytest.mark.needs_torch
def test_plain_quantized_and_sparse_tensors_are_listed(torch, tmp_path):
    torch.manual_seed(0)
    w = torch.randn(4, 3)
    pc = torch.quantize_per_channel(w, torch.tensor([0.1, 0.2, 0.05, 0.3], dtype=torch.float64),
                                    torch.tensor([0, 1, -1, 2]), 0, torch.qint8)
    objs = {
        "s": torch.randn(3, 3).to_sparse(),
        "c": torch.randn(3, 3).to_sparse_csr(),
        "q": torch.quantize_per_tensor(torch.randn(3), 0.1, 2, torch.quint8),
        "pc": pc,
        "dense": torch.arange(3.0),
    }
    path = tmp_path / "mix.pt"
    torch.save(objs, path)

    flat = torchfree.flatten(torchfree.load(path))
    info = torchfree.scan(path)
    with torchfree.open(path) as ck:
        keys = list(ck.keys())
        q_open, s_open = ck["q"], ck["s"]
    assert list(flat) == keys == [t.name for t in info.tensors] == list(objs)
    assert isinstance(q_open, QuantizedArray) and isinstance(s_open, SparseArray)
    _same_quantized(torch, flat["q"], objs["q"])
    _same_quantized(torch, flat["pc"], pc)
    _same_quantized(torch, q_open, objs["q"])
    assert np.array_equal(flat["s"].todense(), objs["s"].to_dense().numpy())
    assert np.array_equal(flat["c"].todense(), objs["c"].to_dense().numpy())

    t = info["q"]
    assert (t.dtype, t.torch_dtype, t.shape, t.layout) == ("torch.quint8", "quint8", (3,), "torch.strided")
    assert t.quant == QuantInfo("torch.per_tensor_affine", objs["q"].q_scale(), 2, None)
    t = info["pc"]
    assert t.quant == QuantInfo("torch.per_channel_affine", (0.1, 0.2, 0.05, 0.3), (0, 1, -1, 2), 0)
    assert [p.name for p in t.parts] == ["pc.q_per_channel_scales", "pc.q_per_channel_zero_points"]
    s = info["s"]
    assert (s.layout, s.nnz, s.shape, s.storage_key, s.quant) == ("torch.sparse_coo", 9, (3, 3), None, None)
    assert [p.name for p in s.parts] == ["s.indices", "s.values"]
    assert [p.name for p in info["c"].parts] == ["c.crow_indices", "c.col_indices", "c.values"]
    assert info["c"].nnz == objs["c"]._nnz() and info["c"].layout == "torch.sparse_csr"
    assert info["dense"].layout == "torch.strided" and info["dense"].parts == () and info["dense"].quant is None
    assert _referenced(info.tensors) == _records(path)
    d = info.to_dict()
    json.dumps(d)
    assert {x["name"]: x["quant"] for x in d["tensors"]}["q"]["zero_point"] == 2
    text = str(info)
    assert "per_tensor_affine scale=" in text and "sparse_coo nnz=9" in text


@pytest.mark.needs_torch
def test_legacy_streams_list_them_too(torch, tmp_path):
    """A pre-zip stream holds its bytes after its pickle: scan lists its quantized and sparse
    tensors as a zip's scan does (only the storage keys differ)."""
    torch.manual_seed(0)
    objs = {"s": torch.randn(3, 3).to_sparse(), "q": torch.quantize_per_tensor(torch.randn(3), 0.1, 2, torch.quint8),
            "dense": torch.arange(3.0)[1:]}
    zp, lp = tmp_path / "z.pt", tmp_path / "l.pt"
    torch.save(objs, zp)
    torch.save(objs, lp, _use_new_zipfile_serialization=False)
    z, leg = torchfree.scan(zp), torchfree.scan(lp)
    assert [t.name for t in leg.tensors] == [t.name for t in z.tensors] == list(objs)

    def same(a, b):
        keep = ("name", "dtype", "shape", "stride", "storage_offset", "nbytes", "location", "torch_dtype", "layout",
                "quant", "nnz")
        assert [getattr(a, k) for k in keep] == [getattr(b, k) for k in keep]
        assert (a.storage_key is None) == (b.storage_key is None)
        for pa, pb in zip(a.parts, b.parts, strict=True):
            same(pa, pb)

    for a, b in zip(leg.tensors, z.tensors):
        same(a, b)
    assert {s.key for s in leg.storages} == _referenced(leg.tensors)
    with torchfree.open(lp) as ck:
        assert list(ck.keys()) == list(objs)
        _same_quantized(torch, ck["q"], objs["q"])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "torchfree", *map(str, args)], capture_output=True, text=True)


@pytest.mark.needs_torch
def test_info_and_convert(torch, tmp_path):
    path = tmp_path / "static-script.pt"
    eager = _build(torch, path, "static-script")
    r = _cli("info", "--json", path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    quant = {t["name"]: t["quant"] for t in d["tensors"] if t.get("quant")}
    assert set(quant) == {"c.10", "fc._packed_params._packed_params.0"}
    w = eager["fc._packed_params._packed_params"][0]
    assert quant["fc._packed_params._packed_params.0"]["scale"] == w.q_per_channel_scales().tolist()

    out = tmp_path / "out.safetensors"
    r = _cli("convert", path, out)
    assert r.returncode == 0, r.stderr
    from torchfree import safetensors as st

    got = st.load_file(out)
    name = "fc._packed_params._packed_params.0"
    assert np.array_equal(got[name], w.int_repr().numpy()) and got[name].dtype == np.int8
    assert got[name + ".scale"].tobytes() == w.q_per_channel_scales().numpy().tobytes()
    assert np.array_equal(got[name + ".zero_point"], w.q_per_channel_zero_points().numpy())
    assert int(got[name + ".axis"]) == w.q_per_channel_axis()

    # per tensor: 0-d scale and zero_point; npz the same
    mix = tmp_path / "mix.pt"
    q = torch.quantize_per_tensor(torch.randn(5), 0.25, 3, torch.quint8)
    torch.save({"q": q}, mix)
    out = tmp_path / "q.npz"
    r = _cli("convert", mix, out)
    assert r.returncode == 0, r.stderr
    with np.load(out) as z:
        assert np.array_equal(z["q"], q.int_repr().numpy())
        assert z["q.scale"].shape == () and float(z["q.scale"]) == 0.25 and int(z["q.zero_point"]) == 3
    # pt keeps it quantized
    out = tmp_path / "q2.pt"
    assert _cli("convert", mix, out).returncode == 0
    _same_quantized(torch, torchfree.load(out)["q"], q)
    back = torch.load(out)["q"]
    assert torch.equal(back.int_repr(), q.int_repr()) and back.q_scale() == 0.25 and back.q_zero_point() == 3

    # sparse: a clear error naming the tensor
    sp = tmp_path / "sp.pt"
    torch.save({"emb": torch.randn(3, 3).to_sparse()}, sp)
    r = _cli("convert", sp, tmp_path / "sp.safetensors")
    assert r.returncode != 0 and "emb" in r.stderr and "sparse" in r.stderr
