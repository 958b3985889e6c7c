"""Issue 19: a model pickled whole (``torch.save(model)``) named as ``model.state_dict()`` names it,
by ``torchfree.module_state_dict`` and in ``torchfree info`` / ``convert`` (item 7); wrapper tensor
subclasses (TwoTensor) convert to their real tensors and ``info``'s totals agree with its listing
(item 8). Each compared with torch itself, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

import torchfree
from torchfree.cli import main


def _same(got, exp_tensor):
    """Bit for bit: dtype, shape and bytes."""
    exp = exp_tensor.detach().numpy()
    got = np.asarray(got)
    assert got.dtype == exp.dtype and got.shape == exp.shape
    assert got.tobytes() == exp.tobytes()


def _model(torch):
    nn = torch.nn
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 2), nn.ReLU())
    inner.add_module("gone", None)  # a None child: torch skips it
    model = nn.Sequential(
        nn.Linear(3, 4, bias=False),  # its bias is a None parameter
        nn.BatchNorm1d(4),  # num_batches_tracked, _version 2
        nn.ModuleDict({"inner": inner, "norm": nn.InstanceNorm1d(2, affine=True)}),
    )
    model.register_buffer("scratch", torch.zeros(2), persistent=False)
    model.register_buffer("steps", torch.tensor([7], dtype=torch.int32))
    model.register_parameter("unused", None)
    model[1].running_mean.add_(torch.arange(4.0))
    model[1].num_batches_tracked += 5
    return model


def _check_state_dict(got, exp):
    assert list(got) == list(exp)
    for k in exp:
        _same(got[k], exp[k])
    assert got._metadata == exp._metadata
    assert list(got._metadata) == list(exp._metadata)


# ---- item 7: a whole pickled model by state_dict names -------------------------------------


@pytest.mark.needs_torch
def test_module_state_dict_is_torchs(torch, tmp_path):
    model = _model(torch)
    exp = model.state_dict()
    assert "scratch" not in exp and "0.bias" not in exp and exp._metadata["1"] == {"version": 2}
    torch.save(model, tmp_path / "m.pt")
    torch.save({"model": model, "epoch": 3}, tmp_path / "ckpt.pt")

    _check_state_dict(torchfree.module_state_dict(torchfree.load(tmp_path / "m.pt", weights_only=False)), exp)

    # a model under a key: its state_dict under that prefix, as if the dict were a module
    nested = torchfree.module_state_dict(torchfree.load(tmp_path / "ckpt.pt", weights_only=False))
    holder = torch.nn.Module()
    holder.model = model
    exp_nested = holder.state_dict()
    del exp_nested._metadata[""]  # the dict is no module: no entry of its own
    _check_state_dict(nested, exp_nested)

    with pytest.raises(TypeError, match="nn.Module"):
        torchfree.module_state_dict({"epoch": 3})


@pytest.mark.needs_torch
def test_cli_info_and_convert_use_state_dict_names(torch, tmp_path, capsys):
    from safetensors.numpy import load_file

    model = _model(torch)
    exp = model.state_dict()
    torch.save(model, tmp_path / "m.pt")

    assert main(["info", str(tmp_path / "m.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in info["tensors"]] == list(exp)
    assert info["total_bytes"] == sum(t.nbytes for t in exp.values())  # no non-persistent buffer
    assert info["param_count"] == sum(t.numel() for t in exp.values())

    assert main(["convert", "-q", "--unsafe-globals", str(tmp_path / "m.pt"), str(tmp_path / "m.safetensors")]) == 0
    st = load_file(str(tmp_path / "m.safetensors"))
    assert sorted(st) == sorted(exp)
    for k in exp:
        _same(st[k], exp[k])

    assert main(["convert", "-q", "--unsafe-globals", str(tmp_path / "m.pt"), str(tmp_path / "sd.pt")]) == 0
    back = torch.load(tmp_path / "sd.pt", weights_only=True)  # a plain state_dict now
    assert list(back) == list(exp) and back._metadata == exp._metadata
    for k in exp:
        assert torch.equal(back[k], exp[k]) and back[k].dtype == exp[k].dtype
    fresh = _model(torch)
    fresh.load_state_dict(back)

    # diff names a whole model's tensors as info does: against its own state_dict, the same
    torch.save(exp, tmp_path / "exp.pt")
    assert main(["diff", "--unsafe-globals", "--json", str(tmp_path / "m.pt"), str(tmp_path / "exp.pt")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["identical"] == len(exp) and d["only_in_a"] == d["only_in_b"] == []
    model[0].weight.data[0, 0] += 1
    torch.save(model, tmp_path / "m2.pt")
    assert main(["diff", "--unsafe-globals", "--json", str(tmp_path / "m.pt"), str(tmp_path / "m2.pt")]) == 1
    d = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in d["values_differ"]] == ["0.weight"] and d["values_differ"][0]["elements_differ"] == 1


def _module(name, params=None, buffers=None, modules=None, **extra):
    state = {"_parameters": params or {}, "_buffers": buffers or {}, "_modules": modules or {}, **extra}
    return torchfree.Opaque("torch.nn.modules.linear", name, args=(), state=state)


def test_module_state_dict_malformed_is_a_checkpoint_error():
    w = np.ones(2, np.float32)
    loop = _module("Linear", {"weight": w})
    loop.state["_modules"]["me"] = loop
    cases = [
        (loop, "its own submodule"),
        (_module("Linear", params=[w]), "_parameters is a list"),
        (_module("Linear", modules={"x": 3}), "child 'x' is a int"),
        (_module("Linear", {1: w}), "_parameters is a dict"),
        (_module("Linear", _non_persistent_buffers_set=5), "_non_persistent_buffers_set"),
        (_module("Linear", _version="2"), "_version"),
    ]
    for obj, msg in cases:
        with pytest.raises(torchfree.FormatError, match=msg):
            torchfree.module_state_dict(obj)
    # a module shared under two names is listed under both, as torch does
    shared = _module("Linear", {"weight": w})
    two = torchfree.module_state_dict(_module("Sequential", modules={"a": shared, "b": shared}))
    assert list(two) == ["a.weight", "b.weight"] and two._metadata == {"": {"version": 1}, "a": {"version": 1},
                                                                      "b": {"version": 1}}
    # nested far deeper than Python's stack: a LimitError, not a RecursionError or a crash
    deep = _module("Linear", {"weight": w})
    for _ in range(torchfree.LIMITS["marks"] + 5):
        deep = _module("Sequential", modules={"m": deep})
    with pytest.raises(torchfree.LimitError):
        torchfree.module_state_dict(deep)


# ---- item 8: tensor subclasses --------------------------------------------------------------


@pytest.mark.needs_torch
def test_tensor_subclasses_convert_and_info_totals(torch, tmp_path, capsys):
    from safetensors.numpy import load_file
    from torch.testing._internal.two_tensor import TwoTensor

    a = torch.arange(6.0).reshape(2, 3)
    b = torch.full((2, 3), -1.5)
    tt = TwoTensor(a, b)
    plain = torch.arange(4, dtype=torch.int16)
    tt2 = TwoTensor(b + 1, a * 3)  # storages of its own (views of one storage count it once)
    torch.save({"w": tt, "x": plain, "nested": [tt2]}, tmp_path / "two.pt")
    src = tmp_path / "two.pt"

    assert main(["convert", "-q", "--unsafe-globals", str(src), str(tmp_path / "two.safetensors")]) == 0
    st = load_file(str(tmp_path / "two.safetensors"))
    assert sorted(st) == ["nested.0.a", "nested.0.b", "w.a", "w.b", "x"]  # never the meta placeholder
    _same(st["w.a"], tt.a)
    _same(st["w.b"], tt.b)
    _same(st["nested.0.a"], tt2.a)
    _same(st["nested.0.b"], tt2.b)
    _same(st["x"], plain)

    assert main(["info", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    listed = sum(t["nbytes"] for t in info["tensors"])
    assert info["total_bytes"] == listed == sum(info["dtype_totals"].values()) == 2 * (a.nbytes + b.nbytes) + plain.nbytes
    assert info["param_count"] == sum(int(np.prod(t["shape"])) for t in info["tensors"])
    assert all(t["location"] == "cpu" for t in info["tensors"])

    # the wrapper keeps its outer shape and dtype on the placeholder
    got = torchfree.load(src, weights_only=False)["w"]
    assert got.wrapper_subclass and got.args[0].shape == (2, 3)
    assert sorted(torchfree.flatten({"w": got})) == ["w.a", "w.b"]


@pytest.mark.needs_torch
def test_as_subclass_converts(torch, tmp_path, capsys):
    """A plain subclass (``as_subclass``) keeps its data: converted, and its totals agree."""

    class MyTensor(torch.Tensor):
        pass

    globals()["MyTensor"] = MyTensor  # torch.save pickles the class by reference
    MyTensor.__qualname__ = "MyTensor"
    t = torch.arange(5.0, dtype=torch.float64)
    torch.save({"w": t.as_subclass(MyTensor)}, tmp_path / "s.pt")
    assert main(["convert", "-q", "--unsafe-globals", str(tmp_path / "s.pt"), str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as z:
        (name,) = z.files
        _same(z[name], t)
    assert main(["info", str(tmp_path / "s.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_bytes"] == sum(t["nbytes"] for t in info["tensors"]) == t.nbytes


@pytest.mark.needs_torch
def test_meta_tensors_totals_agree(torch, tmp_path):
    """A meta tensor holds no bytes: the header's total and the by-dtype totals agree."""
    torch.save({"m": torch.empty(3, 4, device="meta"), "d": torch.ones(2)}, tmp_path / "meta.pt")
    info = torchfree.scan(tmp_path / "meta.pt")
    assert info.total_bytes == sum(info.dtype_totals.values()) == 8
    assert info.param_count == 14 and info["m"].nbytes == 48 and info["m"].location == "meta"
    assert "by dtype: float32 8 B" in str(info)
