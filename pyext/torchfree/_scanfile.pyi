from ._load import _FileLike, _Limits, _MapLocation, _SafeGlobals
from ._scan import CheckpointInfo

__all__ = ["scan_file", "weights_only_check"]

def scan_file(f: _FileLike, map_location: _MapLocation = None, *, limits: _Limits | None = None) -> CheckpointInfo: ...
def weights_only_check(
    f: _FileLike, safe_globals: _SafeGlobals | None = None, encoding: str = "utf-8", limits: _Limits | None = None
) -> None: ...
