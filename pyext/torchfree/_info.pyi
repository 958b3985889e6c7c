# the classes are declared in _scan.pyi, where they were first (the names mypy reveals stay
# torchfree._scan.*); at runtime they live here
from ._scan import CheckpointInfo as CheckpointInfo
from ._scan import QuantInfo as QuantInfo
from ._scan import RecordInfo as RecordInfo
from ._scan import StorageInfo as StorageInfo
from ._scan import TensorInfo as TensorInfo

__all__ = ["CheckpointInfo", "QuantInfo", "RecordInfo", "StorageInfo", "TensorInfo"]
