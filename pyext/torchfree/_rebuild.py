"""Small rebuild helpers the C core calls for rare objects.

These are torchfree's own constructors (never anything named by a file): the
C core resolves a checkpoint's GLOBALs through its allowlist and calls these
only for numpy objects, argparse.Namespace, Opaque placeholders, MetaArray,
complex32 and conj/neg tensors.
"""

from __future__ import annotations

import sys

from ._np import np

from ._types import MetaArray, NestedArray, Opaque, QuantizedArray, SparseArray


# ---- Opaque --------------------------------------------------------------


def opaque_global(qualname: str) -> Opaque:
    module, _, name = qualname.rpartition(".")
    return Opaque(module, name)


def opaque_call(callee: Opaque, args: tuple, kwargs) -> Opaque:
    o = Opaque(callee.module, callee.name, args=args)
    if kwargs is not None and kwargs is not None and kwargs != {}:
        o.kwargs = dict(kwargs)
    return o


def opaque_build(obj: Opaque, state) -> None:
    obj.state = state


def opaque_setitem(obj: Opaque, key, value) -> None:
    obj.items[key] = value


def opaque_append(obj: Opaque, value) -> None:
    obj.list.append(value)


def subclass(type_, data, state, wrapper=False):
    """A tensor subclass: an Opaque naming the class, its data in .args[0]. For a wrapper
    subclass (``_rebuild_wrapper_subclass``: TwoTensor, DTensor, ...) .args[0] is a MetaArray of
    the outer shape and dtype, a placeholder with no data: the real tensors are in .state (its
    ``__tensor_flatten__`` attributes), and ``flatten`` / ``scan`` list only those."""
    if isinstance(type_, Opaque):
        o = Opaque(type_.module, type_.name, args=(data,), state=state)
        if wrapper:
            o.wrapper_subclass = True
        return o
    # a class the user trusted through safe_globals: keep the data, as numpy
    return data


# ---- tensors ---------------------------------------------------------------


def complex32_storage(storage) -> np.ndarray:
    """A complex32 storage (float16 pairs) as one complex64 array: exact, signed zeros kept."""
    pairs = np.frombuffer(storage, dtype=np.float16).reshape(-1, 2)
    out = np.empty(pairs.shape[0], dtype=np.complex64)
    out.real = pairs[:, 0]
    out.imag = pairs[:, 1]
    return out


def fix_values(arr: np.ndarray, conj: int, neg: int) -> None:
    """The lazy conj/neg bits of torch 2.x, applied in place to a private copy."""
    if conj:
        np.conjugate(arr, out=arr)
    if neg:
        np.negative(arr, out=arr)


# ---- quantized, sparse, nested, device tensors -------------------------------------


def _format(msg: str):
    from ._core import FormatError

    return FormatError(msg)


def _int(x, what):
    if isinstance(x, bool) or not isinstance(x, int):
        raise _unpickling(f"{what} is a {type(x).__name__}, not an int")
    return x


def qtensor(int_repr, dtype: str, shape: tuple, params):
    """_rebuild_qtensor: int_repr is the C core's validated view of the storage."""
    dtype = "torch." + dtype
    if not isinstance(params, tuple) or not params or not isinstance(params[0], str):
        raise _unpickling(f"quantizer parameters {_short(params)} do not start with a qscheme")
    qscheme = params[0]
    if isinstance(int_repr, MetaArray):
        return MetaArray(shape, dtype)
    if qscheme == "torch.per_tensor_affine":
        if len(params) != 3:
            raise _unpickling("per_tensor_affine parameters are not (qscheme, scale, zero_point)")
        scale, zp = params[1], params[2]
        if isinstance(scale, bool) or not isinstance(scale, (float, int)):
            raise _unpickling(f"quantizer scale is a {type(scale).__name__}, not a float")
        return QuantizedArray(int_repr, dtype, float(scale), _int(zp, "quantizer zero_point"), shape=shape)
    if qscheme in ("torch.per_channel_affine", "torch.per_channel_affine_float_qparams"):
        if len(params) != 4:
            raise _unpickling(f"{qscheme} parameters are not (qscheme, scales, zero_points, axis)")
        _, scales, zps, axis = params
        axis = _int(axis, "per-channel axis")
        if not 0 <= axis < len(shape):
            raise _format(f"per-channel axis {axis} out of range for size {shape}")
        if type(scales) is list and type(zps) is list:
            flt = qscheme == "torch.per_channel_affine_float_qparams"
            for v in scales + zps:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise _unpickling("per-channel scales / zero_points lists hold a non-number")
            scales = np.array(scales, dtype=np.float32 if flt else np.float64)
            zps = np.array(zps, dtype=np.float32 if flt else np.int64)
        elif not (isinstance(scales, np.ndarray) and isinstance(zps, np.ndarray)):
            raise _unpickling("per-channel scales / zero_points are not tensors or lists")
        if scales.ndim != 1 or zps.ndim != 1 or scales.shape[0] != shape[axis] or zps.shape[0] != shape[axis]:
            raise _format(f"per-channel scales / zero_points of shapes {scales.shape}, {zps.shape} do not match "
                          f"size[{axis}] = {shape[axis]}")
        if scales.dtype.kind not in "fiu" or zps.dtype.kind not in "fiu":
            raise _unpickling(f"per-channel scales / zero_points of dtypes {scales.dtype}, {zps.dtype}")
        return QuantizedArray(int_repr, dtype, scales, zps, axis, shape=shape)
    raise _unpickling(f"cannot rebuild a quantized tensor with qscheme {qscheme!r}")


def _short(x) -> str:
    r = repr(x)
    return r if len(r) < 60 else r[:57] + "..."


def _array(x, what):
    if not isinstance(x, np.ndarray):
        raise _unpickling(f"{what} is a {type(x).__name__}, not a tensor")
    return x


def _size(x, what="sparse tensor size"):
    if not isinstance(x, tuple) or not all(isinstance(s, int) and not isinstance(s, bool) for s in x):
        raise _unpickling(f"{what} {_short(x)} is not a tuple of ints")
    return x


def sparse(layout, data):
    """_rebuild_sparse_tensor(layout, data)."""
    if not isinstance(layout, str) or layout not in ("torch.sparse_coo", "torch.sparse_csr", "torch.sparse_csc",
                                                     "torch.sparse_bsr", "torch.sparse_bsc"):
        raise _unpickling(f"rebuilding a sparse tensor of layout {_short(layout)} is not supported")
    if not isinstance(data, tuple):
        raise _unpickling("sparse tensor data is not a tuple")
    if layout == "torch.sparse_coo":
        if len(data) == 3:
            (indices, values, size), coalesced = data, None
        elif len(data) == 4:
            indices, values, size, coalesced = data
            if coalesced is not None and not isinstance(coalesced, bool):
                raise _unpickling("sparse COO is_coalesced is not a bool")
        else:
            raise _unpickling(f"sparse COO data has {len(data)} items (expected 3 or 4)")
        return SparseArray(layout, _size(size), _array(values, "sparse values"), _array(indices, "sparse indices"),
                           is_coalesced=coalesced)
    if len(data) != 4:
        raise _unpickling(f"{layout} data has {len(data)} items (expected 4)")
    ci, pi, values, size = data
    return SparseArray(layout, _size(size), _array(values, "sparse values"),
                       compressed_indices=_array(ci, "compressed indices"), plain_indices=_array(pi, "plain indices"))


def sparse_csr(layout, data):
    """torch 1.x _rebuild_sparse_csr_tensor(layout, (crow, col, values, size))."""
    if layout != "torch.sparse_csr":
        raise _unpickling(f"_rebuild_sparse_csr_tensor with layout {_short(layout)}")
    return sparse(layout, data)


def nested(buffer, sizes, strides, offsets):
    """_rebuild_nested_tensor: the components as views of the 1-D buffer."""
    buffer = _array(buffer, "nested tensor buffer")
    sizes, strides, offsets = (_array(a, "nested tensor metadata") for a in (sizes, strides, offsets))
    if buffer.ndim != 1:
        raise _format(f"nested tensor buffer has {buffer.ndim} dims, not 1")
    if sizes.dtype != np.int64 or strides.dtype != np.int64 or offsets.dtype != np.int64 or sizes.ndim != 2 or \
            strides.shape != sizes.shape or offsets.shape != sizes.shape[:1]:
        raise _format("nested tensor sizes / strides / offsets are not int64 [n, ndim], [n, ndim], [n]")
    out = NestedArray()
    out.buffer = buffer
    item = buffer.itemsize
    for i in range(sizes.shape[0]):
        size, stride, off = [int(v) for v in sizes[i]], [int(v) for v in strides[i]], int(offsets[i])
        if min(size + stride + [off], default=0) < 0:
            raise _format(f"nested tensor component {i} has a negative size, stride or offset")
        if 0 not in size:
            end = off + sum((s - 1) * t for s, t in zip(size, stride))
            if end >= buffer.shape[0]:
                raise _format(f"nested tensor component {i} reaches past its buffer of {buffer.shape[0]} elements")
        else:
            off = 0
        base = buffer[off:] if buffer.shape[0] else buffer
        out.append(np.lib.stride_tricks.as_strided(base, shape=size, strides=[t * item for t in stride],
                                                   writeable=buffer.flags.writeable))
    return out


def device_tensor(data, dtype):
    """_rebuild_device_tensor_from_cpu_tensor / _from_numpy: the host values in dtype."""
    if isinstance(data, MetaArray):
        return MetaArray(data.shape, dtype)
    if not isinstance(data, np.ndarray):
        raise _unpickling(f"device tensor data is a {type(data).__name__}, not a tensor")
    return data if data.dtype == dtype else data.astype(dtype)


# ---- save: what torch's pickle of a quantized or sparse tensor holds ----------------------


class SaveGlobal:
    """A GLOBAL for save() to write (one object per name, so the memo names it once)."""

    __slots__ = ("module", "name")
    _made: dict = {}

    def __new__(cls, module, name):
        o = cls._made.get((module, name))
        if o is None:
            o = cls._made[(module, name)] = object.__new__(cls)
            o.module, o.name = module, name
        return o


class SaveCall:
    """func(*args) for save() to write as a REDUCE."""

    __slots__ = ("func", "args")

    def __init__(self, func, args: tuple):
        self.func, self.args = func, args


def _native(a: np.ndarray) -> np.ndarray:
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def save_parts(obj):
    """("q", int_repr, dtype name, shape, qparams) for a QuantizedArray, ("call", SaveCall) for a
    SparseArray: torch's own pickle of them (torch._tensor.Tensor._reduce_ex_internal)."""
    if isinstance(obj, QuantizedArray):
        if obj.axis is None:
            qparams = (SaveGlobal("torch", "per_tensor_affine"), float(obj.scale), int(obj.zero_point))
        else:
            # float qparams are written as per_channel_affine too (torch does): the zero points' dtype
            # tells them apart when loaded
            qparams = (SaveGlobal("torch", "per_channel_affine"), np.ascontiguousarray(obj.scale),
                       np.ascontiguousarray(obj.zero_point), int(obj.axis))
        return ("q", _native(obj.int_repr), obj.dtype.removeprefix("torch."), obj.shape, qparams)
    if isinstance(obj, SparseArray):
        layout = SaveCall(SaveGlobal("torch.serialization", "_get_layout"), (obj.layout,))
        size = SaveCall(SaveGlobal("torch", "Size"), (tuple(obj.shape),))
        if obj.layout == "torch.sparse_coo":
            data = (obj.indices, obj.values, size, obj.is_coalesced)
        else:
            data = (obj.compressed_indices, obj.plain_indices, obj.values, size)
        return ("call", SaveCall(SaveGlobal("torch._utils", "_rebuild_sparse_tensor"), (layout, data)))
    raise TypeError(f"cannot save a {type(obj).__name__}")


# ---- numpy objects, rebuilt inertly ------------------------------------------


class _NdarrayStub:
    __slots__ = ()


class _DtypeStub:
    __slots__ = ("base", "align")

    def __init__(self, base: str, align):
        self.base = base
        self.align = align


def np_reconstruct(cls, shape, typecode):
    return _NdarrayStub()


def np_dtype(*args):
    import re  # here: numpy objects in a pickle are rare, and re costs ~2.5 ms to import

    # what numpy pickles as a dtype's type string: a type code and a size ('f4', 'i8', 'b1', 'U12', 'V16')
    if not args or not isinstance(args[0], str) or not re.fullmatch(r"[a-zA-Z]{1,2}[0-9]{0,12}", args[0]):
        raise _unpickling(f"numpy.dtype{args[:1]!r}: expected a type string such as 'f4'")
    base = args[0]
    if base.startswith("O"):
        raise _unpickling("numpy object arrays are refused (they would need pickled Python objects)")
    try:
        dt = np.dtype(base)
    except Exception as e:  # noqa: BLE001 - any failure means the file is wrong
        raise _unpickling(f"numpy.dtype({base!r}) is not a dtype") from e
    if dt.itemsize == 0 or dt.hasobject:
        raise _unpickling(f"numpy.dtype({base!r}) has no fixed size")
    return _DtypeStub(base, args[1] if len(args) > 1 else False)


def _finish_dtype(d):
    if isinstance(d, _DtypeStub):
        return np.dtype(d.base)
    if isinstance(d, np.dtype):
        return d
    raise _unpickling(f"expected a numpy dtype, got {type(d).__name__}")


def np_scalar(dtype, data=None):
    dt = _finish_dtype(dtype)
    if dt.hasobject:
        raise _unpickling("numpy object scalars are refused")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dt.itemsize:
        raise _unpickling("numpy scalar bytes do not match its dtype")
    return np.frombuffer(bytes(data), dtype=dt)[0]


def namespace(*args):
    import argparse

    return argparse.Namespace()


def build(obj, state):
    """BUILD on an object one of our constructors made; NotImplemented if none."""
    if isinstance(obj, _DtypeStub):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 2:
            raise _unpickling("numpy dtype state is not a tuple")
        if state[2] is not None or (len(state) > 3 and state[3] is not None):
            raise _unpickling("structured numpy dtypes are not supported")
        dt = np.dtype(obj.base)
        order = state[1]
        if order in ("<", ">") and dt.itemsize > 1:
            dt = dt.newbyteorder(order)
        return dt
    if isinstance(obj, _NdarrayStub):
        if not isinstance(state, tuple) or len(state) != 5:
            raise _unpickling("numpy array state is not a 5-tuple")
        _version, shape, dtype, is_fortran, raw = state
        dt = _finish_dtype(dtype)
        if dt.hasobject or not isinstance(raw, (bytes, bytearray)):
            raise _unpickling("numpy object arrays are refused")
        if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise _unpickling("numpy array shape is invalid")
        n = 1
        for s in shape:
            n *= s
        if n * dt.itemsize != len(raw):
            raise _unpickling("numpy array bytes do not match its shape and dtype")
        arr = np.frombuffer(raw, dtype=dt).copy() if n else np.empty(0, dtype=dt)
        return arr.reshape(shape, order="F" if is_fortran else "C")
    ap = sys.modules.get("argparse")  # no Namespace exists unless argparse was imported

    if ap is not None and isinstance(obj, ap.Namespace):
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise _unpickling("argparse.Namespace state is not a dict of names")
        obj.__dict__.update(state)
        return obj
    return NotImplemented


def _unpickling(msg: str):
    from ._core import UnpicklingError

    return UnpicklingError(msg)


HELPERS = {
    "Opaque": Opaque,
    "opaque_global": opaque_global,
    "opaque_call": opaque_call,
    "opaque_build": opaque_build,
    "opaque_setitem": opaque_setitem,
    "opaque_append": opaque_append,
    "subclass": subclass,
    "MetaArray": MetaArray,
    "fix_values": fix_values,
    "complex32_storage": complex32_storage,
    "np_reconstruct": np_reconstruct,
    "np_dtype": np_dtype,
    "np_scalar": np_scalar,
    "namespace": namespace,
    "build": build,
    "qtensor": qtensor,
    "sparse": sparse,
    "sparse_csr": sparse_csr,
    "nested": nested,
    "device_tensor": device_tensor,
    "QuantizedArray": QuantizedArray,
    "SparseArray": SparseArray,
    "SaveGlobal": SaveGlobal,
    "SaveCall": SaveCall,
    "save_parts": save_parts,
}
