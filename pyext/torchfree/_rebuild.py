"""Small rebuild helpers the C core calls for rare objects.

These are torchfree's own constructors (never anything named by a file): the
C core resolves a checkpoint's GLOBALs through its allowlist and calls these
only for numpy objects, argparse.Namespace, Opaque placeholders, MetaArray,
complex32 and conj/neg tensors.
"""

from __future__ import annotations

import argparse
import re

import numpy as np

from ._types import MetaArray, Opaque


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


def subclass(type_, data, state):
    """A tensor subclass: an Opaque naming the class, its data in .args[0]."""
    if isinstance(type_, Opaque):
        return Opaque(type_.module, type_.name, args=(data,), state=state)
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


# what numpy pickles as a dtype's type string: a type code and a size ('f4', 'i8', 'b1', 'U12', 'V16')
_DTYPE_STR = re.compile(r"[a-zA-Z]{1,2}[0-9]{0,12}\Z")


def np_dtype(*args):
    if not args or not isinstance(args[0], str) or not _DTYPE_STR.match(args[0]):
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
    if isinstance(obj, argparse.Namespace):
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise _unpickling("argparse.Namespace state is not a dict of names")
        obj.__dict__.update(state)
        return obj
    return NotImplemented


def _unpickling(msg: str):
    from . import UnpicklingError

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
}
