"""Shared fixtures and oracle helpers for the torchfree test suite.

* ``torch`` fixture / :func:`require_torch`: the real PyTorch as an oracle. When torch cannot be
  imported the test is skipped ("torch not installed"), unless the environment variable
  ``TORCHFREE_REQUIRE_TORCH=1`` is set, in which case the test FAILS (CI that must run the oracle).
* ``needs_torch`` marker: every test so marked gets the same treatment at setup time.
* :func:`assert_same` walks a torchfree result and a torch.load result side by side and compares
  them exactly (tensor vs ndarray bit for bit, dtype mapping of docs/API.md, shape, strides in
  bytes, containers and their types/key order, scalars), then checks storage sharing across every
  tensor in the object (:func:`check_sharing`).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DATA = TESTS / "data"
# real files vendored from the format research and torchvision 0.14.1 (see their README.md)
SAMPLES = DATA / "samples"
CORPUS = DATA / "corpus"

# Make an in-place build (``python setup.py build_ext --inplace``) importable without installing.
if importlib.util.find_spec("torchfree") is None:  # pragma: no cover - depends on how it is built
    sys.path.insert(0, str(REPO / "pyext"))

if str(TESTS) not in sys.path:  # so test modules can `import ckpt_tools`
    sys.path.insert(0, str(TESTS))


# ---------------------------------------------------------------------------------------------
# torch as an optional oracle
# ---------------------------------------------------------------------------------------------

def _import_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    return sys.modules["torch"]


def run_fresh(code: str, *args) -> str:
    """Run ``code`` (dedented) with ``args`` in a fresh Python process that imports the torchfree
    this one does (first-use imports are tested so); its stdout, stripped. Asserts it exited 0."""
    import torchfree

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(torchfree.__file__)))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def require_torch():
    """Return the torch module; skip (or fail under TORCHFREE_REQUIRE_TORCH=1) without it."""
    mod = _import_torch()
    if mod is None:
        if os.environ.get("TORCHFREE_REQUIRE_TORCH") == "1":
            pytest.fail("torch not installed, but TORCHFREE_REQUIRE_TORCH=1 requires the oracle")
        pytest.skip("torch not installed")
    return mod


@pytest.fixture
def torch():
    return require_torch()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "needs_torch: compares against real PyTorch; skipped when torch is missing "
        "(fails instead when TORCHFREE_REQUIRE_TORCH=1)",
    )
    config.addinivalue_line(
        "markers", "huge: writes and reads files of several GB; deselected unless TORCHFREE_SLOW=1")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # torch itself emits UserWarnings/FutureWarnings (ComplexHalf is experimental, protocol != 2,
    # deprecated quantization, ...). They are not torchfree's concern; keep them from turning into
    # errors when the project runs with filterwarnings=error.
    # Every test that uses the `torch` fixture needs torch: mark it, so `-m "not needs_torch"`
    # (the ASan+UBSan run of .ci/run) leaves it out. tryfirst: before -m deselects.
    # `huge` tests (GBs of disk and I/O) run only when asked for: TORCHFREE_SLOW=1.
    if os.environ.get("TORCHFREE_SLOW") != "1":
        huge = [item for item in items if item.get_closest_marker("huge") is not None]
        if huge:
            config.hook.pytest_deselected(items=huge)
            items[:] = [item for item in items if item.get_closest_marker("huge") is None]
    for item in items:
        if "torch" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.needs_torch)
        if item.get_closest_marker("needs_torch") is not None:
            item.add_marker(pytest.mark.filterwarnings("ignore::UserWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore::FutureWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_torch") is not None:
        require_torch()


# ---------------------------------------------------------------------------------------------
# dtype mapping (docs/API.md, "What comes back")
# ---------------------------------------------------------------------------------------------

TORCH_TO_NP = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "complex128": np.dtype(np.complex128),
    "complex64": np.dtype(np.complex64),
    "complex32": np.dtype(np.complex64),  # exact upcast
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "float8_e8m0fnu": np.dtype(ml_dtypes.float8_e8m0fnu),
    # raw containers: shape as torch stores it
    "float4_e2m1fn_x2": np.dtype(np.uint8),
    "bits8": np.dtype(np.uint8),
    "bits1x8": np.dtype(np.uint8),
    "bits2x4": np.dtype(np.uint8),
    "bits4x2": np.dtype(np.uint8),
    "bits16": np.dtype(np.uint16),
}

# Every dtype torch 2.13 can torch.save as a plain dense tensor.
SAVEABLE_DTYPES = list(TORCH_TO_NP)

# dtype *objects* whose array mapping is not an exact numpy equivalent: API.md allows either the
# string "torch.<name>" (numpy has none) or the array dtype; anything else is a failure.
DTYPE_OBJ_AMBIGUOUS = {"complex32", "float4_e2m1fn_x2", "bits8", "bits1x8", "bits2x4",
                       "bits4x2", "bits16"}


def np_dtype_by_name(name):
    """numpy/ml_dtypes dtype from its name (as used in tests/data/expected.json)."""
    if hasattr(ml_dtypes, name) and name not in ("int4", "uint4", "int2", "uint2"):
        try:
            return np.dtype(getattr(ml_dtypes, name))
        except TypeError:
            pass
    return np.dtype(name)


def dtype_name(dt):
    """Name of a numpy/ml_dtypes dtype that np_dtype_by_name() maps back."""
    return np.dtype(dt).name


def expected_dtype_object(name):
    """What a torch dtype object (``torch.<name>``) must come back as: set of accepted values."""
    if name in DTYPE_OBJ_AMBIGUOUS:
        return {"torch." + name, TORCH_TO_NP[name]}
    if name in TORCH_TO_NP:
        return {TORCH_TO_NP[name]}
    return {"torch." + name}


def dtype_object_ok(got, name):
    """A dtype object must come back as an ``np.dtype`` instance or the exact string."""
    for acc in expected_dtype_object(name):
        if isinstance(acc, str):
            if type(got) is str and got == acc:
                return True
        elif isinstance(got, np.dtype) and got == acc:
            return True
    return False


def meta_dtype_ok(got, name):
    """MetaArray.dtype for torch dtype `name`: the dtype the array would have; for the dtypes
    without an exact numpy equivalent also the string "torch.<name>"."""
    if isinstance(got, str):
        return name in DTYPE_OBJ_AMBIGUOUS and got == "torch." + name
    try:
        return np.dtype(got) == TORCH_TO_NP[name]
    except TypeError:
        return False


# ---------------------------------------------------------------------------------------------
# raw bytes
# ---------------------------------------------------------------------------------------------

def np_bytes(a):
    """Flat uint8 view of an ndarray's values in C order."""
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8)


def torch_bytes(t):
    """Flat uint8 numpy array of a torch tensor's values (in the numpy dtype torchfree returns),
    in C order. Lazy conj/neg bits are resolved; complex32 is upcast to complex64 (exact)."""
    torch = sys.modules["torch"]
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg()
    if t.dtype == torch.complex32:
        t = t.to(torch.complex64)
    if t.is_complex():
        t = torch.view_as_real(t)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    raw = t.view(ints[t.element_size()]).contiguous()
    return raw.numpy().reshape(-1).view(np.uint8)


def float_bits(x):
    return struct.pack("<d", x)


# ---------------------------------------------------------------------------------------------
# structure walk
# ---------------------------------------------------------------------------------------------

class _Ctx:
    def __init__(self, meta):
        self.meta = meta
        self.pairs = []  # (path, ndarray, torch tensor)


def _join(path, key):
    key = str(key)
    return key if not path else f"{path}.{key}"


def _torch_types():
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    return torch


def _cmp_quantized(a, t, path, ctx):
    """QuantizedArray vs a torch quantized tensor: int_repr, quantizer, dequantize(), bit for bit."""
    import torchfree

    torch = sys.modules["torch"]
    assert isinstance(a, torchfree.QuantizedArray), f"{path}: expected QuantizedArray, got {type(a)!r}"
    assert a.dtype == str(t.dtype) and a.shape == tuple(t.shape), f"{path}: {a!r} vs {t.dtype} {tuple(t.shape)}"
    assert a.qscheme == str(t.qscheme()), f"{path}: qscheme {a.qscheme} != {t.qscheme()}"
    ir = t.int_repr()
    assert a.int_repr.dtype == ir.numpy().dtype and a.int_repr.shape == tuple(ir.shape), \
        f"{path}: int_repr {a.int_repr.dtype}{a.int_repr.shape} != {ir.dtype}{tuple(ir.shape)}"
    assert np.array_equal(np_bytes(a.int_repr), torch_bytes(ir)), f"{path}: int_repr values differ"
    if t.qscheme() == torch.per_tensor_affine:
        assert a.axis is None and type(a.zero_point) is int and a.zero_point == t.q_zero_point()
        _cmp_float(a.scale, t.q_scale(), path + ".scale")
    else:
        assert a.axis == t.q_per_channel_axis(), f"{path}: axis {a.axis} != {t.q_per_channel_axis()}"
        _cmp_tensor(a.scale, t.q_per_channel_scales(), path + ".scale", ctx, pair=False)
        _cmp_tensor(a.zero_point, t.q_per_channel_zero_points(), path + ".zero_point", ctx, pair=False)
    _cmp_tensor(a.dequantize(), t.dequantize(), path + ".dequantize()", ctx, pair=False, strides=False)


def _cmp_sparse(a, t, path, ctx):
    """SparseArray vs a torch sparse tensor: layout, index arrays, values, to_dense(), bit for bit."""
    import torchfree

    torch = sys.modules["torch"]
    assert isinstance(a, torchfree.SparseArray), f"{path}: expected SparseArray, got {type(a)!r}"
    assert a.layout == str(t.layout) and a.shape == tuple(t.shape), f"{path}: {a!r} vs {t.layout} {tuple(t.shape)}"
    if t.layout == torch.sparse_coo:
        assert a.is_coalesced == t.is_coalesced(), f"{path}: is_coalesced {a.is_coalesced} != {t.is_coalesced()}"
        parts = [("indices", t._indices()), ("values", t._values())]
    else:
        comp, plain = {torch.sparse_csr: ("crow", "col"), torch.sparse_bsr: ("crow", "col"),
                       torch.sparse_csc: ("ccol", "row"), torch.sparse_bsc: ("ccol", "row")}[t.layout]
        parts = [(comp + "_indices", getattr(t, comp + "_indices")()), (plain + "_indices", getattr(t, plain + "_indices")()),
                 ("values", t.values())]
        assert a.compressed_indices is getattr(a, comp + "_indices") and a.plain_indices is getattr(a, plain + "_indices")
    for name, tt in parts:
        _cmp_tensor(getattr(a, name), tt, f"{path}.{name}", ctx)
    _cmp_tensor(a.todense(), t.to_dense(), path + ".todense()", ctx, pair=False, strides=False)


def _cmp_tensor(a, t, path, ctx, pair=True, strides=True):
    import torchfree

    if t.is_quantized:
        return _cmp_quantized(a, t, path, ctx)
    if t.layout != sys.modules["torch"].strided:
        return _cmp_sparse(a, t, path, ctx)
    if t.is_nested:
        assert isinstance(a, torchfree.NestedArray), f"{path}: expected NestedArray, got {type(a)!r}"
        parts = t.unbind()
        assert len(a) == len(parts), f"{path}: {len(a)} components != {len(parts)}"
        for i, (x, y) in enumerate(zip(a, parts)):
            _cmp_tensor(x, y, f"{path}.{i}", ctx, pair=False)
            assert x.size == 0 or np.shares_memory(x, a.buffer), f"{path}.{i} does not view the nested buffer"
        return
    name = str(t.dtype).replace("torch.", "")
    exp_dt = TORCH_TO_NP[name]
    if ctx.meta or t.is_meta:
        assert isinstance(a, torchfree.MetaArray), f"{path}: expected MetaArray, got {type(a)!r}"
        assert type(a.shape) is tuple, f"{path}: MetaArray.shape must be a tuple, got {type(a.shape)!r}"
        assert a.shape == tuple(t.shape), f"{path}: shape {a.shape} != {tuple(t.shape)}"
        assert meta_dtype_ok(a.dtype, name), f"{path}: MetaArray dtype {a.dtype!r} for torch {t.dtype}"
        return
    assert type(a) is np.ndarray, f"{path}: expected a plain numpy.ndarray for a tensor, got {type(a)!r}"
    assert a.dtype == exp_dt, f"{path}: dtype {a.dtype!r} != {exp_dt!r} (torch {t.dtype})"
    assert a.dtype.byteorder in ("=", "|", "<" if sys.byteorder == "little" else ">"), \
        f"{path}: dtype {a.dtype!r} is not in native byte order"
    assert a.shape == tuple(t.shape), f"{path}: shape {a.shape} != {tuple(t.shape)}"
    lazy = t.is_conj() or t.is_neg()
    if not lazy and strides:
        exp_strides = tuple(s * a.itemsize for s in t.stride())
        assert a.strides == exp_strides, f"{path}: strides {a.strides} != {exp_strides} (torch {t.stride()})"
    got = np_bytes(a)
    exp = torch_bytes(t)
    if not np.array_equal(got, exp):
        bad = np.flatnonzero(got != exp) if got.shape == exp.shape else None
        raise AssertionError(
            f"{path}: values differ (dtype {a.dtype}, shape {a.shape}); "
            f"first differing byte offsets {None if bad is None else bad[:8].tolist()}; "
            f"got {got[:32].tolist()} expected {exp[:32].tolist()}")
    if pair:
        ctx.pairs.append((path, a, t))


def _cmp_float(a, b, path):
    assert type(a) is float, f"{path}: expected float, got {type(a)!r}"
    assert float_bits(a) == float_bits(b), f"{path}: {a!r} != {b!r}"


def _walk(a, b, path, ctx):
    torch = _torch_types()
    import torchfree

    if torch is not None:
        if isinstance(b, torch.Tensor):
            return _cmp_tensor(a, b, path, ctx)
        if isinstance(b, torch.Size):
            assert type(a) is tuple, f"{path}: torch.Size must come back as tuple, got {type(a)!r}"
            assert a == tuple(b), f"{path}: {a} != {tuple(b)}"
            return
        if isinstance(b, torch.device):
            assert type(a) is str, f"{path}: torch.device must come back as str, got {type(a)!r}"
            assert a == str(b), f"{path}: {a!r} != {str(b)!r}"
            return
        if isinstance(b, (torch.TypedStorage, torch.UntypedStorage)):
            # a bare storage: a 1-D array over its bytes (typed) or a torchfree.Storage
            dt = b.dtype if isinstance(b, torch.TypedStorage) else torch.uint8
            as_tensor = torch.empty(0, dtype=dt).set_(b)
            if isinstance(a, torchfree.Storage):
                assert bytes(memoryview(a)) == torch_bytes(as_tensor).tobytes(), f"{path}: storage bytes differ"
                return
            assert isinstance(a, np.ndarray) and a.ndim == 1, f"{path}: storage came back as {type(a)!r}"
            return _cmp_tensor(a, as_tensor, path, ctx)
        if isinstance(b, torch.dtype):
            name = str(b).replace("torch.", "")
            assert dtype_object_ok(a, name), \
                f"{path}: dtype object torch.{name} came back as {a!r}; expected one of {expected_dtype_object(name)}"
            return
    if isinstance(b, collections.OrderedDict):
        assert type(a) is collections.OrderedDict, f"{path}: expected OrderedDict, got {type(a)!r}"
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a.keys())} != {list(b.keys())}"
        for k in b:
            _walk(a[k], b[k], _join(path, k), ctx)
        if hasattr(b, "_metadata"):
            assert hasattr(a, "_metadata"), f"{path}: OrderedDict lost its _metadata attribute"
            _walk(a._metadata, b._metadata, _join(path, "_metadata"), ctx)
        return
    if type(b) is dict or type(b) is collections.Counter:
        assert type(a) is type(b), f"{path}: expected {type(b).__name__}, got {type(a)!r}"
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a.keys())} != {list(b.keys())}"
        for k in b:
            _walk(a[k], b[k], _join(path, k), ctx)
        return
    if type(b) in (list, tuple):
        assert type(a) is type(b), f"{path}: expected {type(b).__name__}, got {type(a)!r}"
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, _join(path, i), ctx)
        return
    if type(b) in (set, frozenset):
        assert type(a) is type(b), f"{path}: expected {type(b).__name__}, got {type(a)!r}"
        assert a == b, f"{path}: {a!r} != {b!r}"
        return
    if isinstance(b, np.ndarray):
        assert type(a) is np.ndarray, f"{path}: expected ndarray, got {type(a)!r}"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        if b.dtype.hasobject:
            assert a.tolist() == b.tolist(), f"{path}: object array values differ"
        else:
            assert np.array_equal(np_bytes(a), np_bytes(b)), f"{path}: ndarray values differ"
        return
    if isinstance(b, np.generic):
        assert type(a) is type(b), f"{path}: expected {type(b)!r}, got {type(a)!r}"
        assert a.tobytes() == b.tobytes(), f"{path}: {a!r} != {b!r}"
        return
    if type(b) is float:
        return _cmp_float(a, b, path)
    if type(b) is complex:
        assert type(a) is complex, f"{path}: expected complex, got {type(a)!r}"
        assert float_bits(a.real) == float_bits(b.real) and float_bits(a.imag) == float_bits(b.imag), \
            f"{path}: {a!r} != {b!r}"
        return
    if b is None or type(b) in (bool, int, str, bytes, bytearray, range, slice):
        assert type(a) is type(b), f"{path}: expected {type(b).__name__}, got {type(a)!r} ({a!r})"
        assert a == b, f"{path}: {a!r} != {b!r}"
        return
    if type(b) is argparse.Namespace:
        assert type(a) is argparse.Namespace, f"{path}: expected argparse.Namespace, got {type(a)!r}"
        _walk(vars(a), vars(b), path, ctx)
        return
    # Any other object: torchfree gives an inert Opaque placeholder (weights_only=False) or, with
    # safe_globals, an instance of the same class.
    if isinstance(a, torchfree.Opaque):
        assert a.module == type(b).__module__, f"{path}: Opaque.module {a.module!r} != {type(b).__module__!r}"
        assert a.name == type(b).__qualname__, f"{path}: Opaque.name {a.name!r} != {type(b).__qualname__!r}"
        return
    assert type(a) is type(b), f"{path}: expected {type(b)!r}, got {type(a)!r}"
    if isinstance(b, tuple):
        _walk(tuple(a), tuple(b), path, ctx)
    elif hasattr(b, "__dict__"):
        _walk(dict(vars(a)), dict(vars(b)), path, ctx)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def check_sharing(pairs):
    """Views of one torch storage must view one buffer in torchfree, and arrays of different
    storages must not share memory.

    Same storage: every array's storage base address (data pointer − storage_offset × itemsize) is
    identical (this also covers views that do not overlap, where ``np.shares_memory`` is False even
    though torch shares the storage). Different storages: ``np.shares_memory`` is False.
    Zero-size arrays, zero-byte storages and lazily conjugated/negated tensors (whose values are
    materialised) are not compared.
    """
    groups = collections.OrderedDict()
    for path, a, t in pairs:
        if t.is_conj() or t.is_neg():
            continue
        st = t.untyped_storage()
        if st.nbytes() == 0 or a.size == 0:
            continue
        groups.setdefault(st.data_ptr(), []).append((path, a, t))
    for members in groups.values():
        bases = {path: a.__array_interface__["data"][0] - t.storage_offset() * a.itemsize
                 for path, a, t in members}
        assert len(set(bases.values())) == 1, (
            "tensors sharing one torch storage do not view one torchfree buffer: "
            + ", ".join(f"{p}@{hex(b)}" for p, b in bases.items()))
    glist = list(groups.values())
    for i in range(len(glist)):
        for j in range(i + 1, len(glist)):
            for pa, a, _ in glist[i]:
                for pb, b, _ in glist[j]:
                    if np.may_share_memory(a, b):
                        assert not np.shares_memory(a, b), (
                            f"{pa} and {pb} come from different torch storages but share memory")


def assert_same(np_obj, torch_obj, path="", *, meta=False, sharing=True):
    """Compare a torchfree result with the torch.load result of the same checkpoint.

    Returns the list of (path, ndarray, tensor) pairs compared.
    """
    ctx = _Ctx(meta)
    _walk(np_obj, torch_obj, path, ctx)
    if sharing and not meta:
        check_sharing(ctx.pairs)
    return ctx.pairs


def count_tensors(obj):
    """Number of torch tensors in a nested torch.load result."""
    torch = sys.modules["torch"]
    n = 0
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            n += 1
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set)):
            stack.extend(x)
    return n
