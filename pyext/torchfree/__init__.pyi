"""The public API (docs: README.md). Names the runtime exports lazily (module __getattr__) are
declared here as the real names they are."""

from ._core import (
    LIMITS,
    CheckpointError,
    FormatError,
    LimitError,
    Storage,
    UnpicklingError,
    UnsafeGlobalError,
)
from ._load import load
from ._save import save
from ._scan import Checkpoint, CheckpointInfo, QuantInfo, TensorInfo, flatten, open, scan
from ._types import MetaArray, NestedArray, Opaque, QuantizedArray, SparseArray
from .statedict import (
    IncompatibleKeys,
    StateDictDiff,
    StateDictError,
    add_prefix,
    compare_state_dicts,
    load_state_dict,
    module_state_dict,
    optimizer_state_by_name,
    optimizer_state_from_names,
    rename_keys,
    rename_map,
    select_prefix,
    strip_prefix,
)

__version__: str

__all__ = [
    "load",
    "save",
    "scan",
    "open",
    "flatten",
    "Checkpoint",
    "CheckpointInfo",
    "TensorInfo",
    "QuantInfo",
    "Storage",
    "Opaque",
    "MetaArray",
    "QuantizedArray",
    "SparseArray",
    "NestedArray",
    "LIMITS",
    "CheckpointError",
    "FormatError",
    "UnpicklingError",
    "UnsafeGlobalError",
    "LimitError",
    "__version__",
    "load_state_dict",
    "rename_keys",
    "rename_map",
    "strip_prefix",
    "add_prefix",
    "select_prefix",
    "compare_state_dicts",
    "optimizer_state_by_name",
    "optimizer_state_from_names",
    "module_state_dict",
    "StateDictError",
    "IncompatibleKeys",
    "StateDictDiff",
]
