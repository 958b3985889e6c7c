"""Result types that stand in for torch objects numpy has no word for."""

from __future__ import annotations

import math

from ._np import np

__all__ = ["Opaque", "MetaArray", "QuantizedArray", "SparseArray", "NestedArray"]


class Opaque:
    """An inert stand-in for an object of a class torchfree does not rebuild.

    Nothing of the class is imported or run: ``module`` and ``name`` say what
    the checkpoint named, ``args`` holds what it would have been called with,
    ``state`` what ``__setstate__`` would have received, and items or list
    entries the pickle set on it are kept in ``items`` / ``list``. ``wrapper_subclass`` is True
    for a wrapper tensor subclass (``_rebuild_wrapper_subclass``: TwoTensor, DTensor, ...), whose
    ``args[0]`` is a ``MetaArray`` placeholder (the outer shape and dtype; no data) and whose
    tensors are in ``state``.
    """

    __slots__ = ("module", "name", "args", "kwargs", "state", "items", "list", "_is_global", "__dict__")
    wrapper_subclass = False  # set on the instance when it is one

    def __init__(self, module: str, name: str, args=None, state=None):
        self.module = module
        self.name = name
        self.args = args
        self.kwargs = None
        self.state = state
        self.items = {}
        self.list = []
        self._is_global = args is None

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __getitem__(self, key):
        return self.items[key]

    def __repr__(self) -> str:
        if self._is_global:
            return f"<torchfree.Opaque global {self.qualname}>"
        return f"<torchfree.Opaque {self.qualname} args={self.args!r} state={_short(self.state)}>"


def _short(x) -> str:
    r = repr(x)
    return r if len(r) < 80 else r[:77] + "..."


class MetaArray:
    """A tensor without data (meta device, or a storage mapped to ``"meta"``)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize if isinstance(self.dtype, np.dtype) else 0

    def __eq__(self, other):
        return isinstance(other, MetaArray) and self.shape == other.shape and self.dtype == other.dtype

    __hash__ = None

    def __repr__(self) -> str:
        return f"MetaArray(shape={self.shape}, dtype={self.dtype})"


# ---- quantized ---------------------------------------------------------------

_QDTYPES = {  # numpy dtype names: no numpy import at torchfree's own
    "torch.qint8": ("int8", 8),
    "torch.quint8": ("uint8", 8),
    "torch.qint32": ("int32", 32),
    "torch.quint4x2": ("uint8", 4),
    "torch.quint2x4": ("uint8", 2),
}
_QSCHEMES = ("torch.per_tensor_affine", "torch.per_channel_affine", "torch.per_channel_affine_float_qparams")


class QuantizedArray:
    """A quantized tensor: its integers, the quantizer and ``dequantize()``.

    ``int_repr`` is what torch's ``int_repr()`` gives: an int8 / uint8 / int32 array of the
    tensor's shape (a view of the checkpoint's storage, with the tensor's strides), and for
    the packed sub-byte dtypes ``torch.quint4x2`` / ``torch.quint2x4`` the 1-D uint8 array of
    the packed bytes (2 or 4 values a byte, first value in the low bits), as torch returns it;
    ``int_values()`` unpacks them to the tensor's shape. ``qscheme`` is
    ``"torch.per_tensor_affine"``, ``"torch.per_channel_affine"`` or
    ``"torch.per_channel_affine_float_qparams"``; ``scale`` / ``zero_point`` are a float and
    an int (per tensor), or arrays along ``axis`` (per channel: float64 / int64, or float32 /
    float32 for float qparams); ``axis`` is None per tensor. ``dtype`` is torch's name, such as
    ``"torch.qint8"``.
    """

    __slots__ = ("int_repr", "dtype", "shape", "qscheme", "scale", "zero_point", "axis")

    def __init__(self, int_repr, dtype, scale, zero_point, axis=None, *, shape=None, qscheme=None):
        dtype = dtype if str(dtype).startswith("torch.") else f"torch.{dtype}"
        if dtype not in _QDTYPES:
            raise ValueError(f"not a quantized dtype: {dtype!r} (one of {sorted(_QDTYPES)})")
        np_type, bits = _QDTYPES[dtype]
        if not isinstance(int_repr, np.ndarray) or int_repr.dtype != np_type:
            raise TypeError(f"int_repr of a {dtype} tensor must be a {np.dtype(np_type)} ndarray")
        if bits >= 8:
            if shape is not None and tuple(shape) != int_repr.shape:
                raise ValueError(f"shape {tuple(shape)} differs from int_repr's {int_repr.shape}")
            shape = int_repr.shape
        else:
            if shape is None:
                raise ValueError(f"a {dtype} tensor needs its shape (int_repr holds packed bytes)")
            shape = tuple(int(s) for s in shape)
            if any(s < 0 for s in shape):
                raise ValueError(f"negative size in {shape}")
            per = 8 // bits
            if int_repr.shape != (-(-math.prod(shape) // per),):
                raise ValueError(f"int_repr of a {dtype} tensor of shape {shape} must hold "
                                 f"{-(-math.prod(shape) // per)} packed bytes, not {int_repr.shape}")
        self.int_repr = int_repr
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        if axis is None:
            if qscheme not in (None, "torch.per_tensor_affine"):
                raise ValueError(f"qscheme {qscheme!r} needs an axis")
            if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (float, int, np.floating, np.integer)):
                raise TypeError("per-tensor scale must be a number")
            if isinstance(zero_point, (bool, np.bool_)) or not isinstance(zero_point, (int, np.integer)):
                raise TypeError("per-tensor zero_point must be an int")
            self.qscheme = "torch.per_tensor_affine"
            self.scale = float(scale)
            self.zero_point = int(zero_point)
            self.axis = None
            return
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not 0 <= axis < len(self.shape):
            raise ValueError(f"per-channel axis {axis!r} out of range for shape {self.shape}")
        scale = np.asarray(scale)
        zero_point = np.asarray(zero_point)
        n = self.shape[axis]
        if scale.shape != (n,) or zero_point.shape != (n,):
            raise ValueError(f"per-channel scales and zero_points must have shape ({n},), "
                             f"got {scale.shape} and {zero_point.shape}")
        if not (np.issubdtype(scale.dtype, np.floating) or np.issubdtype(scale.dtype, np.integer)):
            raise TypeError(f"per-channel scales of dtype {scale.dtype}")
        if np.issubdtype(zero_point.dtype, np.floating):
            self.qscheme = "torch.per_channel_affine_float_qparams"
            scale = scale.astype(np.float32, copy=False)
            zero_point = zero_point.astype(np.float32, copy=False)
        elif np.issubdtype(zero_point.dtype, np.integer):
            self.qscheme = "torch.per_channel_affine"
            scale = scale.astype(np.float64, copy=False)
            zero_point = zero_point.astype(np.int64, copy=False)
        else:
            raise TypeError(f"per-channel zero_points of dtype {zero_point.dtype}")
        if qscheme is not None and qscheme != self.qscheme:
            raise ValueError(f"qscheme {qscheme!r} does not match zero_points of dtype {zero_point.dtype}")
        self.scale = scale
        self.zero_point = zero_point
        self.axis = int(axis)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def int_values(self) -> np.ndarray:
        """The integers in the tensor's shape (unpacked for quint4x2 / quint2x4)."""
        _, bits = _QDTYPES[self.dtype]
        if bits >= 8:
            return self.int_repr
        per = 8 // bits
        i = np.arange(self.size)
        vals = (self.int_repr[i // per] >> ((i % per) * bits).astype(np.uint8)) & np.uint8((1 << bits) - 1)
        return vals.astype(np.uint8).reshape(self.shape)

    def dequantize(self) -> np.ndarray:
        """float32 values, computed as torch's CPU kernels do (bit for bit)."""
        f = np.asarray(self.int_values(), dtype=np.float32)
        if self.axis is None:
            return _c((f - np.float32(self.zero_point)) * np.float32(self.scale))
        bshape = [1] * len(self.shape)
        bshape[self.axis] = -1
        zp = self.zero_point.reshape(bshape)
        sc = self.scale.reshape(bshape)
        if self.qscheme == "torch.per_channel_affine_float_qparams":
            return _c((f - zp) * sc)
        # float subtraction, double product, rounded to float
        return _c(((f - zp.astype(np.float32)).astype(np.float64) * sc).astype(np.float32))

    def __repr__(self) -> str:
        if self.axis is None:
            q = f"scale={self.scale!r}, zero_point={self.zero_point}"
        else:
            q = f"axis={self.axis}, scale={_short(self.scale)}, zero_point={_short(self.zero_point)}"
        return f"QuantizedArray(shape={self.shape}, dtype={self.dtype}, qscheme={self.qscheme}, {q})"


def _c(a) -> np.ndarray:
    """C-contiguous (0-d stays 0-d), as torch's dequantize() output."""
    return np.array(a, order="C", copy=None)


# ---- sparse ------------------------------------------------------------------

_SPARSE_NAMES = {
    "torch.sparse_coo": None,
    "torch.sparse_csr": ("crow_indices", "col_indices"),
    "torch.sparse_csc": ("ccol_indices", "row_indices"),
    "torch.sparse_bsr": ("crow_indices", "col_indices"),
    "torch.sparse_bsc": ("ccol_indices", "row_indices"),
}


def _format_error(msg):
    from ._core import FormatError

    return FormatError(msg)


class SparseArray:
    """A sparse tensor: ``layout``, its index arrays, ``values`` and ``todense()``.

    COO (``layout == "torch.sparse_coo"``): ``indices`` (int64, ``[sparse_dim, nnz]``),
    ``values`` (``[nnz, *dense_shape]``) and ``is_coalesced`` (None when the file does not
    say). Compressed layouts (``"torch.sparse_csr"``, ``"torch.sparse_csc"``,
    ``"torch.sparse_bsr"``, ``"torch.sparse_bsc"``): ``compressed_indices`` and
    ``plain_indices``, also under torch's names (``crow_indices`` / ``col_indices`` for
    CSR and BSR, ``ccol_indices`` / ``row_indices`` for CSC and BSC), and ``values``
    (``[*batch, nnz, *dense]``, with the block shape after nnz for BSR / BSC).

    The constructor checks every index against the shape (a ``FormatError`` otherwise), so a
    ``SparseArray`` always densifies safely. ``todense()`` equals torch's ``to_dense()``:
    duplicate COO entries are summed.
    """

    __slots__ = ("layout", "shape", "values", "is_coalesced", "_idx")

    def __init__(self, layout, shape, values, indices=None, *, compressed_indices=None, plain_indices=None,
                 is_coalesced=None):
        if layout not in _SPARSE_NAMES:
            raise _format_error(f"unknown sparse layout {layout!r}")
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise _format_error(f"sparse tensor size {shape!r} is not a tuple of ints") from None
        if any(s < 0 for s in shape):
            raise _format_error(f"sparse tensor size {shape} has a negative size")
        if not isinstance(values, np.ndarray):
            raise _format_error(f"sparse tensor values are a {type(values).__name__}, not an array")
        self.layout = layout
        self.shape = shape
        self.values = values
        self.is_coalesced = None if is_coalesced is None else bool(is_coalesced)
        if layout == "torch.sparse_coo":
            if not isinstance(indices, np.ndarray) or indices.ndim != 2 or indices.dtype != np.int64:
                raise _format_error("sparse COO indices must be a 2-D int64 array")
            sdim, nnz = indices.shape
            if sdim > len(shape) or values.ndim != 1 + len(shape) - sdim or values.shape[0] != nnz or \
                    values.shape[1:] != shape[sdim:]:
                raise _format_error(f"sparse COO values of shape {values.shape} and indices of shape "
                                    f"{indices.shape} do not fit size {shape}")
            if nnz and (sdim == 0 and nnz > 1):
                raise _format_error("sparse COO tensor with no sparse dims holds more than one value")
            if nnz and sdim and ((indices < 0).any() or (indices >= np.array(shape[:sdim])[:, None]).any()):
                raise _format_error(f"sparse COO index out of range for size {shape}")
            self._idx = (indices,)
            return
        ci, pi = compressed_indices, plain_indices
        if not isinstance(ci, np.ndarray) or not isinstance(pi, np.ndarray) or ci.dtype != pi.dtype or \
                ci.dtype not in (np.int32, np.int64) or ci.ndim < 1 or pi.ndim != ci.ndim:
            raise _format_error(f"{layout} indices must be int32 or int64 arrays of one dtype and rank")
        nbatch = ci.ndim - 1
        block = layout in ("torch.sparse_bsr", "torch.sparse_bsc")
        nnz = pi.shape[-1]
        if len(shape) < nbatch + 2 or ci.shape[:-1] != shape[:nbatch] or pi.shape[:-1] != shape[:nbatch]:
            raise _format_error(f"{layout} indices of shapes {ci.shape}, {pi.shape} do not fit size {shape}")
        bs = values.shape[nbatch + 1:nbatch + 3] if block else (1, 1)
        dense = shape[nbatch + 2:]
        if values.shape[:nbatch + 1] != shape[:nbatch] + (nnz,) or len(bs) != 2 or \
                values.shape[nbatch + 1 + (2 if block else 0):] != dense:
            raise _format_error(f"{layout} values of shape {values.shape} do not fit size {shape}")
        rows, cols = shape[nbatch], shape[nbatch + 1]
        if bs[0] == 0 or bs[1] == 0 or rows % bs[0] or cols % bs[1]:
            raise _format_error(f"{layout} block shape {bs} does not divide size {shape}")
        ncomp, nplain = (rows // bs[0], cols // bs[1])
        if layout in ("torch.sparse_csc", "torch.sparse_bsc"):
            ncomp, nplain = nplain, ncomp
        if ci.shape[-1] != ncomp + 1:
            raise _format_error(f"{layout} compressed indices have {ci.shape[-1]} entries, expected {ncomp + 1}")
        if (ci[..., 0] != 0).any() or (ci[..., -1] != nnz).any() or (np.diff(ci, axis=-1) < 0).any():
            raise _format_error(f"{layout} compressed indices are not 0 ... nnz ({nnz}) nondecreasing")
        if nnz and ((pi < 0).any() or (pi >= nplain).any()):
            raise _format_error(f"{layout} plain index out of range for size {shape}")
        self._idx = (ci, pi)

    def _need(self, compressed, name):
        if (self.layout == "torch.sparse_coo") == compressed:
            raise AttributeError(f"a {self.layout} SparseArray has no {name}")

    @property
    def indices(self) -> np.ndarray:
        self._need(False, "indices")
        return self._idx[0]

    @property
    def compressed_indices(self) -> np.ndarray:
        self._need(True, "compressed_indices")
        return self._idx[0]

    @property
    def plain_indices(self) -> np.ndarray:
        self._need(True, "plain_indices")
        return self._idx[1]

    def _named(self, which, name):
        names = _SPARSE_NAMES[self.layout]
        if names is None or names[which] != name:
            raise AttributeError(f"a {self.layout} SparseArray has no {name}")
        return self._idx[which]

    crow_indices = property(lambda self: self._named(0, "crow_indices"))
    col_indices = property(lambda self: self._named(1, "col_indices"))
    ccol_indices = property(lambda self: self._named(0, "ccol_indices"))
    row_indices = property(lambda self: self._named(1, "row_indices"))

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nnz(self) -> int:
        if self.layout == "torch.sparse_coo":
            return self._idx[0].shape[1]
        return self._idx[1].shape[-1]

    def todense(self) -> np.ndarray:
        """The dense array, equal to torch's ``to_dense()`` (duplicates summed)."""
        out = np.zeros(self.shape, dtype=self.values.dtype)
        if self.layout == "torch.sparse_coo":
            idx = self._idx[0]
            if idx.shape[0] == 0:
                if idx.shape[1]:
                    out[...] = self.values.sum(axis=0, dtype=out.dtype)
            elif idx.shape[1]:
                if out.dtype == np.bool_:
                    out[tuple(idx)] = False
                    np.logical_or.at(out, tuple(idx), self.values)
                else:
                    np.add.at(out, tuple(idx), self.values)
            return out
        ci, pi = self._idx
        nbatch = ci.ndim - 1
        block = self.layout in ("torch.sparse_bsr", "torch.sparse_bsc")
        by_col = self.layout in ("torch.sparse_csc", "torch.sparse_bsc")
        for b in np.ndindex(*self.shape[:nbatch]):
            c, p, v = ci[b], pi[b], self.values[b]
            comp = np.repeat(np.arange(c.shape[0] - 1), np.diff(c).astype(np.intp))
            r, k = (p, comp) if by_col else (comp, p)
            o = out[b]
            if block:
                bh, bw = v.shape[1:3]
                ob = o.reshape((o.shape[0] // bh, bh, o.shape[1] // bw, bw) + o.shape[2:])
                ob = np.moveaxis(ob, 2, 1)  # [rows/bh, cols/bw, bh, bw, *dense], a view
                np.add.at(ob, (r, k), v)
            else:
                np.add.at(o, (r, k), v)
        return out

    def __repr__(self) -> str:
        return f"SparseArray(layout={self.layout}, shape={self.shape}, nnz={self.nnz}, dtype={self.dtype})"


class NestedArray(list):
    """A strided nested tensor: the list of its components (views of one buffer), as
    torch's ``unbind()`` gives them; ``buffer`` is the 1-D array they view."""

    __slots__ = ("buffer",)

    def __repr__(self) -> str:
        return f"NestedArray({list.__repr__(self)})"
