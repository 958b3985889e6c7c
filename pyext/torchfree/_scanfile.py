"""scan of one file (not a shard index): the C core's lazy pickle run over a zip archive, a legacy
stream or a tar, or a safetensors header; and the check of load()'s weights_only rules without
reading tensors. The dispatch of ``torchfree.scan`` (shard indexes included) is _scan's."""

from __future__ import annotations

import gc

from . import _core
from ._info import CheckpointInfo, StorageInfo, _info_from, _Later, _tensor_infos
from ._source import Source, options, safetensors_entries, safetensors_input
from ._walk import _max_depth

__all__ = ["scan_file", "weights_only_check"]


def scan_file(f, map_location=None, *, limits=None) -> CheckpointInfo:
    """scan() of one file (a shard index is _scan's): no tensor byte is read."""
    st = safetensors_input(f)
    if st is not None:  # told by its header, whatever the name
        return _scan_safetensors(*st)
    if callable(map_location) and not isinstance(map_location, (str, dict)):
        map_location = None
    # the pickle's containers come and go within this call: no collection pass over them
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _scan(f, map_location, limits)
    finally:
        if gc_was_enabled:
            gc.enable()


#: rebuilds of tensors whose listing needs the values of their parts
_VALUED_REBUILDS = frozenset(f"torch._utils._rebuild_{k}" for k in ("qtensor", "sparse_tensor", "sparse_csr_tensor"))


def _legacy_scan(src, opts, children=None):
    """scan() of a legacy stream or tar: the pickles run, no storage byte is copied."""
    obj, storages, globs, fmt = _core.load_legacy(*src.args(), **src.kwargs(), **opts, lazy=True,
                                                  collect_globals=True)
    if _VALUED_REBUILDS.intersection(globs):
        # quantized and sparse tensors are listed with values of their parts (scales, indices),
        # and a legacy stream's bytes follow its pickle: such a file is read whole
        obj, storages, globs, fmt = _core.load_legacy(*src.args(), **src.kwargs(), **opts, collect_globals=True)
    tensors = _tensor_infos(obj, _max_depth(opts), children)
    sinfo = _Later(_core.storage_infos, list(storages), "storage ", StorageInfo)
    return CheckpointInfo(src.path, fmt, "little", [], sinfo, tensors, globs)


class _LoadedArchive:
    """What Checkpoint needs of an Archive, for a legacy stream or tar: read whole at open
    (its bytes follow its pickle), so every tensor is already an array."""

    torchscript = False
    prefix = ""
    byteorder = "little"

    def __init__(self, src, opts):
        self._src, self._opts = src, opts
        self.obj, self._storages, self._globals, self.format = _core.load_legacy(
            *src.args(), **src.kwargs(), **opts, collect_globals=True)
        self.closed = False

    def storages(self):
        return list(self._storages)

    def read_storage(self, storage):
        if not isinstance(storage, _core.Storage):
            raise TypeError("expected a torchfree.Storage")
        return storage  # read with the stream

    def globals(self):
        return list(self._globals)

    def info(self) -> CheckpointInfo:
        return _legacy_scan(self._src, self._opts)

    def close(self):
        self.closed = True
        self.obj = self._storages = None


def _scan_safetensors(kind, src) -> CheckpointInfo:
    from . import safetensors as st  # numpy: not for zip scans

    if kind == "path":
        return st.scan(src)
    return st._info(None, *safetensors_entries(src))


def _scan(f, map_location, limits, children=None) -> CheckpointInfo:
    src = Source(f, False, lazy=True)
    try:
        opts = options(map_location, weights_only=False, limits=limits)
        if src.format != "zip":
            return _legacy_scan(src, opts, children)
        archive = _core.Archive(*src.args(), **src.kwargs(), **opts)
        try:
            obj = archive.unpickle(lazy=True, collect_globals=True)
            return _info_from(archive, obj, src.path, archive.storages(), _max_depth(opts), children)
        finally:
            archive.close()
    finally:
        src.close()


def weights_only_check(f, safe_globals=None, encoding="utf-8", limits=None) -> None:
    """Raise what ``load(f)`` (weights_only=True) raises for the globals it refuses, reading no
    tensor byte (``open`` reads tensors past them; the CLI's diff and convert keep load's rules)."""
    src = Source(f, False, lazy=True)
    try:
        opts = options(None, True, safe_globals, encoding, limits)
        if src.format != "zip":
            _core.load_legacy(*src.args(), **src.kwargs(), **opts, lazy=True)
            return
        archive = _core.Archive(*src.args(), **src.kwargs(), **opts)
        try:
            archive.unpickle(lazy=True)
        finally:
            archive.close()
    finally:
        src.close()
