from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import IO, Any, Literal, TypedDict, overload, type_check_only

import torch
from typing_extensions import TypeAlias, Unpack

from ._files import _StrOrBytesPath
from ._load import _FileLike

__all__ = ["load", "save", "patched", "install", "uninstall"]

# torch.load's map_location
_MapLocation: TypeAlias = (
    str
    | bytes
    | torch.device
    | dict[str, str]
    | Callable[[torch.UntypedStorage, str], torch.UntypedStorage | None]
    | None
)

@type_check_only
class _PickleLoadArgs(TypedDict, total=False):
    encoding: str

def load(
    f: _FileLike,
    map_location: _MapLocation = None,
    pickle_module: Any = None,  # None, or what torchfree's unpickler stands in for (pickle)
    *,
    weights_only: bool | None = None,
    mmap: bool | None = None,
    **pickle_load_args: Unpack[_PickleLoadArgs],
) -> Any: ...
@overload
def save(
    obj: object,
    f: _StrOrBytesPath | IO[bytes],
    pickle_module: Any = ...,
    pickle_protocol: int = 2,
    _use_new_zipfile_serialization: bool = True,
    _disable_byteorder_record: bool = False,
    *,
    atomic: bool = True,
    fsync: bool = True,
    background: Literal[False] = False,
) -> None: ...
@overload
def save(
    obj: object,
    f: _StrOrBytesPath,
    pickle_module: Any = ...,
    pickle_protocol: int = 2,
    _use_new_zipfile_serialization: bool = True,
    _disable_byteorder_record: bool = False,
    *,
    atomic: bool = True,
    fsync: bool = True,
    background: Literal[True],
) -> Future[None]: ...
def install() -> None: ...
def uninstall() -> None: ...
def patched() -> AbstractContextManager[None]: ...
