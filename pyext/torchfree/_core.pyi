"""The C core (src/). Only torchfree's own modules call most of it: see the public names in
torchfree/__init__.pyi."""

import pickle
from collections.abc import Callable, Sequence
from typing import IO, Any, Literal, TypeVar, final, overload

import numpy as np
from typing_extensions import Buffer, Self, TypeAlias, disjoint_base

from ._scan import QuantInfo
from ._types import MetaArray

_TupleT = TypeVar("_TupleT", bound=tuple[Any, ...])

# what torchfree._load.Source hands the core: a buffer (mode MAP or COPY), a file descriptor (FD)
# or (a seekable binary file object, its start offset) (PYFILE)
_Src: TypeAlias = Buffer | int | tuple[IO[bytes], int]
# a dtype object as load returns it: numpy's (ml_dtypes included), or "torch.<name>" where none exists
_DType: TypeAlias = np.dtype[Any] | str

DTYPE_NAMES: tuple[str, ...]
LIMITS: dict[str, int]

class CheckpointError(ValueError): ...
class FormatError(CheckpointError): ...
class LimitError(CheckpointError): ...
class UnpicklingError(CheckpointError, pickle.UnpicklingError): ...
class UnsafeGlobalError(UnpicklingError): ...

@final
class Storage:
    """The bytes of one storage record (the buffer protocol gives them)."""

    location: str
    @property
    def key(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def dtype(self) -> _DType: ...
    @property
    def is_meta(self) -> bool: ...
    def numpy(self) -> np.ndarray[tuple[int], np.dtype[np.uint8]]: ...
    # as typeshed declares them for C buffer types; Python < 3.12 has no such methods at runtime
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, buffer: memoryview, /) -> None: ...

@final
class TensorRef:
    @property
    def storage(self) -> Storage: ...
    @property
    def dtype(self) -> _DType: ...
    @property
    def torch_dtype(self) -> str: ...
    @property
    def itemsize(self) -> int: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def stride(self) -> tuple[int, ...]: ...
    @property
    def storage_offset(self) -> int: ...
    @property
    def conj(self) -> bool: ...
    @property
    def neg(self) -> bool: ...

@disjoint_base
class TensorInfoBase:
    def __new__(
        cls,
        name: str,
        dtype: _DType,
        shape: tuple[int, ...],
        strides: tuple[int, ...],
        stride: tuple[int, ...],
        storage_key: str | None,
        storage_offset: int,
        nbytes: int,
        location: str,
        torch_dtype: str,
        conj: bool = False,
        neg: bool = False,
        layout: str = "torch.strided",
        quant: QuantInfo | None = None,
        nnz: int | None = None,
        parts: tuple[TensorInfoBase, ...] = (),
    ) -> Self: ...
    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> _DType: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def strides(self) -> tuple[int, ...]: ...
    @property
    def stride(self) -> tuple[int, ...]: ...
    @property
    def storage_key(self) -> str | None: ...
    @property
    def storage_offset(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def location(self) -> str: ...
    @property
    def torch_dtype(self) -> str: ...
    @property
    def conj(self) -> bool: ...
    @property
    def neg(self) -> bool: ...
    @property
    def layout(self) -> str: ...
    @property
    def quant(self) -> QuantInfo | None: ...
    @property
    def nnz(self) -> int | None: ...
    @property
    def parts(self) -> tuple[TensorInfoBase, ...]: ...
    @property
    def numel(self) -> int: ...

@final
class Archive:
    def __new__(
        cls,
        src: _Src,
        size: int,
        *,
        mode: int,
        require_map: bool,
        map_location: Any,
        weights_only: bool,
        safe_globals: dict[str, Any] | None,
        encoding: str | None,
        limits: tuple[int, ...] | None,
        torch: dict[str, Any] | None = None,
        drop_pages: bool = False,
    ) -> Self: ...
    @property
    def byteorder(self) -> Literal["little", "big"]: ...
    @property
    def prefix(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    @property
    def torchscript(self) -> bool: ...
    def unpickle(self, lazy: bool = True, collect_globals: bool = False) -> Any: ...
    def materialize(self, ref: TensorRef, /) -> np.ndarray[Any, Any] | MetaArray: ...
    def read_storage(self, storage: Storage, /) -> Storage: ...
    def records(self) -> list[tuple[str, int, int, int, int]]: ...
    def record_table(self) -> bytes: ...
    def storages(self) -> list[Storage]: ...
    def globals(self) -> list[str]: ...
    def close(self) -> None: ...

def _set_helpers(helpers: dict[str, Any], descrs: dict[str, np.dtype[Any]], /) -> None: ...
def map_location(m: Any, /) -> Any: ...
def map_target(m: Any, saved: str, /) -> str | None: ...
def crc32(data: Buffer, value: int = 0, /, *, fold: int = 2) -> int: ...
def crc32_folds() -> int: ...
def info_table(tensors: Sequence[TensorInfoBase], /) -> str | None: ...
def storage_over(buffer: Buffer, dtype_id: int, location: str | None = None, /) -> Storage: ...
def storage_at(owner: object, address: int, nbytes: int, dtype_id: int, /) -> Storage: ...
def pickle_globals(data: Buffer, /, *, limits: dict[str, int] | tuple[int, ...] | None = None) -> list[str]: ...
def record_infos(packed: Buffer, type: type[_TupleT], /) -> list[_TupleT]: ...
def storage_infos(storages: list[Storage], record_prefix: str, type: type[_TupleT], /) -> list[_TupleT]: ...
def save(
    obj: object, target: int | IO[bytes], archive_name: str, legacy: bool, *, crc_thread: int = -1, sync: bool = False
) -> None: ...
def walk(
    obj: object,
    mode: int,
    sep: str,
    children: Callable[[Any], list[tuple[str, Any]] | None],
    refs: bool = False,
    info_type: type[TensorInfoBase] | None = None,
    other: Callable[[str, Any], TensorInfoBase] | None = None,
    max_depth: int = 10000,
    target: str = ...,
) -> Any: ...
def load_zip(
    src: _Src,
    size: int,
    *,
    mode: int,
    require_map: bool,
    map_location: Any,
    weights_only: bool,
    safe_globals: dict[str, Any] | None,
    encoding: str | None,
    limits: tuple[int, ...] | None,
    torch: dict[str, Any] | None = None,
    drop_pages: bool = False,
    default_byteorder: Literal["little", "big", "native"] | None = None,
) -> Any: ...
@overload
def load_legacy(
    src: _Src,
    size: int,
    *,
    mode: int,
    require_map: bool,
    map_location: Any,
    weights_only: bool,
    safe_globals: dict[str, Any] | None,
    encoding: str | None,
    limits: tuple[int, ...] | None,
    torch: dict[str, Any] | None = None,
    drop_pages: bool = False,
    lazy: bool = False,
    collect_globals: Literal[False] = False,
    with_end: Literal[False] = False,
) -> Any: ...
@overload
def load_legacy(
    src: _Src,
    size: int,
    *,
    mode: int,
    require_map: bool,
    map_location: Any,
    weights_only: bool,
    safe_globals: dict[str, Any] | None,
    encoding: str | None,
    limits: tuple[int, ...] | None,
    torch: dict[str, Any] | None = None,
    drop_pages: bool = False,
    lazy: bool = False,
    collect_globals: Literal[False] = False,
    with_end: Literal[True],
) -> tuple[Any, int]: ...
@overload
def load_legacy(
    src: _Src,
    size: int,
    *,
    mode: int,
    require_map: bool,
    map_location: Any,
    weights_only: bool,
    safe_globals: dict[str, Any] | None,
    encoding: str | None,
    limits: tuple[int, ...] | None,
    torch: dict[str, Any] | None = None,
    drop_pages: bool = False,
    lazy: bool = False,
    collect_globals: Literal[True],
) -> tuple[Any, list[Storage], list[str], Literal["legacy", "tar"]]: ...
