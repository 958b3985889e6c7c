import mmap
import os
from collections.abc import Callable
from typing import BinaryIO

from typing_extensions import TypeAlias

__all__ = ["atomic_write", "write_through_file", "note_mapping", "is_mapped", "open_rewrite", "check_file_object",
           "check_parent"]

_StrOrBytesPath: TypeAlias = str | bytes | os.PathLike[str] | os.PathLike[bytes]

def note_mapping(mapping: mmap.mmap, st: os.stat_result) -> None: ...
def is_mapped(st: os.stat_result) -> bool: ...
def open_rewrite(path: _StrOrBytesPath) -> int | None: ...
def check_file_object(f: object) -> None: ...
def check_parent(path: str) -> None: ...
def atomic_write(
    path: _StrOrBytesPath,
    write: Callable[[int], object],
    *,
    sync: bool = True,
    mapped: bool = False,
    in_place_hint: str = "",
) -> None: ...
def write_through_file(write: Callable[[BinaryIO], object]) -> Callable[[int], None]: ...
