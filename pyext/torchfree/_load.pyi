import mmap as _mmap
import os
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, Protocol, type_check_only

from typing_extensions import Buffer, TypeAlias

from ._core import Storage
from ._source import Source as Source
from ._source import is_safetensors as is_safetensors
from ._source import load_safetensors as load_safetensors
from ._source import options as options
from ._source import safetensors_entries as safetensors_entries
from ._source import safetensors_input as safetensors_input
from ._source import safetensors_meta as safetensors_meta

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
