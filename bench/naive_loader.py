"""A naive torch-free loader: ``zipfile`` + ``pickle`` + ``numpy.frombuffer``, for the benchmark.

What someone writes in an afternoon instead of a library: read ``data.pkl`` with a restricted
``pickle.Unpickler`` whose ``find_class`` maps torch's rebuild functions and storage classes to
small Python stand-ins, read each storage record with ``ZipFile.read`` (a copy) and view it with
``numpy.frombuffer`` + ``as_strided``. Zip checkpoints only; plain tensors only.
"""

from __future__ import annotations

import collections
import pickle
import zipfile

import numpy as np

try:
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": _BF16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    buf, dtype = storage
    it = dtype.itemsize
    base = np.frombuffer(buf, dtype=dtype)
    if not size:
        return base[storage_offset:storage_offset + 1].reshape(())
    return np.lib.stride_tricks.as_strided(base[storage_offset:], tuple(size), tuple(s * it for s in stride))


def _rebuild_parameter(data, requires_grad, hooks, *rest):
    return data


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "bfloat16"): None,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, fp, zf, prefix):
        super().__init__(fp)
        self.zf, self.prefix = zf, prefix
        self.cache = {}

    def find_class(self, module, name):
        if module == "torch" and name in _DTYPES:
            return _StorageType(_DTYPES[name])
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} refused") from None

    def persistent_load(self, pid):
        _, stype, key, _location, numel = pid
        got = self.cache.get(key)
        if got is None:
            buf = self.zf.read(f"{self.prefix}/data/{key}")
            got = self.cache[key] = (buf, stype.dtype)
        return got


def _prefix(zf):
    name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
    return name[: -len("/data.pkl")]


def load(path):
    """The whole object, every tensor a numpy array over a copy of its storage record."""
    with zipfile.ZipFile(path) as zf:
        prefix = _prefix(zf)
        with zf.open(prefix + "/data.pkl") as fp:
            return _Unpickler(fp, zf, prefix).load()


class _Meta:
    __slots__ = ("key", "dtype", "offset", "shape", "stride")

    def __init__(self, key, dtype, offset, shape, stride):
        self.key, self.dtype, self.offset, self.shape, self.stride = key, dtype, offset, shape, stride


class _MetaUnpickler(_Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda st, off, size, stride, *rest: _Meta(st[0], st[1], off, tuple(size), tuple(stride))
        return super().find_class(module, name)

    def persistent_load(self, pid):
        return (pid[2], pid[1].dtype)


def scan(path):
    """{dotted name: _Meta} without reading any tensor bytes."""
    with zipfile.ZipFile(path) as zf:
        prefix = _prefix(zf)
        with zf.open(prefix + "/data.pkl") as fp:
            obj = _MetaUnpickler(fp, zf, prefix).load()
    out = {}

    def walk(o, name):
        if isinstance(o, _Meta):
            out[name] = o
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(obj, "")
    return out, prefix


def open_one(path, name):
    """One tensor: the pickle without data, then that tensor's storage record only."""
    metas, prefix = scan(path)
    m = metas[name]
    with zipfile.ZipFile(path) as zf:
        buf = zf.read(f"{prefix}/data/{m.key}")
    return _rebuild_tensor_v2((buf, m.dtype), m.offset, m.shape, m.stride)
