import collections
from collections.abc import Callable
from typing import Any, Literal

from typing_extensions import Buffer

from ._core import _Src
from ._load import _FileLike, _Limits, _MapLocation, _SafeGlobals
from .safetensors import _Entry

__all__ = ["Source", "is_index_json", "is_safetensors", "load_file", "load_safetensors",
           "options", "run_load", "safetensors_entries", "safetensors_input", "safetensors_meta"]

def run_load(
    f: _FileLike,
    mmap: bool | None,
    opts: dict[str, Any],
    *,
    shared: bool = False,
    zip_byteorder: Callable[[], Literal["little", "big", "native"] | None] | None = None,
    legacy_end: Callable[[int], object] | None = None,
) -> Any: ...
def load_file(f: _FileLike, map_location: _MapLocation, mmap: bool | None, opts: dict[str, Any]) -> Any: ...
def is_index_json(f: object) -> bool: ...
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
