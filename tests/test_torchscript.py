"""TorchScript archives (torch.jit.save): load, scan and open without torch.

The oracle is torch 2.13 itself: models are scripted/traced and saved in the test, and every key
of ``torch.jit.load(f).state_dict()`` must come back from ``torchfree.flatten(torchfree.load(f))``
with the same values, dtype, shape, strides and storage sharing. The hand-built archives at the
end (recognition by content, hostile variants) need no torch.
"""


import io
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

import torchfree
from conftest import assert_same, require_torch, torch_bytes
from test_core import PROTO2, P, archive, glob, unicode


# ---- models ------------------------------------------------------------------------------------


def _models(torch):
    nn = torch.nn
    torch.manual_seed(0)

    class Leaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.register_buffer("steps", torch.arange(5, dtype=torch.int64))
            self.register_buffer("scratch", torch.randn(2), persistent=False)
            self.register_buffer("mask", torch.tensor([True, False, True]))

        def forward(self, x):
            return self.fc(x)

    class Attrs(nn.Module):
        ints: List[int]
        floats: List[float]
        flags: List[bool]
        tensors: List[torch.Tensor]
        table: Dict[str, torch.Tensor]
        pair: Tuple[int, str]
        maybe: Optional[torch.Tensor]
        nothing: Optional[torch.Tensor]

        def __init__(self):
            super().__init__()
            self.ints = [1, 2, 3]
            self.floats = [0.5, -1.25]
            self.flags = [True, False]
            self.tensors = [torch.ones(2), torch.zeros(3, dtype=torch.int32)]
            self.table = {"a": torch.full((2, 2), 3.0)}
            self.pair = (7, "seven")
            self.maybe = torch.tensor([4.0, 5.0])
            self.nothing = None
            self.plain = torch.tensor([1.0, 2.0])  # a tensor attribute, not a buffer

        def forward(self, x):
            return x + self.plain.sum() + float(len(self.ints))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.leaf = Leaf()
            self.seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})
            self.layers[1].weight = self.layers[0].weight  # tied
            self.lin16 = nn.Linear(2, 2).half()
            self.lin64 = nn.Linear(2, 2).double()
            self.register_buffer("bf", torch.randn(3, 2).to(torch.bfloat16))
            base = torch.randn(4, 6)
            self.register_buffer("base", base)
            self.register_buffer("view_t", base.t())  # shares base's storage, other strides
            self.register_buffer("view_off", base[1:, 2:])  # offset view
            self.attrs = Attrs()

        def forward(self, x):
            x = self.leaf(x)
            x = self.seq(x)
            for m in self.layers:
                x = m(x)
            x = self.heads["a"](x) + self.heads["b"](x)
            return self.attrs(x) + self.base.sum()

    class Traced(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3)
            self.k = torch.randn(3, 1)
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            return self.conv(x) * self.k * self.scale + torch.tensor([[1.0], [2.0], [3.0]])

    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return nn.functional.gelu(x * self.w) + torch.linspace(0, 1, 3) + torch.div(x, 2, rounding_mode="floor")

    return Net, Traced, Gelu


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (path, bytes)} of torch.jit.save files made once for the module."""
    torch = require_torch()
    import warnings

    Net, Traced, Gelu = _models(torch)
    d = tmp_path_factory.mktemp("jit")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(Net())
        torch.jit.save(scripted, str(d / "scripted.pt"))  # to a path
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)  # to a file object: top folder "archive"
        (d / "scripted_bytesio.pt").write_bytes(buf.getvalue())
        traced = torch.jit.trace(Traced(), torch.randn(1, 2, 5))
        torch.jit.save(traced, str(d / "traced.pt"))
        traced_seq = torch.jit.trace(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(),
                                                         torch.nn.Linear(3, 1)), torch.randn(2, 3))
        torch.jit.save(traced_seq, str(d / "traced_seq.pt"))
        # operators with upgraders make torch write a .data/version record of 10
        gelu = torch.jit.script(Gelu())
        torch.jit.save(gelu, str(d / "gelu.pt"), _extra_files={"notes.txt": b"extra record"})
        gelu._save_for_lite_interpreter(str(d / "lite.ptl"))
        qm = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(4, 3)),
                                                    {torch.nn.Linear}, dtype=torch.qint8)
        torch.jit.save(torch.jit.script(qm), str(d / "quantized.pt"))
    for p in d.iterdir():
        out[p.stem] = p
    return out


def _expect(torch, path):
    """torch's own view: the state_dict of torch.jit.load."""
    return torch.jit.load(str(path)).state_dict()


def _check_state_dict(got, sd):
    flat = torchfree.flatten(got)
    missing = [k for k in sd if k not in flat]
    assert not missing, f"state_dict keys missing from flatten: {missing}"
    sub = {k: flat[k] for k in sd}
    pairs = assert_same(sub, dict(sd))  # the state_dict's _metadata is torch's own, not in the file
    assert len(pairs) == len(sd)
    return flat


# ---- load --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scripted", "scripted_bytesio", "traced", "traced_seq", "gelu", "lite"])
@pytest.mark.parametrize("how", ["path", "bytes", "fileobj", "copy"])
def test_state_dict_matches_torch(torch, saved, name, how):
    path = saved[name]
    sd = _expect(torch, path)
    if how == "path":
        got = torchfree.load(path)
    elif how == "copy":
        got = torchfree.load(path, mmap=False)
    elif how == "bytes":
        got = torchfree.load(path.read_bytes())
    else:
        with open(path, "rb") as fh:
            got = torchfree.load(fh)
    assert isinstance(got, torchfree.Opaque)
    assert got.module.startswith("__torch__")
    _check_state_dict(got, sd)


def test_module_structure(torch, saved):
    got = torchfree.load(saved["scripted"])
    assert got.module.startswith("__torch__") and got.name == "Net"
    leaf = got.state["leaf"]
    assert isinstance(leaf, torchfree.Opaque) and leaf.name == "Leaf"
    fc = leaf.state["fc"]
    assert fc.module == "__torch__.torch.nn.modules.linear" and fc.name == "Linear"
    assert set(fc.state) >= {"weight", "bias", "training"}
    # attributes of every TorchScript type come back as plain Python values
    attrs = got.state["attrs"].state
    ref = torch.jit.load(str(saved["scripted"])).attrs
    assert attrs["ints"] == ref.ints == [1, 2, 3]
    assert attrs["floats"] == ref.floats and attrs["flags"] == ref.flags
    assert attrs["pair"] == tuple(ref.pair) and attrs["nothing"] is None
    assert isinstance(attrs["tensors"], list) and isinstance(attrs["table"], dict)
    assert_same(attrs["tensors"], list(ref.tensors))
    assert_same(attrs["table"], dict(ref.table))
    assert_same(attrs["maybe"], ref.maybe)
    assert_same(attrs["plain"], ref.plain)
    # flatten: dotted attribute paths, including what state_dict leaves out
    flat = torchfree.flatten(got)
    for k in ("attrs.tensors.0", "attrs.table.a", "attrs.maybe", "attrs.plain", "leaf.scratch",
              "layers.1.weight", "heads.b.bias"):
        assert k in flat, k
    # tied weights and views share memory as in torch
    assert flat["layers.0.weight"] is flat["layers.1.weight"] or np.shares_memory(
        flat["layers.0.weight"], flat["layers.1.weight"])
    assert np.shares_memory(flat["base"], flat["view_t"]) and np.shares_memory(flat["base"], flat["view_off"])


def test_constants(torch, saved):
    got = torchfree.load(saved["traced"])
    consts = got.constants
    assert isinstance(consts, tuple) and len(consts) >= 2
    ref = torch.jit.load(str(saved["traced"]))
    # the traced module captured self.k and a literal tensor as constants; compare each constant
    # with the tensor torch itself computes for that code, through the loaded module's graph
    torch_consts = [n.t("value") for n in ref.inlined_graph.nodes()
                    if n.kind() == "prim::Constant" and n.hasAttribute("value") and n.kindOf("value") == "t"]
    assert len(torch_consts) == len(consts)
    by_bytes = {(tuple(t.shape), torch_bytes(t).tobytes()) for t in torch_consts}
    for c in consts:
        assert isinstance(c, np.ndarray) and c.dtype == np.float32
        assert (c.shape, np.ascontiguousarray(c).view(np.uint8).tobytes()) in by_bytes
    # scripted modules without constant tensors get an empty tuple
    assert torchfree.load(saved["scripted"]).constants == ()


@pytest.mark.parametrize("name", ["ts113_scripted.pt", "ts113_traced.pt"])
def test_torch113_archives(torch, name):
    """TorchScript files written by torch 1.13 (tests/data/make_torchscript_fixtures.py)."""
    from conftest import DATA

    path = DATA / name
    got = torchfree.load(path)
    _check_state_dict(got, _expect(torch, path))
    if name == "ts113_traced.pt":
        ref = torch.jit.load(str(path))
        torch_consts = [n.t("value") for n in ref.inlined_graph.nodes()
                        if n.kind() == "prim::Constant" and n.hasAttribute("value") and n.kindOf("value") == "t"]
        assert len(got.constants) == len(torch_consts) == 1
        assert_same(got.constants[0], torch_consts[0])
    else:
        assert got.state["ints"] == [1, 2] and got.state["maybe"] is None


def test_version_records(torch, saved):
    """torch writes .data/version (10 here) instead of version for models with upgraded operators."""
    with zipfile.ZipFile(saved["gelu"]) as z:
        names = z.namelist()
        prefix = names[0].split("/")[0]
        assert f"{prefix}/.data/version" in names and f"{prefix}/version" not in names
        assert z.read(f"{prefix}/.data/version").strip() == b"10"
        # code/ records are deflated; torchfree never reads them (and never needs them)
        assert any(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist() if "/code/" in i.filename)
    got = torchfree.load(saved["gelu"])
    _check_state_dict(got, _expect(torch, saved["gelu"]))


def test_quantized_scripted_model(torch, saved):
    """Packed quantized params are TorchScript custom-class objects (torch.classes.quantized): an inert
    Opaque whose state is what their __getstate__ returned, the (weight, bias) pair."""
    path = saved["quantized"]
    ref = getattr(torch.jit.load(str(path)), "0")._packed_params._packed_params
    (qweight, bias), _ = ref.__getstate__()
    if not hasattr(torchfree, "QuantizedArray"):
        # quantized tensors are another piece of work: until they land the error names the rebuild
        with pytest.raises(torchfree.UnpicklingError, match="_rebuild_qtensor"):
            torchfree.load(path)
        return
    got = torchfree.load(path)
    packed = got.state["0"].state["_packed_params"].state["_packed_params"]
    assert isinstance(packed, torchfree.Opaque)
    assert (packed.module, packed.name) == ("__torch__.torch.classes.quantized", "LinearPackedParamsBase")
    w, b = packed.state
    assert isinstance(w, torchfree.QuantizedArray)
    np.testing.assert_array_equal(w.int_repr, qweight.int_repr().numpy())
    assert w.scale == qweight.q_scale() and w.zero_point == qweight.q_zero_point()
    assert_same(b, bias)


@pytest.mark.parametrize("name", ["scripted", "traced"])
def test_scan_and_open(torch, saved, name):
    path = saved[name]
    sd = _expect(torch, path)
    info = torchfree.scan(path)
    assert info.format == "torchscript"
    names = [t.name for t in info.tensors]
    assert set(sd) <= set(names)
    assert names == list(torchfree.flatten(torchfree.load(path, weights_only=False)))
    for k, t in sd.items():
        ti = info[k]
        assert ti.shape == tuple(t.shape) and ti.stride == tuple(t.stride()) and ti.storage_offset == t.storage_offset()
    assert any(r.name.endswith(".debug_pkl") and r.compressed for r in info.records)
    with torchfree.open(path) as ckpt:  # weights_only=True, no safe_globals
        assert set(sd) <= set(ckpt.keys())
        assert_same({k: ckpt[k] for k in sd}, dict(sd), sharing=False)
        assert isinstance(ckpt.load(), torchfree.Opaque)


def test_map_location(torch, saved):
    path = saved["traced"]
    sd = _expect(torch, path)
    meta = torchfree.load(path, map_location="meta")
    flat = torchfree.flatten(meta)
    for k, t in sd.items():
        assert isinstance(flat[k], torchfree.MetaArray) and flat[k].shape == tuple(t.shape)
    assert all(isinstance(c, torchfree.MetaArray) for c in meta.constants)
    seen = []
    got = torchfree.load(path, map_location=lambda s, loc: seen.append((s.key, loc)))
    # every storage record is shown once: those of data.pkl and those of constants.pkl
    with zipfile.ZipFile(path) as z:
        records = [n for n in z.namelist() if "/data/" in n or "/constants/" in n]
    assert len(seen) == len(records) and all(loc == "cpu" for _, loc in seen)
    _check_state_dict(got, sd)


def test_weights_only_needs_no_safe_globals(torch, saved):
    """The default weights_only=True reads TorchScript files; a torch.save zip holding a __torch__
    class is still refused (recognition is by the constants.pkl record, not by the classes)."""
    path = saved["scripted"]
    got = torchfree.load(path, weights_only=True)
    assert isinstance(got, torchfree.Opaque)
    # the same data.pkl in a plain torch.save zip (no constants.pkl, no code/)
    plain = io.BytesIO()
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(plain, "w") as out:
        for info in z.infolist():
            rel = info.filename.split("/", 1)[1]
            if rel == "constants.pkl" or rel.startswith(("code/", "constants/")):
                continue
            out.writestr(info, z.read(info))
    with pytest.raises(torchfree.UnsafeGlobalError, match="__torch__"):
        torchfree.load(plain.getvalue())
    opaque = torchfree.load(plain.getvalue(), weights_only=False)
    _check_state_dict(opaque, _expect(torch, path))


def _rewrite(path, replace: dict) -> bytes:
    """The archive at path with some records (by name under the top folder) replaced."""
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(buf, "w") as out:
        for info in z.infolist():
            rel = info.filename.split("/", 1)[1]
            out.writestr(info, replace.get(rel, z.read(info)))
    return buf.getvalue()


def test_real_archive_with_hostile_pickles(torch, saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    canary = tmp_path / "canary"
    evil = P(PROTO2, glob("os", "system"), b"(", unicode(f"touch {canary}"), b"tR.")
    for record in ("data.pkl", "constants.pkl"):
        blob = _rewrite(saved["traced"], {record: evil if record == "data.pkl" else evil[:-1] + b"\x85."})
        with pytest.raises(torchfree.UnsafeGlobalError, match="os.system"):
            torchfree.load(blob)
        torchfree.load(blob, weights_only=False)  # inert placeholders
    assert not canary.exists()


# ---- hand-built archives (no torch) ---------------------------------------------------------------


def _ts_archive(data_pkl: bytes, constants_pkl: bytes = b"\x80\x02).", records=(), version=b"3\n",
                version_record="version") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in records:
            z.writestr(f"m/{name}", data)
        z.writestr("m/data.pkl", data_pkl)
        z.writestr("m/code/__torch__.py", b"class M(Module):\n  pass\n", zipfile.ZIP_DEFLATED)
        z.writestr("m/constants.pkl", constants_pkl)
        z.writestr(f"m/{version_record}", version)
    return buf.getvalue()


def _tensor(key, n):
    from test_core import tensor_v2

    return tensor_v2(key, n, 0, (n,), (1,))


def _module(cls, *items: bytes) -> bytes:
    return P(glob("__torch__", cls), b")\x81", b"}(", *items, b"ub")


def handbuilt_archive():
    """A TorchScript-shaped archive (also used by test_leaks): data/0 and constants/0 are different
    records with the same key."""
    a = np.arange(4, dtype=np.float32)
    c = -np.arange(3, dtype=np.float32)
    data = P(PROTO2, _module("M", unicode("w"), _tensor("0", 4), unicode("ints"),
                             glob("torch.jit._pickle", "build_intlist"), b"(]", b"(K\x01K\x02e", b"tR",
                             unicode("d"), glob("torch.jit._pickle", "restore_type_tag"), b"(}", unicode("k"),
                             _tensor("0", 4), b"s", unicode("Dict[str, Tensor]"), b"tR",
                             unicode("sub"), _module("Sub", unicode("b"), _tensor("1", 2))), b".")
    consts = P(PROTO2, b"(", _tensor("0", 3), b"t.")
    blob = _ts_archive(data, consts, [("data/0", a.tobytes()), ("data/1", a[:2].tobytes()),
                                      ("constants/0", c.tobytes())])
    return blob, a, c


def test_handbuilt_constants_have_their_own_records():
    blob, a, c = handbuilt_archive()
    for kw in ({}, {"weights_only": False}):
        got = torchfree.load(blob, **kw)
        assert isinstance(got, torchfree.Opaque) and got.qualname == "__torch__.M"
        np.testing.assert_array_equal(got.state["w"], a)
        assert got.state["ints"] == [1, 2]
        np.testing.assert_array_equal(got.state["d"]["k"], a)
        assert np.shares_memory(got.state["d"]["k"], got.state["w"])
        assert len(got.constants) == 1
        np.testing.assert_array_equal(got.constants[0], c)
        assert list(torchfree.flatten(got)) == ["w", "d.k", "sub.b"]
    info = torchfree.scan(blob)
    assert info.format == "torchscript" and [t.name for t in info.tensors] == ["w", "d.k", "sub.b"]
    with torchfree.open(blob) as ckpt:
        np.testing.assert_array_equal(ckpt["sub.b"], a[:2])


def test_handbuilt_versions():
    body = P(PROTO2, _module("M"), b".")
    for v in (b"1\n", b"6\n", b"10\n"):
        for rec in ("version", ".data/version"):
            assert isinstance(torchfree.load(_ts_archive(body, version=v, version_record=rec)), torchfree.Opaque)
    with pytest.raises(torchfree.FormatError, match="version 11"):
        torchfree.load(_ts_archive(body, version=b"11\n"))


def test_handbuilt_missing_constant_record():
    consts = P(PROTO2, b"(", _tensor("0", 3), b"t.")
    with pytest.raises(torchfree.FormatError, match="constants/0"):
        torchfree.load(_ts_archive(P(PROTO2, _module("M"), b"."), consts))


def test_old_torchscript_format_named():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("m/model.json", b"{}")
        z.writestr("m/version", b"1\n")
    with pytest.raises(torchfree.FormatError, match="model.json"):
        torchfree.load(buf.getvalue())


def test_plain_zip_keeps_refusing_torchscript_names():
    body = P(PROTO2, _module("M"), b".")
    with pytest.raises(torchfree.UnsafeGlobalError, match="__torch__.M"):
        torchfree.load(archive(body))
    body = P(PROTO2, glob("torch.jit._pickle", "build_intlist"), b"(]t", b"R.")
    with pytest.raises(torchfree.UnsafeGlobalError, match="build_intlist"):
        torchfree.load(archive(body))
    assert torchfree.load(archive(body), weights_only=False) == []
