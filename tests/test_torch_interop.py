"""torchfree.torch: load/save/patched against torch 2.13 itself.

Every comparison is torch.load's result vs torchfree.torch.load's, type by type and tensor by
tensor: type (Parameter-ness), dtype, shape, stride, storage offset, requires_grad, conj/neg
bits, raw bytes, Python attributes, and storage sharing (a bijection between the storages of
both results).
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

import torchfree
from conftest import DATA

# ---------------------------------------------------------------------------------------------
# comparator
# ---------------------------------------------------------------------------------------------


def _raw(torch, t):
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8) if t.element_size() == 1 or t.dtype == torch.bool else t.reshape(-1).view(torch.uint8)


def _cmp_tensor(torch, a, b, path, pairs):
    assert isinstance(a, torch.Tensor), f"{path}: {type(a)!r} is not a tensor"
    assert type(a) is type(b), f"{path}: {type(a)!r} != {type(b)!r}"
    assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
    assert a.layout == b.layout, f"{path}: layout {a.layout} != {b.layout}"
    if b.is_nested:
        assert a.is_nested, path
        for i, (x, y) in enumerate(zip(a.unbind(), b.unbind(), strict=True)):
            _cmp_tensor(torch, x, y, f"{path}.{i}", None)
        return
    assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
    assert a.device == b.device, f"{path}: device {a.device} != {b.device}"
    assert a.requires_grad == b.requires_grad, f"{path}: requires_grad"
    # torch sets the pickled (empty) OrderedDict as each tensor's own _backward_hooks
    ha, hb = a._backward_hooks, b._backward_hooks
    assert type(ha) is type(hb) and (hb is None or (len(ha) == len(hb) == 0 and ha is not hb)), \
        f"{path}: _backward_hooks {ha!r} != {hb!r}"
    assert a.__dict__.keys() == b.__dict__.keys(), f"{path}: attributes {a.__dict__} != {b.__dict__}"
    for k in b.__dict__:
        if k != "_backward_hooks":
            _walk(torch, a.__dict__[k], b.__dict__[k], f"{path}.__dict__.{k}", pairs)
    if b.is_quantized:
        assert a.qscheme() == b.qscheme(), path
        if b.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            assert (a.q_scale(), a.q_zero_point()) == (b.q_scale(), b.q_zero_point()), path
        else:
            assert torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales()), path
            assert torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points()), path
            assert a.q_per_channel_axis() == b.q_per_channel_axis(), path
        assert torch.equal(a.int_repr(), b.int_repr()), f"{path}: int_repr"
        assert a.stride() == b.stride() and a.storage_offset() == b.storage_offset(), path
        return
    if b.layout != torch.strided:
        if b.layout == torch.sparse_coo:
            assert a.is_coalesced() == b.is_coalesced(), path
            _cmp_tensor(torch, a._indices(), b._indices(), path + ".indices", None)
            _cmp_tensor(torch, a._values(), b._values(), path + ".values", None)
        else:
            assert torch.equal(a.to_dense(), b.to_dense()), path
        return
    assert a.stride() == b.stride(), f"{path}: stride {a.stride()} != {b.stride()}"
    assert a.storage_offset() == b.storage_offset(), f"{path}: offset {a.storage_offset()} != {b.storage_offset()}"
    assert a.is_conj() == b.is_conj() and a.is_neg() == b.is_neg(), f"{path}: conj/neg bits"
    if b.is_meta:
        assert a.is_meta, path
        return
    assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes(), f"{path}: storage size"
    assert torch.equal(_raw(torch, a), _raw(torch, b)), f"{path}: values differ"
    if pairs is not None:
        pairs.append((path, a, b))


def _walk(torch, a, b, path, pairs):
    if isinstance(b, torch.Tensor):
        return _cmp_tensor(torch, a, b, path, pairs)
    assert type(a) is type(b), f"{path}: {type(a)!r} != {type(b)!r}"
    if isinstance(b, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in b:
            _walk(torch, a[k], b[k], f"{path}.{k}", pairs)
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), f"{path}: _metadata"
    elif isinstance(b, (list, tuple)) and not isinstance(b, torch.Size):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(torch, x, y, f"{path}[{i}]", pairs)
    elif isinstance(b, torch.storage.TypedStorage):
        assert a.dtype == b.dtype and a.tolist() == b.tolist(), path
    elif isinstance(b, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(b, float) and b != b:
        assert a != a, path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_torch_equal(torch, got, exp):
    """Equal structures, and the same storage sharing (a bijection of storages)."""
    pairs = []
    _walk(torch, got, exp, "", pairs)
    fwd, back = {}, {}
    for path, a, b in pairs:
        ka, kb = a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()
        if b.untyped_storage().nbytes() == 0:
            continue
        assert fwd.setdefault(kb, ka) == ka, f"{path}: torch shares this storage, torchfree does not"
        assert back.setdefault(ka, kb) == kb, f"{path}: torchfree shares this storage, torch does not"
    return pairs


def check_file(torch, path, *, torch_kwargs=None, **kwargs):
    import torchfree.torch as tft

    exp = torch.load(path, **{**kwargs, **(torch_kwargs or {})})
    got = tft.load(path, **kwargs)
    assert_torch_equal(torch, got, exp)
    return got, exp


# ---------------------------------------------------------------------------------------------
# the checkpoints: module state dicts, training checkpoints, dtypes, views, rare kinds
# ---------------------------------------------------------------------------------------------


def _modules(torch):
    nn = torch.nn
    torch.manual_seed(0)
    return {
        "conv": nn.Conv2d(3, 4, 3),
        "linear": nn.Linear(5, 3),
        "bn": nn.BatchNorm2d(4),
        "emb": nn.Embedding(10, 4),
        "lstm": nn.LSTM(4, 5, num_layers=2),
        "transformer": nn.TransformerEncoderLayer(8, 2, dim_feedforward=16),
    }


DTYPES = ["float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32", "int64", "int32",
          "int16", "int8", "uint8", "bool", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
          "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "bits8", "bits16"]


def _random(torch, name, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, name)
    n = int(np.prod(shape))
    if name == "bool":
        return (torch.randint(0, 2, (n,), generator=g) == 1).reshape(shape)
    raw = torch.randint(0, 256, (n * dt.itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dt).reshape(shape)


def _views(t):
    return {"base": t, "t": t.t(), "row": t[1], "col": t[:, 2], "block": t[1:, 1:3], "step": t[:, ::2],
            "elem0d": t[1, 2], "empty": t[:0], "expand": t[0:1].expand(5, t.shape[1])}


def _cases(torch):
    torch.manual_seed(0)
    mods = _modules(torch)
    cases = {f"module_{k}": m.state_dict() for k, m in mods.items()}
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    for name, opt in (("adam", torch.optim.Adam(model.parameters())),
                      ("sgd", torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        cases[f"train_{name}"] = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                                  "args": {"lr": 0.1, "name": "x"}}
    for name in DTYPES:
        cases[f"dtype_{name}"] = _views(_random(torch, name, (4, 6)))
    c = torch.randn(3, 4, dtype=torch.complex64)
    cases["math_bits"] = {"conj": c.conj(), "neg": torch._neg_view(torch.randn(4)),
                          "both": torch._neg_view(c.conj()), "conj_view": c.conj()[1:, ::2]}
    p = torch.nn.Parameter(torch.randn(3, 4))
    p.note = "attr"
    t = torch.randn(2, 2)
    t.extra = {"k": 1}
    cases["params"] = {"p": p, "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
                       "rg": torch.randn(3, requires_grad=True), "attr": t, "int_param":
                       torch.nn.Parameter(torch.arange(3), requires_grad=False)}
    cases["objects"] = {"size": torch.Size([2, 3]), "device": torch.device("cpu"),
                        "cuda_dev": torch.device("cuda", 1), "dtype": torch.bfloat16, "fdtype": torch.float8_e5m2,
                        "od": OrderedDict(a=1), "tuple": (1, 2.5, None, True), "set": {1, 2}, "bytes": b"ab",
                        "complex": 1 + 2j, "nan": float("nan"), "str": "s"}
    base = torch.arange(10.0)
    empty = torch.empty(0)
    cases["sharing"] = {"a": base[:4], "b": base[3:], "same": base, "e_f": empty,
                        "e_i": empty.view(torch.int32), "zeros_off": torch.zeros(4, 0, 4)[1:]}
    cases["meta"] = {"m": torch.empty(3, 4, device="meta"), "mv": torch.empty(6, device="meta")[2:]}
    q = torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 3, torch.quint8)
    qc = torch.quantize_per_channel(torch.randn(3, 4), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
                                    torch.tensor([0, 1, 2]), 0, torch.qint8)
    cases["quantized"] = {"q": q, "qc": qc, "q32": torch.quantize_per_tensor(torch.randn(3), 0.5, 0, torch.qint32)}
    dense = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    cases["sparse"] = {"coo": dense.to_sparse(), "csr": dense.to_sparse_csr(), "csc": dense.to_sparse_csc(),
                       "bsr": torch.eye(4).to_sparse_bsr((2, 2))}
    cases["nested"] = {"n": torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])}
    cases["empty_dict"] = {}
    cases["tensor_alone"] = torch.randn(5)
    return cases


@pytest.fixture(scope="module")
def case_objects():
    from conftest import require_torch

    return _cases(require_torch())


@pytest.fixture(scope="module")
def case_files(tmp_path_factory, case_objects):
    from conftest import require_torch

    torch = require_torch()
    d = tmp_path_factory.mktemp("cases")
    out = {}
    for name, obj in case_objects.items():
        out[name] = d / f"{name}.pt"
        torch.save(obj, out[name])
        if name.startswith(("dtype_float32", "train_adam", "params", "sharing", "module_lstm")):
            out[name + "_legacy"] = d / f"{name}_legacy.pt"
            torch.save(obj, out[name + "_legacy"], _use_new_zipfile_serialization=False)
    return out


CASE_NAMES = [f"module_{k}" for k in ("conv", "linear", "bn", "emb", "lstm", "transformer")] + \
    ["train_adam", "train_sgd"] + [f"dtype_{n}" for n in DTYPES] + \
    ["math_bits", "params", "objects", "sharing", "meta", "quantized", "sparse", "nested", "empty_dict",
     "tensor_alone", "dtype_float32_legacy", "train_adam_legacy", "params_legacy", "sharing_legacy",
     "module_lstm_legacy"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_matrix(torch, case_files, name):
    check_file(torch, case_files[name])


@pytest.mark.parametrize("mmap", [None, True, False])
def test_mmap_modes_and_inputs(torch, case_files, mmap):
    import torchfree.torch as tft

    path = case_files["train_adam"]
    exp = torch.load(path)
    assert_torch_equal(torch, tft.load(path, mmap=mmap), exp)
    if mmap is None:
        assert_torch_equal(torch, tft.load(str(path)), exp)
        assert_torch_equal(torch, tft.load(path.read_bytes()), exp)
        with open(path, "rb") as f:
            assert_torch_equal(torch, tft.load(f), exp)
        assert_torch_equal(torch, tft.load(io.BytesIO(path.read_bytes())), exp)


FIXTURES = ["sd_views.pt", "sd_views_deflated.pt", "train_ckpt.pt"]


@pytest.mark.parametrize("name", FIXTURES)
def test_committed_fixtures(torch, name):
    """The committed format fixtures (deflated records, a training checkpoint)."""
    check_file(torch, DATA / name)


def test_committed_fixtures_beyond_torch_weights_only(torch):
    """Protocol 4: torch's weights-only unpickler refuses it; torchfree reads it safely and gives
    what torch's full unpickler gives."""
    check_file(torch, DATA / "proto4.pt", torch_kwargs={"weights_only": False})


def test_torch_113_sparse_csr(torch):
    """torch 1.13's _rebuild_sparse_csr_tensor (torch 2.13 no longer has it): CSR tensors with
    the values torchfree.load gives."""
    import torchfree.torch as tft

    got, ref = tft.load(DATA / "sparse_113.pt"), torchfree.load(DATA / "sparse_113.pt")
    n = 0
    for k, v in ref.items():
        if isinstance(v, torchfree.SparseArray):
            assert got[k].layout == getattr(torch, v.layout.split(".")[1]), k
            assert np.array_equal(got[k].to_dense().numpy(), v.todense()), k
            n += 1
    assert n


def test_big_endian_fixture(torch):
    """A file written on a big-endian host: torchfree swaps every storage (torch 2.13 swaps only
    the storages with a legacy storage type, so its uint16 values come out byte-swapped): the
    values are those of the same file written on a little-endian host."""
    import torchfree.torch as tft

    assert_torch_equal(torch, tft.load(DATA / "sd_views_bigendian.pt"), torch.load(DATA / "sd_views.pt"))


def test_writable_and_independent_of_file(torch, tmp_path):
    import torchfree.torch as tft

    path = tmp_path / "w.pt"
    torch.save({"a": torch.arange(4.0)}, path)
    got = tft.load(path)
    got["a"] += 1  # copy-on-write mapping: the file is untouched
    assert torch.equal(torch.load(path)["a"], torch.arange(4.0))
    assert torch.equal(got["a"], torch.arange(4.0) + 1)


def test_backward_hooks_only_empty_dicts_are_set(torch, tmp_path):
    """torch sets the pickled backward_hooks as _backward_hooks; its own files hold an empty
    OrderedDict, which each tensor gets as its own. Hooks a file lists would be called by autograd:
    torchfree.torch leaves them out."""
    import torchfree.torch as tft

    class Fake:
        def __init__(self, t, hooks):
            self.t, self.hooks = t, hooks

        def __reduce__(self):
            st = torch.storage.TypedStorage(wrap_storage=self.t.untyped_storage(), dtype=self.t.dtype, _internal=True)
            return torch._utils._rebuild_tensor_v2, (st, 0, tuple(self.t.shape), self.t.stride(), False, self.hooks)

    path = tmp_path / "h.pt"
    torch.save({"empty": Fake(torch.ones(2), OrderedDict()), "listed": Fake(torch.ones(3), OrderedDict(x=1)),
                "plain": torch.zeros(2)}, path)
    got = tft.load(path)
    want = torch.load(path, weights_only=True)
    assert got["empty"]._backward_hooks == want["empty"]._backward_hooks == OrderedDict()
    assert got["plain"]._backward_hooks == want["plain"]._backward_hooks == OrderedDict()
    assert want["listed"]._backward_hooks == OrderedDict(x=1)
    assert got["listed"]._backward_hooks is None
    assert torch.equal(got["listed"], want["listed"])


def test_torchfree_import_does_not_import_torch():
    code = "import sys, torchfree; assert 'torch' not in sys.modules; import torchfree.torch; " \
           "assert 'torch' not in sys.modules; print('ok')"
    # the torchfree this test process imported (an in-place build, or the installed package)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(torchfree.__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------------------------------------
# map_location
# ---------------------------------------------------------------------------------------------


def _retag(src, dst, old=b"cpu", new=b"cuda:0"):
    """Copy a torch zip checkpoint with its storages' location tag rewritten in data.pkl."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                op = b"X" + len(old).to_bytes(4, "little") + old
                assert op in data
                data = data.replace(op, b"X" + len(new).to_bytes(4, "little") + new)
            zout.writestr(info.filename, data)


@pytest.mark.parametrize("form", ["cpu", "device", "dict", "callable", "callable_none", "meta", "none"])
def test_map_location_forms(torch, case_files, form):
    import torchfree.torch as tft

    path = case_files["sharing"]
    seen_t, seen_f = [], []

    def fn(seen):
        def f(storage, loc):
            seen.append((type(storage), loc, storage.nbytes()))
            return storage
        return f

    def fn_none(storage, loc):
        return None

    ml = {"cpu": ("cpu", "cpu"), "device": (torch.device("cpu"),) * 2, "dict": ({"cpu": "cpu"},) * 2,
          "callable": (fn(seen_t), fn(seen_f)), "callable_none": (fn_none,) * 2, "meta": ("meta",) * 2,
          "none": (None, None)}[form]
    exp = torch.load(path, map_location=ml[0])
    got = tft.load(path, map_location=ml[1])
    assert_torch_equal(torch, got, exp)
    assert seen_t == seen_f
    if form == "callable":
        assert seen_f and all(t is torch.UntypedStorage and loc == "cpu" for t, loc, _ in seen_f)


def test_map_location_callable_moves_storages(torch, case_files):
    """The callable's storage is what the tensors are built on (here a copy it made)."""
    import torchfree.torch as tft

    made = []

    def to_copy(storage, loc):
        c = storage.clone()
        made.append(c.data_ptr())
        return c

    got = tft.load(case_files["sharing"], map_location=to_copy)
    assert got["a"].untyped_storage().data_ptr() in made
    assert got["a"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()
    assert_torch_equal(torch, got, torch.load(case_files["sharing"], map_location=to_copy))


@pytest.mark.parametrize("ml", [None, "cuda:0", "cuda:1", "device", {"cuda:0": "cuda:1"}])
def test_cuda_checkpoint_without_gpu_errors_as_torch(torch, case_files, tmp_path, ml):
    import torchfree.torch as tft

    if torch.cuda.is_available():
        pytest.skip("this checks the error of a machine without CUDA")  # the GPU path is the device check
    path = tmp_path / "cuda.pt"
    _retag(case_files["sharing"], path)
    if ml == "device":
        ml = torch.device("cuda", 0)
    with pytest.raises(Exception) as exp:
        torch.load(path, map_location=ml)
    with pytest.raises(Exception) as got:
        tft.load(path, map_location=ml)
    assert type(got.value) is type(exp.value)
    assert str(got.value) == str(exp.value)
    # mapped to the CPU it loads, as in torch
    for cpu in ("cpu", torch.device("cpu"), {"cuda:0": "cpu"}, lambda s, loc: s):
        assert_torch_equal(torch, tft.load(path, map_location=cpu), torch.load(path, map_location=cpu))


def test_pinned_staging_pipeline_on_cpu(torch, case_files):
    """The staging code of the GPU path, run with a CPU target and tiny buffers (packing, splitting
    big storages, rotating buffers)."""
    import torchfree.torch as tft

    loaded = torchfree.load(case_files["train_adam"])
    arrays = []

    def collect(o):
        if isinstance(o, np.ndarray):
            arrays.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                collect(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v)

    collect(loaded)
    storages = {}
    for a in arrays:
        b = a
        while not isinstance(b, torchfree.Storage):
            b = b.base
        storages[id(b)] = b
    pairs = [(s, torch.UntypedStorage(s.nbytes)) for s in storages.values() if s.nbytes]
    for chunk, nbuf in ((64, 2), (100, 3), (1 << 20, 3)):
        for _, us in pairs:
            us.fill_(0)
        tft._stage(torch, pairs, torch.device("cpu"), chunk=chunk, nbuf=nbuf, pin=False)
        for s, us in pairs:
            assert bytes(us) == bytes(memoryview(s)), (chunk, nbuf)


# ---------------------------------------------------------------------------------------------
# torch's own test_serialization.py cases (spec section 9), re-expressed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_serialization_list_shared_views_storages(torch, tmp_path, legacy):
    """test_serialization: tensors, shared views, typed storages, storage slices."""
    import torchfree.torch as tft

    b = torch.arange(10.0)
    t1 = torch.randn(3, 4)
    obj = [b, b[2:6], t1, t1.t(), torch.Size([1, 2]), b[1:].storage(), torch.arange(3).storage()]
    path = tmp_path / "s.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        exp, got = torch.load(path), tft.load(path)
    assert_torch_equal(torch, got, exp)
    assert got[0].untyped_storage().data_ptr() == got[1].untyped_storage().data_ptr()
    assert got[5].data_ptr() == got[0].untyped_storage().data_ptr()  # the typed storage of the tensors


def test_load_preserves_storage_sharing(torch, tmp_path):
    """test_load_preserves_storage_sharing: two slices of one buffer; an empty storage as two dtypes."""
    import torchfree.torch as tft

    x = torch.randn(10)
    e = torch.empty(0)
    for legacy in (False, True):
        path = tmp_path / f"s{legacy}.pt"
        torch.save({"a": x[:5], "b": x[5:], "e": e, "ei": e.view(torch.int32)}, path,
                   _use_new_zipfile_serialization=not legacy)
        got = tft.load(path)
        assert got["a"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()
        assert_torch_equal(torch, got, torch.load(path))
        meta = tft.load(path, map_location="meta")
        assert meta["a"].is_meta and meta["a"].storage_offset() == 0 and meta["b"].storage_offset() == 5
        assert_torch_equal(torch, meta, torch.load(path, map_location="meta"))


def test_serialization_python_attr(torch, tmp_path):
    import torchfree.torch as tft

    t = torch.randn(3)
    t.foo = "bar"
    p = torch.nn.Parameter(torch.randn(2))
    p.baz = [1, 2]
    path = tmp_path / "a.pt"
    torch.save({"t": t, "p": p}, path)
    got = tft.load(path)
    assert got["t"].foo == "bar" and got["p"].baz == [1, 2]
    assert_torch_equal(torch, got, torch.load(path))


@pytest.mark.parametrize("bits", ["conj", "neg", "both"])
def test_serialization_math_bits(torch, tmp_path, bits):
    import torchfree.torch as tft

    t = torch.randn(4, dtype=torch.complex64)
    t = {"conj": t.conj(), "neg": torch._neg_view(t), "both": torch._neg_view(t.conj())}[bits]
    torch.save(t, tmp_path / "m.pt")
    got = tft.load(tmp_path / "m.pt")
    assert (got.is_conj(), got.is_neg()) == (t.is_conj(), t.is_neg())
    assert torch.equal(got.resolve_conj().resolve_neg(), t.resolve_conj().resolve_neg())


@pytest.mark.parametrize("dtype", ["float8_e5m2", "float8_e4m3fn", "complex32", "uint16", "uint32", "uint64"])
def test_serialization_dtype(torch, tmp_path, dtype):
    """test_serialization_dtype: v3 dtypes round trip; even/odd views stay views."""
    import torchfree.torch as tft

    x = _random(torch, dtype, (10,))
    obj = {"x": x, "even": x[0::2], "odd": x[1::2]}
    torch.save(obj, tmp_path / "d.pt")
    got = tft.load(tmp_path / "d.pt")
    assert got["even"].untyped_storage().data_ptr() == got["x"].untyped_storage().data_ptr()
    assert_torch_equal(torch, got, torch.load(tmp_path / "d.pt"))


@pytest.mark.parametrize("kind", ["bytes", "bytearray"])
def test_serialization_byte_literal(torch, tmp_path, kind):
    import torchfree.torch as tft

    obj = {"x": b"\x00\xffab" if kind == "bytes" else bytearray(b"\x01\x02"), "t": torch.ones(2)}
    torch.save(obj, tmp_path / "b.pt")
    assert_torch_equal(torch, tft.load(tmp_path / "b.pt"), torch.load(tmp_path / "b.pt"))


def test_meta_serialization(torch, tmp_path):
    import torchfree.torch as tft

    m = torch.nn.Linear(3, 4, device="meta")
    torch.save(m.state_dict(), tmp_path / "m.pt")
    got = tft.load(tmp_path / "m.pt")
    assert got["weight"].is_meta
    assert_torch_equal(torch, got, torch.load(tmp_path / "m.pt"))


def test_serialization_new_format_old_format_compat(torch, tmp_path):
    import torchfree.torch as tft

    torch.manual_seed(0)
    ts = [torch.randn(i + 1, 3) for i in range(30)]
    torch.save(ts, tmp_path / "new.pt")
    torch.save(ts, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    a, b = tft.load(tmp_path / "new.pt"), tft.load(tmp_path / "old.pt")
    assert_torch_equal(torch, a, b)
    assert_torch_equal(torch, a, torch.load(tmp_path / "new.pt"))


def test_safe_load_basic_types(torch, tmp_path):
    import torchfree.torch as tft

    obj = {"int": 1, "str": "x", "float": 1.5, "bool": True, "none": None}
    torch.save(obj, tmp_path / "b.pt")
    assert tft.load(tmp_path / "b.pt") == torch.load(tmp_path / "b.pt") == obj


def test_weights_only_refuses_unsafe_global(torch, tmp_path):
    """test_weights_only_assert: __reduce__ to print is refused (and never run)."""
    import torchfree.torch as tft

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "e.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "e.pt")
    with pytest.raises(torchfree.UnsafeGlobalError):
        tft.load(tmp_path / "e.pt")


def test_mmap_requires_zip_and_path(torch, case_files):
    import torchfree.torch as tft

    with pytest.raises(torchfree.CheckpointError):
        tft.load(case_files["params_legacy"], mmap=True)
    with pytest.raises(ValueError, match="mmap"):
        tft.load(case_files["params"].read_bytes(), mmap=True)


def test_torchscript_archive_refused_as_torch_does(torch, tmp_path):
    import torchfree.torch as tft

    path = DATA / "ts113_scripted.pt"  # (scripting here would mangle the class names other tests see)
    with pytest.raises(RuntimeError) as exp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(path)
    with pytest.raises(RuntimeError) as got:
        tft.load(path)
    assert str(got.value) == str(exp.value)


def test_pickle_module_stands_in_or_refused(torch, case_files):
    """The standard pickle module is stood in for (weights_only=None then means False, as in
    torch); a module with an unpickler of its own is refused (patched() hands it to torch)."""
    import torchfree.torch as tft

    assert_torch_equal(torch, tft.load(case_files["params"], pickle_module=pickle),
                       torch.load(case_files["params"], pickle_module=pickle))

    class Own(pickle.Unpickler):
        pass

    class Module:
        Unpickler, load = Own, pickle.load

    with pytest.raises(TypeError, match="unpickler of its own"):
        tft.load(case_files["params"], pickle_module=Module)


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def _records(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i.filename) for i in z.infolist() if not i.filename.endswith("serialization_id")}


@pytest.mark.parametrize("name", ["train_adam", "params", "sharing", "dtype_bfloat16", "quantized", "meta", "objects"])
def test_save_equals_torch_save(torch, tmp_path, case_objects, name):
    import torchfree.torch as tft

    obj = case_objects[name]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(obj, tmp_path / "a" / "ckpt.pt")
    tft.save(obj, tmp_path / "b" / "ckpt.pt")
    assert _records(tmp_path / "a" / "ckpt.pt") == _records(tmp_path / "b" / "ckpt.pt")
    assert os.listdir(tmp_path / "b") == ["ckpt.pt"]  # no temporary left behind
    assert_torch_equal(torch, tft.load(tmp_path / "b" / "ckpt.pt"), torch.load(tmp_path / "a" / "ckpt.pt"))


def test_save_replaces_atomically_and_keeps_mode(torch, tmp_path):
    import torchfree.torch as tft

    path = tmp_path / "c.pt"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    tft.save({"x": torch.ones(2)}, path)
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert torch.equal(torch.load(path)["x"], torch.ones(2))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        tft.save({"x": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["x"], torch.ones(2))  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]


def test_save_file_object(torch, tmp_path):
    import torchfree.torch as tft

    buf = io.BytesIO()
    tft.save({"x": torch.arange(3)}, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf)["x"], torch.arange(3))


# ---------------------------------------------------------------------------------------------
# patched()
# ---------------------------------------------------------------------------------------------


def _library_load(path):
    """What a trainer or a model hub does inside."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _library_save(obj, path):
    import torch

    torch.save(obj, path)


class _Custom:
    def __init__(self, v):
        self.v = v


def test_patched_routes_library_calls(torch, case_files, tmp_path, monkeypatch):
    import torchfree.torch as tft

    calls = []
    real = tft._load
    monkeypatch.setattr(tft, "_load", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    orig_load, orig_save = torch.load, torch.save
    with tft.patched():
        assert torch.load is not orig_load
        got = _library_load(case_files["train_adam"])
        _library_save(got, tmp_path / "re.pt")
    assert torch.load is orig_load and torch.save is orig_save
    assert calls == [case_files["train_adam"]]
    assert_torch_equal(torch, got, torch.load(case_files["train_adam"]))
    assert_torch_equal(torch, torch.load(tmp_path / "re.pt"), got)


def test_patched_falls_back_with_one_warning(torch, tmp_path):
    import torchfree.torch as tft

    path = tmp_path / "c.pt"
    torch.save({"c": _Custom(3), "t": torch.ones(2)}, path)
    tft._warned.clear()
    with tft.patched():
        with pytest.warns(UserWarning, match="falling back"):
            got = torch.load(path, weights_only=False)  # needs the real class
        assert isinstance(got["c"], _Custom) and got["c"].v == 3
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.load(path, weights_only=False)  # one warning per reason
        got = torch.load(tmp_path / "c.pt", pickle_module=pickle, weights_only=False)  # same reason: no warning
        assert got["c"].v == 3
        with open(path, "rb") as f:  # a file object is rewound for the fallback
            assert torch.load(f, weights_only=False)["c"].v == 3


def test_install_uninstall_nest(torch):
    import torchfree.torch as tft

    orig = torch.load
    tft.install()
    tft.install()
    tft.uninstall()
    assert torch.load is not orig
    tft.uninstall()
    assert torch.load is orig
    tft.uninstall()  # extra uninstall is harmless
    assert torch.load is orig


def test_no_object_leak(torch, case_files):
    """Repeated torch-mode loads of every kind leave no Python objects behind."""
    import gc

    import torchfree.torch as tft

    paths = [case_files[n] for n in ("params", "quantized", "sparse", "objects", "meta", "math_bits",
                                     "params_legacy")]
    for p in paths:
        tft.load(p)
    gc.collect()
    n0 = len(gc.get_objects())
    for _ in range(30):
        for p in paths:
            tft.load(p)
            tft.load(p, mmap=False) if not str(p).endswith("_legacy.pt") else None
    gc.collect()
    assert len(gc.get_objects()) - n0 < 50


def test_weights_only_false_gives_inert_placeholders(torch, tmp_path):
    """Outside patched(), weights_only=False never imports the class: an inert Opaque, with the
    tensors around it as torch tensors."""
    import torchfree.torch as tft

    path = tmp_path / "c.pt"
    torch.save({"c": _Custom(torch.ones(2)), "t": torch.arange(3)}, path)
    got = tft.load(path, weights_only=False)
    assert isinstance(got["c"], torchfree.Opaque) and got["c"].name == "_Custom"
    assert isinstance(got["c"].state["v"], torch.Tensor) and torch.equal(got["c"].state["v"], torch.ones(2))
    assert torch.equal(got["t"], torch.arange(3))
    with pytest.raises(torchfree.UnsafeGlobalError):
        tft.load(path)
