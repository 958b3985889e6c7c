"""Result types that stand in for torch objects numpy has no word for."""

from __future__ import annotations

import numpy as np

__all__ = ["Opaque", "MetaArray"]


class Opaque:
    """An inert stand-in for an object of a class torchfree does not rebuild.

    Nothing of the class is imported or run: ``module`` and ``name`` say what
    the checkpoint named, ``args`` holds what it would have been called with,
    ``state`` what ``__setstate__`` would have received, and items or list
    entries the pickle set on it are kept in ``items`` / ``list``.
    """

    __slots__ = ("module", "name", "args", "kwargs", "state", "items", "list", "_is_global", "__dict__")

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
