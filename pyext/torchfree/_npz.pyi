import collections
import os
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np

from ._scan import CheckpointInfo

def needs_upcast(dtype: np.dtype[Any]) -> bool: ...
def save_npz(
    tensors: Mapping[str, np.ndarray[Any, Any]],
    fh: str | os.PathLike[str] | IO[bytes],
    progress: Callable[[int], object] | None = None,
) -> None: ...
def load_npz(path: str | os.PathLike[str] | IO[bytes]) -> collections.OrderedDict[str, np.ndarray[Any, Any]]: ...
def open_npz(path: str | os.PathLike[str] | IO[bytes]) -> np.lib.npyio.NpzFile: ...
def scan_npz(path: str | os.PathLike[str]) -> CheckpointInfo: ...
