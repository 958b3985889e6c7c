"""A sharded checkpoint's index (Hugging Face ``*.index.json``), read and checked: its weight_map
and shard files. What is done with the shards is _shards' (torch files) and safetensors' own."""

from __future__ import annotations

import builtins
import os

from ._core import FormatError

__all__ = []


def _builtin_open(path):
    return builtins.open(path, "rb")


class _ShardIndex:
    def __init__(self, path):
        self.path = os.fspath(path)
        with _builtin_open(self.path) as fh:
            import json

            data = json.load(fh)
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise FormatError(f"{self.path}: not a sharded checkpoint index (no 'weight_map' of names to files)")
        self.weight_map = wm
        base = os.path.dirname(self.path)
        self.shards = list(dict.fromkeys(wm.values()))
        for s in self.shards:
            if os.path.isabs(s) or ".." in s.replace("\\", "/").split("/"):
                raise FormatError(f"{self.path}: shard path {s!r} leaves the index's folder")
        self.files = {s: os.path.join(base, s) for s in self.shards}
