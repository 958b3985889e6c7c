"""scan(), open() and flatten(): look inside a checkpoint without loading it.

``scan`` runs the pickle on the C core in lazy mode: every tensor becomes a validated
``TensorRef`` (dtype, shape, strides, storage) and no storage byte is read. ``open`` keeps
that lazy archive open and reads one storage record when one of its tensors is asked for.
Both name tensors with the dotted paths of ``flatten``.

This module is the dispatch (shard index, or one file) and the names older code imports from
here; the work is in _walk (flatten), _info (what scan reports), _scanfile (scan of one file),
_open (Checkpoint) and _shards (``*.bin.index.json``).
"""

from __future__ import annotations

import gc
import os

# re-exported: their home moved, the names stay (tests and older code import them from here)
from ._info import (  # noqa: F401
    CheckpointInfo,
    QuantInfo,
    RecordInfo,
    StorageInfo,
    TensorInfo,
    _human,
    _info_from,
    _is_torch_global,
    _Later,
    _tensor_info,
    _tensor_infos,
    _torch_name,
)
from ._scanfile import (  # noqa: F401
    _legacy_scan,
    _LoadedArchive,
    _scan,
    _scan_safetensors,
    scan_file,
    weights_only_check,
)
from ._source import is_index_json, safetensors_input
from ._walk import _FIND, _INDEX, _INFOS, _PAIRS, _children, _max_depth, _walk, flatten  # noqa: F401

__all__ = ["flatten", "scan", "open", "Checkpoint", "CheckpointInfo", "TensorInfo", "StorageInfo", "RecordInfo",
           "QuantInfo"]

# names of modules that scan() of one file does not need (`torchfree info` imports none of them):
# imported on first use
_LATER = {"Checkpoint": "_open", "_SafetensorsCheckpoint": "_open", "_ShardIndex": "_shardindex",
          "ShardedCheckpoint": "_shards", "load_sharded": "_shards", "scan_sharded": "_shards"}


def __getattr__(name):
    home = _LATER.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__package__}.{home}"), name)


def scan(f, map_location=None, *, limits=None) -> CheckpointInfo:
    """Describe a checkpoint from its container index and pickle only: no tensor byte is read.

    Unknown globals never raise here: they are listed in ``.globals`` (the pickle is still never
    executed). ``map_location`` only changes the reported ``location`` of each storage (a callable
    is not called: it would need the bytes).
    """
    if is_index_json(f):
        from ._shards import scan_sharded

        return scan_sharded(f, map_location=map_location, limits=limits)
    return scan_file(f, map_location, limits=limits)


def open(f, map_location=None, *, mmap=None, weights_only=True, safe_globals=None, encoding="utf-8",
         limits=None):
    """Open a checkpoint lazily: ``with torchfree.open(path) as ckpt: w = ckpt["fc1.weight"]``.

    A Hugging Face ``*.bin.index.json`` opens its shards as one checkpoint; each shard is read only
    when one of its tensors is asked for. Unknown globals never raise here (they stay inert, as
    ``scan`` lists them): every tensor can be read; ``.load()`` keeps ``weights_only``'s rules. A
    safetensors file (told by its header) opens too, one tensor read per ``ckpt[name]``.
    """
    from ._open import Checkpoint, _SafetensorsCheckpoint
    from ._shards import ShardedCheckpoint

    kw = dict(mmap=mmap, weights_only=weights_only, safe_globals=safe_globals, encoding=encoding, limits=limits)
    if is_index_json(f):
        return ShardedCheckpoint(f, map_location, **kw)
    st = safetensors_input(f)
    if st is not None:  # told by its header, whatever the name
        return _SafetensorsCheckpoint(f, st, map_location, **kw)
    return Checkpoint(f, map_location, **kw)


def _state_dict_children(obj, found=None):
    """_children, with a pickled nn.Module's children its state_dict entries (module_state_dict);
    ``found`` (a list) gets each such module."""
    from .statedict import _module_state, module_state_dict

    if _module_state(obj) is not None:
        if found is not None:
            found.append(obj)
        return list(module_state_dict(obj).items())
    return _children(obj)


def scan_state_dict_names(f) -> CheckpointInfo:
    """scan(f), with the tensors of a whole pickled model (``torch.save(model)``) named as
    ``model.state_dict()`` names them (``torchfree.module_state_dict``): the names ``torchfree
    info`` shows. Non-persistent buffers and other module attributes are not listed, nor counted
    in the storages and totals."""
    if is_index_json(f) or isinstance(f, (str, os.PathLike)) and not os.path.isfile(f):
        return scan(f)  # shards, folders: their own names
    found: list = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        info = _scan(f, None, None, lambda o: _state_dict_children(o, found))
    finally:
        if gc_was_enabled:
            gc.enable()
    if found:  # storages only what is left out views: not in the listing, not in the totals
        keys = {t.storage_key for t in info.tensors}
        v = info._storages
        if type(v) is _Later:
            v.args = ([s for s in v.args[0] if s.key in keys],) + v.args[1:]
        else:
            info._storages = [s for s in v if s.key in keys]
    return info
