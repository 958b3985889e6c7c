from typing import Literal, Protocol, type_check_only

from typing_extensions import Buffer

from ._files import _StrOrBytesPath

__all__ = ["save"]

@type_check_only
class _Writer(Protocol):
    """A binary file object as the writers use it: written in one sequential pass."""

    def write(self, data: Buffer, /) -> object: ...

def save(
    obj: object,
    f: _StrOrBytesPath | _Writer,
    *,
    pickle_protocol: Literal[2] = 2,
    format: Literal["zip", "legacy"] = "zip",
    atomic: bool = True,
) -> None: ...
