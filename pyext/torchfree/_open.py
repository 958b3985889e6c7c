"""open(): a checkpoint opened lazily (``Checkpoint``), a tensor read one storage record at a time; a
safetensors file opened the same way (``_SafetensorsCheckpoint``). Shard indexes are _shards'."""

from __future__ import annotations

import collections
import weakref

from ._np import np

from . import _core
from ._info import CheckpointInfo, _info_from
from ._scanfile import _LoadedArchive, _scan_safetensors
from ._source import Source, load_file, load_safetensors, options, safetensors_entries, safetensors_meta
from ._types import MetaArray
from ._walk import _FIND, _INDEX, _children, _max_depth

__all__ = ["Checkpoint"]


class Checkpoint:
    """A checkpoint opened lazily (``torchfree.open``): tensors are read one storage at a time.

    ``ckpt[name]`` reads (or maps) only the storage record that tensor views, once; ``keys()``
    are the dotted names of ``flatten``; ``.info`` is what ``scan`` reports; ``.storages`` the
    ``torchfree.Storage`` objects with their target locations; ``.load()`` the whole object.
    """

    def __init__(self, f, map_location=None, *, mmap=None, weights_only=True, safe_globals=None,
                 encoding="utf-8", limits=None):
        self._f = f
        self._load_args = dict(map_location=map_location, mmap=mmap, weights_only=weights_only,
                               safe_globals=safe_globals, encoding=encoding, limits=limits)
        self._src = Source(f, mmap, lazy=True)
        try:
            # tensors are read past unknown globals, as scan lists them: those stay inert Opaques
            # (nothing is run); .load() applies weights_only's rules to the whole object
            opts = options(map_location, False, safe_globals, encoding, limits)
            if self._src.format != "zip":
                self._archive = _LoadedArchive(self._src, opts)
                self._obj = self._archive.obj
            else:
                self._archive = _core.Archive(*self._src.args(), **self._src.kwargs(), **opts)
                self._obj = self._archive.unpickle(lazy=True, collect_globals=True)
        except BaseException:
            self._src.close()
            raise
        self._max_depth = _max_depth(opts)
        # name -> leaf (TensorRef, or an array pickled inline), made in C when first needed: one
        # tensor asked for by name is found by a walk that builds no name
        self._names = None
        self._finds = 0
        # arrays already handed out, while the caller keeps them: asking twice gives the same
        # array (and reads nothing), yet memory is not held once the caller drops them
        self._cache = weakref.WeakValueDictionary()
        self._info = None

    @property
    def _index(self) -> dict:
        if self._names is None:
            self._names = _core.walk(self._obj, _INDEX, ".", _children, True, max_depth=self._max_depth)
        return self._names

    def _leaf(self, name):
        """The TensorRef (or array) named name; KeyError when none is."""
        if self._names is None and type(name) is str and self._finds < 8:
            self._finds += 1  # past a few look-ups, the whole index is cheaper
            return _core.walk(self._obj, _FIND, ".", _children, True, max_depth=self._max_depth, target=name)
        return self._index[name]

    # mapping protocol
    def keys(self):
        return self._index.keys()

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name) -> bool:
        try:
            self._leaf(name)
        except KeyError:
            return False
        return True

    def __getitem__(self, name):
        self._check_open()
        arr = self._cache.get(name)
        if arr is not None:
            return arr
        leaf = self._leaf(name)
        if isinstance(leaf, _core.TensorRef):
            arr = self._archive.materialize(leaf)
        else:
            arr = leaf
        if isinstance(arr, np.ndarray):
            self._cache[name] = arr
        return arr

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def items(self):
        for k in self._index:
            yield k, self[k]

    @property
    def info(self) -> CheckpointInfo:
        if self._info is None:
            self._check_open()
            path = self._src.path
            if isinstance(self._archive, _LoadedArchive):
                self._info = self._archive.info()
            else:
                self._info = _info_from(self._archive, self._obj, path, self._archive.storages(), self._max_depth)
        return self._info

    @property
    def storages(self) -> list:
        """The ``torchfree.Storage`` of each storage record, with its target location. A record
        is read when a tensor over it is, or by ``read_storage``; before that its bytes (buffer,
        ``.numpy()``) raise."""
        self._check_open()
        return self._archive.storages()

    def read_storage(self, storage):
        """Read (or map) one storage of ``.storages`` and return it, its bytes now available."""
        self._check_open()
        return self._archive.read_storage(storage)

    def load(self):
        """The whole object, as ``torchfree.load`` returns it."""
        if self._src.path is None and hasattr(self._f, "seek"):
            self._f.seek(self._src.src[1] if self._src.mode == 3 else 0)
        a = self._load_args
        opts = options(a["map_location"], a["weights_only"], a["safe_globals"], a["encoding"], a["limits"])
        return load_file(self._f, a["map_location"], a["mmap"], opts)

    def _check_open(self):
        if self._archive is None or self._archive.closed:
            raise ValueError("the checkpoint is closed")

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None
        self._src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._archive is None else f"{len(self._index)} tensors"
        return f"<torchfree.Checkpoint {self._src.path or type(self._f).__name__} ({state})>"


class _SafetensorsCheckpoint(Checkpoint):
    """open() of a safetensors file: the header is read and checked at open, ``ckpt[name]`` reads
    that tensor alone (``torchfree.safetensors.safe_open`` for a path, a view of the bytes
    otherwise). There are no torch storages: ``.storages`` is empty."""

    def __init__(self, f, st, map_location=None, *, mmap=None, weights_only=True, safe_globals=None,
                 encoding="utf-8", limits=None):
        from . import safetensors as sf

        self._f, self._kind = f, st[0]
        self._load_args = dict(map_location=map_location, mmap=mmap)
        self._meta = safetensors_meta(map_location)
        self._info = None
        self._cache = weakref.WeakValueDictionary()
        if self._kind == "path":
            self._path, self._buf = st[1], None
            if self._meta:  # the header alone
                entries, self._file = sf.read_header(self._path)[0], None
            else:
                self._file = sf.safe_open(self._path, mmap=mmap is not False)
                entries = list(self._file.entries.values())
        else:
            if mmap:
                raise ValueError("f must be a file path in order to use the mmap argument")
            self._path, self._file = None, None
            self._buf = st[1] if isinstance(st[1], bytearray) else bytearray(st[1])  # arrays the caller may write
            entries, self._start = safetensors_entries(self._buf)
        self._names = collections.OrderedDict((e.name, e) for e in entries)
        self._closed = False

    def _leaf(self, name):
        return self._names[name]

    def __getitem__(self, name):
        self._check_open()
        arr = self._cache.get(name)
        if arr is not None:
            return arr
        e = self._names[name]
        if self._meta:
            return MetaArray(e.array_shape, e.dtype)
        if self._file is not None:
            arr = self._file.get_tensor(name)
        else:
            from . import safetensors as sf

            arr = sf._array(self._buf, e, self._start, "<bytes>")
        self._cache[name] = arr
        return arr

    @property
    def info(self) -> CheckpointInfo:
        if self._info is None:
            self._check_open()
            if self._path is not None:
                from . import safetensors as sf

                self._info = sf.scan(self._path)
            else:
                self._info = _scan_safetensors("buffer", self._buf)
        return self._info

    @property
    def storages(self) -> list:
        self._check_open()
        return []

    def read_storage(self, storage):
        raise TypeError("a safetensors file has no torch storages")

    def load(self):
        """The whole file, as ``torchfree.load`` returns it."""
        self._check_open()
        # a buffer's arrays are copies: the arrays handed out by ckpt[name] view self._buf
        src = ("path", self._path) if self._path is not None else ("buffer", memoryview(self._buf))
        return load_safetensors(*src, **self._load_args)

    def _check_open(self):
        if self._closed:
            raise ValueError("the checkpoint is closed")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._closed = True

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._names)} tensors"
        return f"<torchfree.Checkpoint {self._path or type(self._f).__name__} (safetensors, {state})>"
