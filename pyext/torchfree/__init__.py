"""torchfree: read PyTorch checkpoints without torch.

``torchfree.load(path)`` returns what ``torch.load`` would, with numpy arrays in
place of tensors, without importing torch and without ever executing code from
the file: the pickle inside a checkpoint runs on torchfree's own restricted VM,
whose GLOBALs resolve through an allowlist to torchfree's own constructors.
"""

from __future__ import annotations

from . import _core
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
from ._types import MetaArray, NestedArray, Opaque, QuantizedArray, SparseArray

# imported on first use (PEP 562), so that ``import torchfree`` costs little beyond numpy
_LAZY = {
    "save": "_save",
    "Checkpoint": "_scan", "CheckpointInfo": "_scan", "TensorInfo": "_scan", "QuantInfo": "_scan",
    "flatten": "_scan",
    "open": "_scan", "scan": "_scan",
    "IncompatibleKeys": "statedict", "StateDictDiff": "statedict", "StateDictError": "statedict",
    "add_prefix": "statedict", "compare_state_dicts": "statedict", "load_state_dict": "statedict",
    "optimizer_state_by_name": "statedict", "optimizer_state_from_names": "statedict",
    "module_state_dict": "statedict",
    "rename_keys": "statedict", "rename_map": "statedict", "select_prefix": "statedict",
    "strip_prefix": "statedict",
}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'torchfree' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module("." + mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


from ._version import __version__  # noqa: E402  (the one place the version is written)

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


def _ml_dtypes_descrs() -> dict:
    """{name: numpy dtype} of the ml_dtypes types torch has; the core asks for them the first time a
    file or an array needs one (ml_dtypes costs a few ms to import: most checkpoints never need it)."""
    import ml_dtypes
    import numpy as np

    descrs = {}
    for name in _core.DTYPE_NAMES:  # the core's dtypes (src/dtypes.c) that only ml_dtypes has
        if name != "bfloat16" and not name.startswith("float8"):
            continue
        t = getattr(ml_dtypes, name, None)
        if t is not None:
            descrs[name] = np.dtype(t)
    return descrs


def _register() -> None:
    from ._rebuild import HELPERS

    _core._set_helpers(dict(HELPERS, ml_dtypes_descrs=_ml_dtypes_descrs), {})


_register()
del _register
