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

    return Net, Traced


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (path, bytes)} of torch.jit.save files made once for the module."""
    torch = require_torch()
    import warnings

    Net, Traced = _models(torch)
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


@pytest.mark.parametrize("name", ["scripted", "scripted_bytesio", "traced", "traced_seq"])
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
