"""The rarer rebuild functions of spec §5.1, compared with torch 2.13 bit for bit.

Quantized (``_rebuild_qtensor``), sparse (``_rebuild_sparse_tensor``, 1.x
``_rebuild_sparse_csr_tensor``), nested (``_rebuild_nested_tensor``), meta,
device rebuilds (``_rebuild_device_tensor_from_cpu_tensor`` / ``_from_numpy``),
wrapper subclasses (``_rebuild_wrapper_subclass``), ``_rebuild_from_type`` and the
pre-0.4 ``Tensor()`` + ``BUILD`` forms; saving QuantizedArray / SparseArray for
``torch.load(weights_only=True)``; hostile variants of each.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import warnings

import numpy as np
import pytest
from conftest import assert_same
from test_core import P, archive, binint, glob, storage_pid, tensor_v2, unicode

import torchfree

DATA = pathlib.Path(__file__).parent / "data"


def tup(xs) -> bytes:
    return P(b"(", *[binint(x) for x in xs], b"t")


def ckpt(body: bytes, records=None) -> bytes:
    return archive(P(b"\x80\x02", body, b"."), records)


def roundtrip(torch, obj, tmp_path, name="x.pt", **load_kw):
    """torch.save obj; return (torchfree.load, torch.load) of the file."""
    path = tmp_path / name
    torch.save(obj, path)
    got = torchfree.load(path, **load_kw)
    exp = torch.load(path, weights_only=load_kw.get("weights_only", True))
    return got, exp


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation warnings for quantized tensors
        yield


# ---- quantized ------------------------------------------------------------------------------


def quantized_cases(torch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=g) * 20
    big = torch.randn(3, 4, generator=g) * 1e6
    out = {}
    for dt in (torch.qint8, torch.quint8, torch.qint32):
        name = str(dt).removeprefix("torch.")
        zp = 3 if dt != torch.qint32 else -70000
        out[f"{name}_tensor"] = torch.quantize_per_tensor(x, 0.037, zp, dt)
        out[f"{name}_channel0"] = torch.quantize_per_channel(
            x, torch.rand(5, dtype=torch.float64, generator=g) + 0.01, torch.tensor([0, 1, 2, 3, 4]), 0, dt)
        out[f"{name}_channel1"] = torch.quantize_per_channel(
            x, torch.rand(6, dtype=torch.float64, generator=g) + 0.01, torch.arange(6), 1, dt)
        out[f"{name}_view"] = out[f"{name}_tensor"].t()[1:4]
    out["qint32_big"] = torch.quantize_per_tensor(big, 0.3, 12345, torch.qint32)
    out["quint8_float_qparams"] = torch.quantize_per_channel(
        x, torch.rand(5, generator=g) + 0.01, torch.rand(5, generator=g) * 4, 0, torch.quint8)
    for dt in (torch.quint4x2, torch.quint2x4):
        name = str(dt).removeprefix("torch.")
        for shape in ((3, 5), (7,), (2, 3, 3), ()):
            out[f"{name}_{len(shape)}d"] = torch.quantize_per_tensor(torch.rand(shape, generator=g) * 2, 0.037, 1, dt)
        out[f"{name}_float_qparams"] = torch.quantize_per_channel(
            torch.rand(4, 6, generator=g), torch.rand(4, generator=g) / 7 + 0.01, torch.rand(4, generator=g), 0, dt)
    return out


def test_quantized(torch, tmp_path):
    with quiet():
        cases = quantized_cases(torch)
        got, exp = roundtrip(torch, cases, tmp_path)
        assert_same(got, exp)
    q = got["qint8_view"]
    assert np.shares_memory(q.int_repr, got["qint8_tensor"].int_repr)  # one storage, as in torch
    assert got["quint8_float_qparams"].qscheme == "torch.per_channel_affine_float_qparams"
    assert "qint8" in repr(q) and "per_tensor_affine" in repr(q)
    # lazy loading gives the same objects
    with torchfree.open(tmp_path / "x.pt") as ck:
        with quiet():
            assert_same(ck.load(), exp)


def test_quantized_old_list_qparams(torch, tmp_path):
    """Old files pickle per-channel scales / zero points as lists (torch rebuilds them as double / long)."""
    raw = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int8)
    body = P(glob("torch._utils", "_rebuild_qtensor"), b"(", storage_pid("0", 6, "QInt8Storage"), binint(0),
             tup((2, 3)), tup((3, 1)), b"(", glob("torch", "per_channel_affine"), b"]", b"(", b"G",
             np.float64(0.5).byteswap().tobytes(), b"G", np.float64(0.25).byteswap().tobytes(), b"e",
             b"]", b"(", binint(1), binint(-2), b"e", binint(0), b"t", b"\x89",
             glob("collections", "OrderedDict"), b")R", b"tR")
    data = ckpt(body, {"0": raw.tobytes()})
    with quiet():
        exp = torch.load(io.BytesIO(data), weights_only=True)
    assert_same(torchfree.load(data), exp)


def test_quantized_save(torch, tmp_path):
    """QuantizedArray -> torchfree.save -> torch.load(weights_only=True): the same tensors."""
    with quiet():
        cases = quantized_cases(torch)
        torch.save(cases, tmp_path / "a.pt")
        exp = torch.load(tmp_path / "a.pt", weights_only=True)
    loaded = torchfree.load(tmp_path / "a.pt")
    for fmt in ("zip", "legacy"):
        torchfree.save(loaded, tmp_path / "b.pt", format=fmt)
        with quiet():
            if fmt == "zip":
                assert_same(torchfree.load(tmp_path / "b.pt"), exp)
            back = torch.load(tmp_path / "b.pt", weights_only=True)
        for k, t in exp.items():
            b = back[k]
            assert b.dtype == t.dtype and b.qscheme() == t.qscheme() and b.shape == t.shape, k
            assert torch.equal(b.int_repr(), t.int_repr()), k
            assert torch.equal(b.dequantize(), t.dequantize()), k
            if t.qscheme() == torch.per_tensor_affine:
                assert (b.q_scale(), b.q_zero_point()) == (t.q_scale(), t.q_zero_point()), k
            else:
                assert torch.equal(b.q_per_channel_scales(), t.q_per_channel_scales()), k
                assert torch.equal(b.q_per_channel_zero_points(), t.q_per_channel_zero_points()), k
                assert b.q_per_channel_axis() == t.q_per_channel_axis(), k


def test_quantized_made_by_hand(torch, tmp_path):
    ir = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    arrays = {
        "t": torchfree.QuantizedArray(ir, "qint8", 0.5, -1),
        "c": torchfree.QuantizedArray(ir, "torch.qint8", np.array([0.5, 1.0, 2.0]), np.array([0, 1, -1]), 0),
        "p": torchfree.QuantizedArray(np.array([0x21, 0x43, 0x05], dtype=np.uint8), "quint4x2", 0.25, 2,
                                      shape=(5,)),
    }
    torchfree.save(arrays, tmp_path / "h.pt")
    with quiet():
        back = torch.load(tmp_path / "h.pt", weights_only=True)
    for k, q in arrays.items():
        assert np.array_equal(back[k].int_repr().numpy(), q.int_repr), k
        assert back[k].dequantize().numpy().tobytes() == q.dequantize().tobytes(), k
    assert arrays["p"].int_values().tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        torchfree.QuantizedArray(ir, "qint8", [0.5], [0], 0)  # 3 channels on axis 0
    with pytest.raises(ValueError):
        torchfree.QuantizedArray(ir, "qint8", 0.5, 0, 2)  # no axis 2
    with pytest.raises(TypeError):
        torchfree.QuantizedArray(ir.astype(np.uint8), "qint8", 0.5, 0)


# ---- sparse ---------------------------------------------------------------------------------


def sparse_cases(torch):
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(6, 8, generator=g) * (torch.rand(6, 8, generator=g) > 0.6)
    idx = torch.tensor([[0, 1, 1, 1, 0], [2, 0, 2, 2, 2]])
    vals = torch.tensor([0.1, 0.2, 0.3, 0.4, 1e-8])
    return {
        "coo": dense.to_sparse(),
        "coo_uncoalesced": torch.sparse_coo_tensor(idx, vals, (2, 3)),
        "coo_hybrid": torch.sparse_coo_tensor(idx[:1, :3], torch.randn(3, 4, generator=g), (2, 4)),
        "coo_int": torch.sparse_coo_tensor(idx, torch.tensor([1, 2, 3, 4, 5]), (2, 3)).coalesce(),
        "coo_empty": torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (3, 3)),
        "csr": dense.to_sparse_csr(),
        "csr_int32": torch.sparse_csr_tensor(torch.tensor([0, 1, 3], dtype=torch.int32),
                                             torch.tensor([1, 0, 2], dtype=torch.int32), torch.tensor([1., 2., 3.]),
                                             (2, 3)),
        "csr_batched": torch.stack([dense, dense * 2]).to_sparse_csr(),
        "csc": dense.to_sparse_csc(),
        "bsr": dense.to_sparse_bsr((2, 4)),
        "bsc": dense.to_sparse_bsc((3, 2)),
        "csr_f64": dense.double().to_sparse_csr(),
    }


def test_sparse(torch, tmp_path):
    cases = sparse_cases(torch)
    got, exp = roundtrip(torch, cases, tmp_path)
    assert_same(got, exp)
    # pread (deferred reads): the indices are checked once their bytes are in
    assert_same(torchfree.load(tmp_path / "x.pt", mmap=False), exp)
    s = got["csr"]
    assert s.crow_indices is s.compressed_indices and s.nnz == exp["csr"]._nnz()
    with pytest.raises(AttributeError):
        s.ccol_indices
    with pytest.raises(AttributeError):
        got["coo"].crow_indices
    assert "sparse_csr" in repr(s)


def test_sparse_save(torch, tmp_path):
    cases = sparse_cases(torch)
    torch.save(cases, tmp_path / "a.pt")
    exp = torch.load(tmp_path / "a.pt", weights_only=True)
    loaded = torchfree.load(tmp_path / "a.pt")
    for fmt in ("zip", "legacy"):
        torchfree.save(loaded, tmp_path / "b.pt", format=fmt)
        back = torch.load(tmp_path / "b.pt", weights_only=True)
        if fmt == "zip":
            assert_same(torchfree.load(tmp_path / "b.pt"), exp)
        for k, t in exp.items():
            b = back[k]
            assert b.layout == t.layout and b.shape == t.shape and b.dtype == t.dtype, k
            assert torch.equal(b.to_dense(), t.to_dense()), k
            if t.layout == torch.sparse_coo:
                assert b.is_coalesced() == t.is_coalesced(), k
                assert torch.equal(b._indices(), t._indices()) and torch.equal(b._values(), t._values()), k
    # made by hand: is_coalesced unknown (None) is written as None
    hand = torchfree.SparseArray("torch.sparse_coo", (3,), np.array([1.0, 2.0]), np.array([[2, 0]]))
    torchfree.save({"s": hand}, tmp_path / "c.pt")
    t = torch.load(tmp_path / "c.pt", weights_only=True)["s"]
    assert t.to_dense().tolist() == [2.0, 0.0, 1.0]


def test_sparse_113_fixtures():
    """torch 1.13 files (tests/data/make_fixtures_113.py): COO 3-tuples and
    _rebuild_sparse_csr_tensor, which torch 2.x no longer loads."""
    got = torchfree.load(DATA / "sparse_113.pt")
    exp = np.load(DATA / "sparse_113.npz")
    assert got["coo"].is_coalesced is None and got["csr"].layout == "torch.sparse_csr"
    for k in ("coo", "coo_uncoalesced", "csr"):
        d = got[k].todense()
        assert d.dtype == exp[k].dtype and d.shape == exp[k].shape
        assert d.tobytes() == exp[k].tobytes(), k
    assert np.array_equal(got["csr"].crow_indices, exp["csr_crow"])
    assert np.array_equal(got["csr"].col_indices, exp["csr_col"])
    assert np.array_equal(got["coo"].indices, exp["coo_indices"])


# ---- nested, meta ---------------------------------------------------------------------------


def test_nested(torch, tmp_path):
    g = torch.Generator().manual_seed(2)
    nt = torch.nested.nested_tensor([torch.randn(2, 3, generator=g), torch.randn(4, 3, generator=g),
                                     torch.randn(0, 3, generator=g)])
    got, exp = roundtrip(torch, {"nt": nt, "nt_int": torch.nested.nested_tensor([torch.arange(3), torch.arange(5)])},
                         tmp_path)
    assert_same(got, exp)
    assert isinstance(got["nt"], list) and "NestedArray" in repr(got["nt"])


def test_meta(torch, tmp_path):
    obj = {"a": torch.empty(2, 3, device="meta"), "b": torch.empty(4, dtype=torch.bfloat16, device="meta"),
           "c": torch.empty((), dtype=torch.int64, device="meta")}
    got, exp = roundtrip(torch, obj, tmp_path)
    assert_same(got, exp)
    assert isinstance(got["a"], torchfree.MetaArray)


# ---- device rebuilds ------------------------------------------------------------------------


def _device_file(torch, path, func, data, dtype):
    class OnDevice:
        def __reduce_ex__(self, proto):
            return (func, (data, dtype, "cpu", False))

    torch.save({"x": OnDevice(), "y": [OnDevice()]}, path)


def test_device_tensor_from_cpu_tensor(torch, tmp_path):
    src = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int32):
        _device_file(torch, tmp_path / "d.pt", torch._utils._rebuild_device_tensor_from_cpu_tensor, src, dtype)
        exp = torch.load(tmp_path / "d.pt", weights_only=True)
        assert_same(torchfree.load(tmp_path / "d.pt"), exp)


def test_device_tensor_from_numpy(torch, tmp_path):
    src = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32)
    for func in (torch._utils._rebuild_device_tensor_from_numpy, torch._utils._rebuild_xla_tensor):
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            _device_file(torch, tmp_path / "n.pt", func, src, dtype)
            exp = torch.load(tmp_path / "n.pt", weights_only=False)
            assert_same(torchfree.load(tmp_path / "n.pt"), exp)


# ---- subclasses -----------------------------------------------------------------------------


def test_wrapper_subclass(torch, tmp_path):
    from torch.testing._internal.two_tensor import TwoTensor

    a, b = torch.arange(6.0).reshape(2, 3), torch.ones(2, 3)
    torch.save({"tt": TwoTensor(a, b)}, tmp_path / "w.pt")
    with pytest.raises(Exception):
        torch.load(tmp_path / "w.pt", weights_only=True)
    with pytest.raises(torchfree.UnsafeGlobalError, match="TwoTensor"):
        torchfree.load(tmp_path / "w.pt")
    got = torchfree.load(tmp_path / "w.pt", weights_only=False)
    tt = got["tt"]
    assert isinstance(tt, torchfree.Opaque) and tt.name == "TwoTensor"
    assert isinstance(tt.args[0], torchfree.MetaArray) and tt.args[0].shape == (2, 3)
    flat = torchfree.flatten(got)
    assert np.array_equal(flat["tt.a"], a.numpy()) and np.array_equal(flat["tt.b"], b.numpy())


def test_rebuild_from_type_old(torch):
    """torch.tensor._rebuild_from_type (<=1.8 subclasses; the module spelled torch.tensor)."""
    f32 = np.arange(12, dtype=np.float32)
    body = P(glob("torch.tensor", "_rebuild_from_type"), b"(", glob("torch._utils", "_rebuild_tensor_v2"),
             glob("torch", "Tensor"), b"(", storage_pid("0", 12), binint(2), tup((2, 3)), tup((3, 1)), b"\x89",
             glob("collections", "OrderedDict"), b")R", b"t", b"}", b"tR")
    data = ckpt(body, {"0": f32.tobytes()})
    exp = torch.load(io.BytesIO(data), weights_only=False)
    assert_same(torchfree.load(data, weights_only=False), exp)
    with pytest.raises(torchfree.UnsafeGlobalError):  # not in torch's weights-only allowlist either
        torchfree.load(data)


# ---- pre-0.4 tensors ------------------------------------------------------------------------


F32 = np.arange(12, dtype=np.float32)


def _old(body):
    return ckpt(body, {"0": F32.tobytes()})


OLD_FORMS = {
    # OldTensorV1: Tensor() + BUILD (storage, offset, size, stride); memoized, then referenced again
    "tensor_build": P(b"}", b"(", unicode("a"), glob("torch", "Tensor"), b")R", b"q\x00",
                      b"(", storage_pid("0", 12), binint(1), tup((2, 3)), tup((3, 1)), b"t", b"b",
                      unicode("b"), b"h\x00", b"u"),
    # a legacy tensor class called the same way
    "float_tensor_build": P(b"}", unicode("a"), glob("torch", "FloatTensor"), b")R",
                            b"(", storage_pid("0", 12), binint(0), tup((4,)), tup((3,)), b"t", b"bs"),
    # OldTensorV2: _rebuild_tensor
    "rebuild_tensor": P(b"}", unicode("a"), glob("torch._utils", "_rebuild_tensor"), b"(", storage_pid("0", 12),
                        binint(2), tup((5,)), tup((2,)), b"tRs"),
    # a pre-0.4 Variable: (data, _, backward_hooks, requires_grad, _)
    "variable_5": P(b"}", unicode("a"), glob("torch", "Tensor"), b")R", b"(",
                    tensor_v2("0", 12, 0, (3, 4), (4, 1)), b"N", glob("collections", "OrderedDict"), b")R",
                    b"\x88N", b"t", b"bs"),
    # (requires_grad, _, backward_hooks): an empty tensor stays
    "state_3": P(b"}", unicode("a"), glob("torch", "Tensor"), b")R", b"(\x89N", glob("collections", "OrderedDict"),
                 b")R", b"t", b"bs"),
    "bare_tensor": P(b"}", unicode("a"), glob("torch", "DoubleTensor"), b")Rs"),
}


@pytest.mark.parametrize("form", sorted(OLD_FORMS))
def test_pre_04_forms(torch, form):
    data = _old(OLD_FORMS[form])
    # torch's weights-only BUILD on a tensor is set_(*state): only the 4-tuple states load there
    exp = torch.load(io.BytesIO(data), weights_only=form not in ("state_3", "variable_5"))
    got = torchfree.load(data)
    assert_same(got, exp)
    assert_same(torchfree.load(data, weights_only=False), torch.load(io.BytesIO(data), weights_only=False))
    if form == "tensor_build":
        assert got["a"] is got["b"]  # BUILD replaced the memo entry too
    with torchfree.open(data) as ck:
        assert_same(ck.load(), exp)


# ---- hostile --------------------------------------------------------------------------------


def _q(params: bytes, storage="QInt8Storage", size=(2, 3), stride=(3, 1), offset=0, numel=6):
    return P(glob("torch._utils", "_rebuild_qtensor"), b"(", storage_pid("0", numel, storage), binint(offset),
             tup(size), tup(stride), params, b"\x89", glob("collections", "OrderedDict"), b")R", b"tR")


def _per_tensor(scale=b"G?\xe0\x00\x00\x00\x00\x00\x00", zp=binint(0)):
    return P(b"(", glob("torch", "per_tensor_affine"), scale, zp, b"t")


def _coo(indices, values, size, extra=b"\x89"):
    return P(glob("torch._utils", "_rebuild_sparse_tensor"), glob("torch.serialization", "_get_layout"), b"(",
             unicode("torch.sparse_coo"), b"tR", b"(", indices, values, glob("torch", "Size"), b"(", tup(size), b"tR",
             extra, b"t", b"\x86R")


IDX = tensor_v2("0", 4, 0, (2, 2), (2, 1), "LongStorage")
VALS = tensor_v2("1", 2, 0, (2,), (1,), "FloatStorage")
RECS = {"0": np.array([[0, 1], [2, 0]], dtype=np.int64).tobytes(), "1": np.array([1, 2], dtype=np.float32).tobytes()}
BAD_IDX = {"0": np.array([[0, 1], [2, 9]], dtype=np.int64).tobytes(), "1": RECS["1"]}
NEG_IDX = {"0": np.array([[0, -1], [2, 0]], dtype=np.int64).tobytes(), "1": RECS["1"]}
Q6 = {"0": bytes(6)}

HOSTILE = {
    "q_unknown_qscheme": (_q(P(b"(", glob("torch", "per_tensor_symmetric"), b"G?\xe0\0\0\0\0\0\0", binint(0), b"t")),
                          Q6, torchfree.UnpicklingError, "qscheme"),
    "q_params_not_tuple": (_q(binint(3)), Q6, torchfree.UnpicklingError, "quantizer"),
    "q_scale_str": (_q(_per_tensor(scale=unicode("x"))), Q6, torchfree.UnpicklingError, "scale"),
    "q_zero_point_float": (_q(_per_tensor(zp=b"G?\xe0\0\0\0\0\0\0")), Q6, torchfree.UnpicklingError, "zero_point"),
    "q_axis_out_of_range": (_q(P(b"(", glob("torch", "per_channel_affine"), b"]", b"]", binint(5), b"t")), Q6,
                            torchfree.FormatError, "axis"),
    "q_channel_len": (_q(P(b"(", glob("torch", "per_channel_affine"), b"](G?\xe0\0\0\0\0\0\0e](", binint(0), b"e",
                           binint(0), b"t")), Q6, torchfree.FormatError, "size\\[0\\]"),
    "q_plain_storage": (_q(_per_tensor(), storage="CharStorage"), Q6, torchfree.UnpicklingError, "quantized"),
    "q_past_storage": (_q(_per_tensor(), size=(4, 3)), Q6, torchfree.FormatError, "past the end"),
    "q_packed_past_storage": (_q(_per_tensor(), storage="QUInt4x2Storage", size=(20,), stride=(1,), numel=6), Q6,
                              torchfree.FormatError, "past the end"),
    "q_wrong_arg_count": (P(glob("torch._utils", "_rebuild_qtensor"), b"(", binint(1), b"tR"), None,
                          torchfree.UnpicklingError, "expects"),
    "coo_index_out_of_range": (_coo(IDX, VALS, (2, 3)), BAD_IDX, torchfree.FormatError, "out of range"),
    "coo_negative_index": (_coo(IDX, VALS, (2, 3)), NEG_IDX, torchfree.FormatError, "out of range"),
    "coo_values_mismatch": (_coo(IDX, VALS, (2, 3, 4)), RECS, torchfree.FormatError, "do not fit"),
    "coo_indices_not_tensor": (_coo(binint(1), VALS, (2, 3)), RECS, torchfree.UnpicklingError, "not a tensor"),
    "coo_five_items": (_coo(IDX, VALS, (2, 3), extra=b"\x89\x89"), RECS, torchfree.UnpicklingError, "5 items"),
    "sparse_wrong_arg_count": (P(glob("torch._utils", "_rebuild_sparse_tensor"), b"(", binint(1), b"tR"), None,
                               torchfree.UnpicklingError, "expects"),
    "sparse_unknown_layout": (P(glob("torch._utils", "_rebuild_sparse_tensor"), glob("torch.serialization",
                                                                                     "_get_layout"),
                                b"(", unicode("torch.strided"), b"tR", b")", b"\x86R"), None,
                              torchfree.UnpicklingError, "layout"),
    "nested_wrong_arg_count": (P(glob("torch._utils", "_rebuild_nested_tensor"), b"(", binint(1), b"tR"), None,
                               torchfree.UnpicklingError, "expects"),
    "device_wrong_arg_count": (P(glob("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"), b")R"), None,
                               torchfree.UnpicklingError, "expects"),
    "device_bad_dtype": (P(glob("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"), b"(", VALS,
                           glob("torch", "qint8"), unicode("cpu"), b"\x89tR"), RECS, torchfree.UnpicklingError,
                         "not supported"),
    "tensor_with_args": (P(glob("torch", "Tensor"), b"(", binint(5), b"tR"), None, torchfree.UnpicklingError,
                         "arguments"),
    "build_state_2": (P(glob("torch", "Tensor"), b")R", b"(", binint(1), binint(2), b"tb"), None,
                      torchfree.UnpicklingError, "2 items"),
    "variable_not_tensor": (P(glob("torch", "Tensor"), b")R", b"(", unicode("x"), b"NN\x88Ntb"), None,
                            torchfree.UnpicklingError, "not a tensor"),
    "build_past_storage": (P(glob("torch", "Tensor"), b")R", b"(", storage_pid("0", 2), binint(0), tup((5,)),
                             tup((1,)), b"tb"), {"0": bytes(8)}, torchfree.FormatError, "past the end"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile(name):
    body, recs, exc, match = HOSTILE[name]
    data = ckpt(body, recs)
    with pytest.raises(exc, match=match):
        torchfree.load(data)
    with pytest.raises(torchfree.CheckpointError):
        torchfree.load(data, weights_only=False)
    with pytest.raises(torchfree.CheckpointError):
        with torchfree.open(data) as ck:
            ck.load()


def test_nested_hostile():
    """Components reaching past the buffer, or negative sizes, are refused."""
    buf = tensor_v2("0", 6, 0, (6,), (1,))

    def meta(key, vals, shape):
        n = int(np.prod(shape))
        return tensor_v2(key, n, 0, shape, (shape[1], 1) if len(shape) == 2 else (1,), "LongStorage"), \
            np.array(vals, dtype=np.int64).tobytes()

    for sizes, strides, offs, match in (([[2, 3]], [[3, 1]], [1], "past its buffer"),
                                        ([[-1, 3]], [[3, 1]], [0], "negative"),
                                        ([[2, 3], [1, 1]], [[3, 1]], [0, 0], "int64")):
        s, sb = meta("1", sizes, np.array(sizes).shape)
        t, tb = meta("2", strides, np.array(strides).shape)
        o, ob = meta("3", offs, np.array(offs).shape)
        body = P(glob("torch._utils", "_rebuild_nested_tensor"), b"(", buf, s, t, o, b"tR")
        data = ckpt(body, {"0": np.zeros(6, np.float32).tobytes(), "1": sb, "2": tb, "3": ob})
        with pytest.raises(torchfree.FormatError, match=match):
            torchfree.load(data)
