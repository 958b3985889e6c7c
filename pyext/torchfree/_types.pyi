import builtins
from collections.abc import Iterable
from typing import Any, ClassVar, Literal, SupportsIndex

import numpy as np
import numpy.typing as npt
from typing_extensions import TypeAlias

__all__ = ["Opaque", "MetaArray", "QuantizedArray", "SparseArray", "NestedArray"]

_Array: TypeAlias = np.ndarray[Any, Any]
_QScheme: TypeAlias = Literal[
    "torch.per_tensor_affine", "torch.per_channel_affine", "torch.per_channel_affine_float_qparams"
]
_QDType: TypeAlias = Literal["torch.qint8", "torch.quint8", "torch.qint32", "torch.quint4x2", "torch.quint2x4"]
_Layout: TypeAlias = Literal[
    "torch.sparse_coo", "torch.sparse_csr", "torch.sparse_csc", "torch.sparse_bsr", "torch.sparse_bsc"
]

class Opaque:
    module: str
    name: str
    args: tuple[Any, ...] | None
    kwargs: dict[str, Any] | None
    state: Any
    items: dict[Any, Any]
    list: builtins.list[Any]
    wrapper_subclass: bool
    def __init__(self, module: str, name: str, args: tuple[Any, ...] | None = None, state: Any = None) -> None: ...
    @property
    def qualname(self) -> str: ...
    def __getitem__(self, key: Any) -> Any: ...

class MetaArray:
    shape: tuple[int, ...]
    dtype: np.dtype[Any] | str
    def __init__(self, shape: Iterable[SupportsIndex], dtype: np.dtype[Any] | str) -> None: ...
    @property
    def ndim(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

class QuantizedArray:
    int_repr: _Array
    dtype: _QDType
    shape: tuple[int, ...]
    qscheme: _QScheme
    scale: float | _Array  # per tensor: a float; per channel: an array along axis
    zero_point: int | _Array
    axis: int | None
    def __init__(
        self,
        int_repr: _Array,
        dtype: str,
        scale: npt.ArrayLike,
        zero_point: npt.ArrayLike,
        axis: int | None = None,
        *,
        shape: Iterable[SupportsIndex] | None = None,
        qscheme: str | None = None,
    ) -> None: ...
    @property
    def ndim(self) -> int: ...
    @property
    def size(self) -> int: ...
    def int_values(self) -> _Array: ...
    def dequantize(self) -> np.ndarray[Any, np.dtype[np.float32]]: ...

class SparseArray:
    layout: _Layout
    shape: tuple[int, ...]
    values: _Array
    is_coalesced: bool | None
    def __init__(
        self,
        layout: str,
        shape: Iterable[SupportsIndex],
        values: _Array,
        indices: _Array | None = None,
        *,
        compressed_indices: _Array | None = None,
        plain_indices: _Array | None = None,
        is_coalesced: bool | None = None,
    ) -> None: ...
    @property
    def indices(self) -> _Array: ...
    @property
    def compressed_indices(self) -> _Array: ...
    @property
    def plain_indices(self) -> _Array: ...
    @property
    def crow_indices(self) -> _Array: ...
    @property
    def col_indices(self) -> _Array: ...
    @property
    def ccol_indices(self) -> _Array: ...
    @property
    def row_indices(self) -> _Array: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...
    @property
    def ndim(self) -> int: ...
    @property
    def nnz(self) -> int: ...
    def todense(self) -> _Array: ...

class NestedArray(list[_Array]):
    buffer: _Array
