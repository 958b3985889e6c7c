"""Sharded checkpoints (Hugging Face ``*.bin.index.json``) of torch files: loaded as one state_dict,
scanned as one CheckpointInfo, opened as one lazy checkpoint. Above _open and _scanfile, below the
dispatch of load / scan / open (_load, _scan)."""

from __future__ import annotations

import collections

from ._core import FormatError
from ._info import CheckpointInfo, StorageInfo, TensorInfo
from ._open import Checkpoint
from ._scanfile import scan_file
from ._shardindex import _ShardIndex
from ._source import run_load

__all__ = ["ShardedCheckpoint", "load_sharded", "scan_sharded"]


def scan_sharded(path, map_location=None, limits=None) -> CheckpointInfo:
    """scan() of a ``*.bin.index.json``: its shards' CheckpointInfos as one, names prefixed by shard."""
    return _scan_index(_ShardIndex(path), map_location, limits)


def _scan_index(idx, map_location=None, limits=None) -> CheckpointInfo:
    parts = [scan_file(idx.files[s], map_location, limits=limits) for s in idx.shards]
    info = CheckpointInfo(idx.path, "sharded zip", parts[0].byteorder if parts else "little")
    for shard, p in zip(idx.shards, parts):
        info.records += p.records
        info.storages += [StorageInfo(f"{shard}:{s.key}", s.dtype, s.nbytes, s.location, f"{shard}:{s.record}")
                          for s in p.storages]
        info.tensors += [TensorInfo(t.name, t.dtype, t.shape, t.strides, t.stride,
                                    None if t.storage_key is None else f"{shard}:{t.storage_key}",
                                    t.storage_offset, t.nbytes, t.location, t.torch_dtype, t.conj, t.neg,
                                    t.layout, t.quant, t.nnz, t.parts)
                         for t in p.tensors]
        info.globals = sorted(set(info.globals) | set(p.globals))
    return info


class ShardedCheckpoint:
    """Shards of a ``*.bin.index.json`` as one lazy checkpoint: a shard opens on first use."""

    def __init__(self, path, map_location=None, **kw):
        self._index = _ShardIndex(path)
        self._map_location = map_location
        self._kw = kw
        self._open: dict = {}

    def _shard(self, shard) -> Checkpoint:
        if shard not in self._open:
            self._open[shard] = Checkpoint(self._index.files[shard], self._map_location, **self._kw)
        return self._open[shard]

    def keys(self):
        return self._index.weight_map.keys()

    def __iter__(self):
        return iter(self._index.weight_map)

    def __len__(self) -> int:
        return len(self._index.weight_map)

    def __contains__(self, name) -> bool:
        # the index names every tensor, as Checkpoint's names do: no shard is opened to answer
        return name in self._index.weight_map

    def __getitem__(self, name):
        return self._shard(self._index.weight_map[name])[name]

    def items(self):
        for k in self._index.weight_map:
            yield k, self[k]

    @property
    def info(self) -> CheckpointInfo:
        return _scan_index(self._index, self._map_location, self._kw.get("limits"))

    @property
    def storages(self) -> list:
        return [s for shard in self._index.shards for s in self._shard(shard).storages]

    def load(self):
        out = collections.OrderedDict()
        for shard in self._index.shards:
            part = self._shard(shard).load()
            out.update(part)
        return out

    def close(self) -> None:
        for c in self._open.values():
            c.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_sharded(path, mmap=None, **opts):
    """load() of a ``*.bin.index.json``: the shards' state_dicts merged into one OrderedDict."""
    idx = _ShardIndex(path)
    out = collections.OrderedDict()
    for shard in idx.shards:
        # a shard may be a legacy stream (torch.save(..., _use_new_zipfile_serialization=False))
        part = run_load(idx.files[shard], mmap, opts)
        if not isinstance(part, dict):
            raise FormatError(f"shard {shard} holds a {type(part).__name__}, not a state_dict")
        out.update(part)
    return out
