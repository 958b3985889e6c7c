import collections
from typing import Any

from ._load import _Limits, _MapLocation, _Path
from ._scan import CheckpointInfo
from ._scan import ShardedCheckpoint as ShardedCheckpoint

__all__ = ["ShardedCheckpoint", "load_sharded", "scan_sharded"]

def scan_sharded(path: _Path, map_location: _MapLocation = None, limits: _Limits | None = None) -> CheckpointInfo: ...
def load_sharded(path: _Path, mmap: bool | None = None, **opts: Any) -> collections.OrderedDict[str, Any]: ...
