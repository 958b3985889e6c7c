import collections
import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
from typing_extensions import TypeAlias

__all__ = [
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

_V = TypeVar("_V")
# prefix -> prefix, [(regex, replacement)] (patterns may be compiled, replacements callables), or key -> new key
_RenameRules: TypeAlias = (
    Mapping[str, str]
    | Sequence[tuple[str | re.Pattern[str], str | Callable[[re.Match[str]], str]]]
    | Callable[[str], str]
)
_Log: TypeAlias = Callable[[str], object]
# parameter names: flat, in torch.optim's order, or one sequence per param group
_Names: TypeAlias = Iterable[str] | Iterable[Iterable[str]]

class StateDictError(ValueError, RuntimeError):
    missing_keys: list[str]
    unexpected_keys: list[str]
    error_msgs: list[str]
    def __init__(
        self,
        message: str,
        *,
        missing_keys: Iterable[str] = (),
        unexpected_keys: Iterable[str] = (),
        error_msgs: Iterable[str] = (),
    ) -> None: ...

class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]

class StateDictDiff(NamedTuple):
    only_in_a: list[str]
    only_in_b: list[str]
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    dtype_mismatches: list[tuple[str, np.dtype[Any] | str, np.dtype[Any] | str]]
    @property
    def same_keys(self) -> bool: ...
    @property
    def same_shapes(self) -> bool: ...

def load_state_dict(
    target: MutableMapping[str, Any],
    state_dict: Mapping[str, object],
    *,
    strict: bool = True,
    rename: _RenameRules | None = None,
    name: str | None = None,
    log: _Log | None = None,
) -> IncompatibleKeys: ...
def rename_map(keys: Iterable[str], rules: _RenameRules) -> collections.OrderedDict[str, str]: ...
def rename_keys(
    state_dict: Mapping[str, _V], rules: _RenameRules, *, log: _Log | None = None
) -> collections.OrderedDict[str, _V]: ...
def strip_prefix(
    state_dict: Mapping[str, _V], prefix: str = "module.", *, log: _Log | None = None
) -> collections.OrderedDict[str, _V]: ...
def add_prefix(
    state_dict: Mapping[str, _V], prefix: str, *, log: _Log | None = None
) -> collections.OrderedDict[str, _V]: ...
def select_prefix(state_dict: Mapping[str, _V], prefix: str) -> collections.OrderedDict[str, _V]: ...
def compare_state_dicts(a: Mapping[str, object], b: Mapping[str, object]) -> StateDictDiff: ...
def optimizer_state_by_name(optimizer_state_dict: Mapping[str, Any], names: _Names | None = None) -> dict[str, Any]: ...
def optimizer_state_from_names(state_by_name: Mapping[str, Any], names: _Names | None = None) -> dict[str, Any]: ...

MAX_MODULES: int

def module_state_dict(obj: object) -> collections.OrderedDict[str, Any]: ...
