import collections
import mmap as _mmap
import os
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, Literal, Protocol, type_check_only

from typing_extensions import Buffer, TypeAlias

from ._core import Storage, _Src
from .safetensors import _Entry

# The argument types of load / scan / open, shared by their stubs.

_Path: TypeAlias = str | os.PathLike[str]
_Data: TypeAlias = bytes | bytearray | memoryview | _mmap.mmap | IO[bytes]  # read from its position
_FileLike: TypeAlias = _Path | _Data

@type_check_only
class _Device(Protocol):
    """What map_location takes for a torch.device (without naming torch): str() of it is the tag."""

    @property
    def type(self) -> str: ...
    @property
    def index(self) -> int | None: ...

# a dict maps saved tags to targets: tags, or what str() makes one of (a torch.device)
_MapLocation: TypeAlias = (
    str | bytes | _Device | dict[str, Any] | Callable[[Storage, str], Storage | Buffer | None] | None
)
_Trusted: TypeAlias = Callable[..., Any]
_SafeGlobals: TypeAlias = dict[str, _Trusted] | Iterable[_Trusted | tuple[_Trusted, str]]
_Limits: TypeAlias = Mapping[str, int]

def load(
    f: _FileLike,
    map_location: _MapLocation = None,
    *,
    mmap: bool | None = None,
    weights_only: bool = True,
    safe_globals: _SafeGlobals | None = None,
    encoding: str = "utf-8",
    limits: _Limits | None = None,
) -> Any: ...
def is_safetensors(head: bytes, size: int) -> bool: ...
def safetensors_input(f: object) -> tuple[Literal["path"], str] | tuple[Literal["buffer"], Buffer] | None: ...
def safetensors_meta(map_location: _MapLocation) -> bool: ...
def safetensors_entries(buf: Buffer) -> tuple[list[_Entry], int]: ...
def load_safetensors(
    kind: Literal["path", "buffer"], src: str | Buffer, map_location: _MapLocation = None, mmap: bool | None = None
) -> collections.OrderedDict[str, Any]: ...
def options(
    map_location: _MapLocation = None,
    weights_only: bool = True,
    safe_globals: _SafeGlobals | None = None,
    encoding: str = "utf-8",
    limits: _Limits | None = None,
) -> dict[str, Any]: ...

class Source:
    path: str | None
    format: Literal["zip", "legacy"]
    drop_pages: bool
    src: _Src | None
    size: int
    mode: int
    require_map: bool
    def __init__(self, f: _FileLike, mmap: bool | None = None, *, lazy: bool = False, shared: bool = False) -> None: ...
    def args(self) -> tuple[_Src, int]: ...
    def kwargs(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
    def __del__(self) -> None: ...
