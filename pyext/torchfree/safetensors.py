"""A reader and writer of the safetensors format, in plain Python over numpy (no dependency).

The format: an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON
``{name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}`` (padded with spaces), then the data: every tensor C-contiguous,
little-endian, at ``[begin, end)`` of the data section. The tensors cover the data section
exactly: no holes, no overlaps.

``save_file(tensors, path)`` / ``save(tensors) -> bytes`` write a mapping name -> array.
Non-contiguous or big-endian arrays are written as contiguous little-endian copies; arrays that
share memory are written once per name (safetensors has no views). Tensors are laid out by
descending element size, so every tensor is aligned to its element size in the file; the header
keeps the mapping's order.

``load_file(path)`` returns an ``OrderedDict`` of arrays in header order, each viewing a private
copy-on-write mapping of its bytes in the file (zero-copy, writable, never written back; one
mapping per tensor, so tensors share no memory owner), or owning copies with ``mmap=False``.
``safe_open(path)`` reads the header only and one tensor per ``f[name]``.
The header is untrusted: its size, its JSON (no duplicate keys), every dtype, shape and offset
are checked before anything is mapped or allocated; a bad file raises ``torchfree.FormatError``
naming the problem.
"""

from __future__ import annotations

import collections
import json
import mmap as _mmap
import os
import struct
import sys

import numpy as np

from ._core import FormatError
from ._files import atomic_write, check_file_object, check_parent, note_mapping, open_rewrite, write_through_file

__all__ = ["save", "save_file", "load", "load_file", "safe_open", "scan", "metadata", "read_header", "DTYPES",
           "MAX_HEADER"]

#: largest header accepted (the reference implementation's limit)
MAX_HEADER = 100_000_000
#: most dimensions accepted for one tensor (torchfree.LIMITS["ndim"])
MAX_NDIM = 64
_METADATA = "__metadata__"

# safetensors dtype -> (numpy dtype name or ml_dtypes attribute, itemsize). "F4" (two 4-bit floats
# a byte, as torch's float4_e2m1fn_x2) is read as packed uint8, the last dimension halved, the way
# torchfree.load returns float4_e2m1fn_x2. F6_* (6-bit) has no byte-addressable form: refused.
_SPEC = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "BF16": "bfloat16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "C64": "complex64",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "uint8",
}
_UNSUPPORTED = {"F6_E2M3", "F6_E3M2"}

_dtypes: dict | None = None  # code -> np.dtype, built on first use (ml_dtypes imported then)
_codes: dict | None = None  # np.dtype -> code


def _tables():
    global _dtypes, _codes
    if _dtypes is None:
        import ml_dtypes

        d = {}
        for code, name in _SPEC.items():
            t = getattr(ml_dtypes, name, None) if name.startswith(("bfloat", "float8")) else name
            if t is None:  # an older ml_dtypes without this float8 type
                continue
            dt = np.dtype(t)
            if sys.byteorder == "big" and dt.byteorder == "=":
                dt = dt.newbyteorder("<")
            d[code] = dt
        _codes = {np.dtype(_SPEC[c]) if c in _PLAIN else dt: c for c, dt in d.items() if c != "F4"}
        _dtypes = d
    return _dtypes, _codes


_PLAIN = {c for c, n in _SPEC.items() if not n.startswith(("bfloat", "float8"))}


def __getattr__(name):
    if name == "DTYPES":
        return dict(_tables()[0])
    raise AttributeError(name)


def dtype_code(dt) -> str:
    """The safetensors dtype code of a numpy dtype (``TypeError`` if the format has none)."""
    dt = np.dtype(dt)
    codes = _tables()[1]
    code = codes.get(dt.newbyteorder("=") if dt.byteorder in "<>" else dt)
    if code is None:
        hint = " (store it as two float64 values, or as complex64)" if dt == np.complex128 else ""
        raise TypeError(f"safetensors has no dtype for numpy {dt}{hint}")
    return code


# ---- writing -------------------------------------------------------------------------------------


def _prepare(tensors, metadata):
    """(header bytes, [(name, array, nbytes)] in data order) for a mapping of arrays."""
    if not hasattr(tensors, "items"):
        raise TypeError(f"tensors must be a mapping of names to arrays, not {type(tensors).__name__}")
    entries = []
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, not {type(name).__name__} ({name!r})")
        if name == _METADATA:
            raise ValueError(f"{_METADATA!r} is reserved for the metadata and cannot name a tensor")
        if not isinstance(arr, np.ndarray):
            if hasattr(arr, "__array__") and not hasattr(arr, "qscheme"):
                arr = np.asarray(arr)
            else:
                raise TypeError(f"{name}: expected a numpy array, got {type(arr).__name__}")
        try:
            code = dtype_code(arr.dtype)
        except TypeError as e:
            raise TypeError(f"{name}: {e}") from None
        entries.append((name, code, arr))
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in metadata.items()):
            raise TypeError("metadata must be a dict of str to str")
    # data order: widest elements first (each tensor then starts at a multiple of its element size),
    # mapping order within one width
    order = sorted(range(len(entries)), key=lambda i: -entries[i][2].dtype.itemsize)
    offsets = {}
    pos = 0
    for i in order:
        n = entries[i][2].nbytes
        offsets[i] = (pos, pos + n)
        pos += n
    header = {}
    if metadata is not None:
        header[_METADATA] = dict(metadata)
    for i, (name, code, arr) in enumerate(entries):
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": list(offsets[i])}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    if len(raw) > MAX_HEADER:
        raise ValueError(f"the header would be {len(raw):,} bytes, over the format's limit of {MAX_HEADER:,}")
    return struct.pack("<Q", len(raw)) + raw, [(entries[i][0], entries[i][2]) for i in order], pos


_CHUNK = 64 << 20


def _le_bytes(arr: np.ndarray):
    """A flat byte view of the array, C-contiguous and little-endian (a copy only if needed)."""
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    return memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")


def _write_data(fh, order, progress=None):
    for _name, arr in order:
        view = _le_bytes(arr)
        for start in range(0, len(view), _CHUNK):
            part = view[start : start + _CHUNK]
            fh.write(part)
            if progress is not None:
                progress(len(part))


def save(tensors, metadata=None) -> bytes:
    """The safetensors bytes of a mapping ``{name: array}`` (and optional ``{str: str}`` metadata)."""
    import io

    head, order, _ = _prepare(tensors, metadata)
    out = io.BytesIO()
    out.write(head)
    _write_data(out, order)
    return out.getvalue()


def save_file(tensors, filename, metadata=None, *, progress=None) -> None:
    """Write ``{name: array}`` to ``filename`` in the safetensors format.

    ``progress``, if given, is called with the number of data bytes written after each chunk.
    ``filename`` may also be a binary file object, written sequentially. A file that arrays of
    this process map (``load_file``) is never rewritten in place: a path is replaced by a new
    file renamed over it, a file object over it raises ``OSError`` before anything is written.
    """
    head, order, _ = _prepare(tensors, metadata)

    def write(fh):
        fh.write(head)
        _write_data(fh, order, progress)

    if hasattr(filename, "write"):
        check_file_object(filename)
        write(filename)
        return
    if not isinstance(filename, (str, bytes, os.PathLike)):  # a descriptor, as open() takes
        with open(filename, "wb") as fh:
            write(fh)
        return
    check_parent(os.fsdecode(os.fspath(filename)))  # "Parent directory ... does not exist"
    fd = open_rewrite(filename)
    if fd is None:  # mapped by arrays of this process: a new file, renamed over it
        atomic_write(filename, write_through_file(write), sync=False, mapped=True)
        return
    with open(fd, "wb") as fh:
        write(fh)


def data_size(tensors) -> int:
    """Bytes of tensor data ``save_file`` would write."""
    return sum(int(a.nbytes) for a in tensors.values())


# ---- reading -------------------------------------------------------------------------------------


class _Entry:
    __slots__ = ("name", "code", "dtype", "shape", "begin", "end")

    def __init__(self, name, code, dtype, shape, begin, end):
        self.name, self.code, self.dtype, self.shape, self.begin, self.end = name, code, dtype, shape, begin, end

    @property
    def array_shape(self) -> tuple:
        if self.code == "F4":
            return self.shape[:-1] + (self.shape[-1] // 2,)
        return self.shape


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise FormatError(f"safetensors header: key {k!r} appears twice")
        d[k] = v
    return d


def _bad_constant(name):
    raise FormatError(f"safetensors header: {name} is not valid JSON")


def _is_int(x) -> bool:
    return type(x) is int


def parse_header(raw: bytes, data_len: int, where: str = "") -> tuple:
    """Check a header (the bytes after the length field) against a data section of ``data_len``
    bytes. Returns ``([_Entry] in header order, metadata dict or None)``."""
    pre = f"{where}: " if where else ""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{pre}safetensors header is not UTF-8 (byte {e.start + 8})") from None
    if not text.startswith("{"):
        raise FormatError(f"{pre}safetensors header does not start with '{{'")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_bad_constant)
    except FormatError as e:
        raise FormatError(f"{pre}{e}") from None
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{pre}safetensors header is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{pre}safetensors header is not a JSON object")
    dtypes = _tables()[0]
    metadata = None
    entries = []
    for name, spec in obj.items():
        if name == _METADATA:
            if spec is not None and (not isinstance(spec, dict)
                                     or not all(isinstance(v, str) for v in spec.values())):
                raise FormatError(f"{pre}safetensors __metadata__ must map strings to strings")
            metadata = spec
            continue
        bad = f"{pre}safetensors tensor {name!r}"
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            got = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
            raise FormatError(f"{bad}: expected the keys dtype, shape, data_offsets, got {got}")
        code, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(code, str):
            raise FormatError(f"{bad}: dtype is not a string")
        if code in _UNSUPPORTED:
            raise FormatError(f"{bad}: dtype {code} (packed 6-bit floats) has no numpy form")
        if code not in dtypes:
            raise FormatError(f"{bad}: unknown dtype {code[:40]!r}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(s) and 0 <= s < 2**63
                                                                           for s in shape):
            raise FormatError(f"{bad}: shape must be a list of at most {MAX_NDIM} non-negative integers")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs):
            raise FormatError(f"{bad}: data_offsets must be [begin, end]")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise FormatError(f"{bad}: data_offsets [{begin}, {end}] outside the data section "
                              f"of {data_len} bytes")
        numel = 1
        for s in shape:
            numel *= s
        if code == "F4":
            if not shape or shape[-1] % 2:
                raise FormatError(f"{bad}: F4 needs an even last dimension")
            nbytes = numel // 2
        else:
            nbytes = numel * dtypes[code].itemsize
        if nbytes != end - begin:
            raise FormatError(f"{bad}: shape {shape} of {code} is {nbytes} bytes, but data_offsets "
                              f"[{begin}, {end}] hold {end - begin}")
        entries.append(_Entry(name, code, dtypes[code], tuple(shape), begin, end))
    pos = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else f"leaves a hole at byte {pos}"
            raise FormatError(f"{pre}safetensors tensor {e.name!r} at [{e.begin}, {e.end}] {what}")
        pos = e.end
    if pos != data_len:
        raise FormatError(f"{pre}safetensors data section is {data_len} bytes, but the tensors cover {pos}")
    return entries, metadata


def _split(size: int, read8, where: str):
    """(header length, data start) after checking the length field against the input size."""
    if size < 8:
        raise FormatError(f"{where}: too short for a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", read8)
    if n > MAX_HEADER:
        raise FormatError(f"{where}: safetensors header length {n:,} is over the limit of {MAX_HEADER:,}")
    if 8 + n > size:
        raise FormatError(f"{where}: safetensors header length {n:,} runs past the end of the input "
                          f"({size:,} bytes)")
    if n < 2:
        raise FormatError(f"{where}: safetensors header of {n} bytes is too short")
    return n, 8 + n


def read_header(f) -> tuple:
    """``(entries, metadata, data_start, file_size)`` of a safetensors file, reading the header only."""
    path = os.fspath(f)
    with open(path, "rb") as fh:
        return _read_header(fh, path)


def _read_header(fh, path) -> tuple:
    size = os.fstat(fh.fileno()).st_size
    n, start = _split(size, fh.read(8) if size >= 8 else b"", path)
    raw = fh.read(n)
    if len(raw) != n:
        raise FormatError(f"{path}: truncated safetensors header")
    entries, metadata = parse_header(raw, size - start, path)
    return entries, metadata, start, size


def _array(buf, e: _Entry, start: int, where: str):
    count = (e.end - e.begin) // e.dtype.itemsize
    try:
        if count == 0:
            return np.empty(e.array_shape, e.dtype)
        return np.frombuffer(buf, dtype=e.dtype, count=count, offset=start + e.begin).reshape(e.array_shape)
    except (ValueError, OverflowError, MemoryError) as exc:
        raise FormatError(f"{where}: safetensors tensor {e.name!r}: {exc}") from None


def load(data) -> "collections.OrderedDict[str, np.ndarray]":
    """Tensors of safetensors bytes (any bytes-like object), as arrays viewing ``data``."""
    view = memoryview(data).cast("B")
    size = len(view)
    n, start = _split(size, bytes(view[:8]) if size >= 8 else b"", "<bytes>")
    entries, _ = parse_header(bytes(view[8:start]), size - start)
    return collections.OrderedDict((e.name, _array(view, e, start, "<bytes>")) for e in entries)


def load_file(filename, *, mmap=True) -> "collections.OrderedDict[str, np.ndarray]":
    """Tensors of a safetensors file in header order.

    ``mmap=True`` (default): each array views a private copy-on-write mapping of its bytes (zero-copy;
    writes never reach the file). ``mmap=False``: arrays own copies; the file is closed on return.
    """
    with safe_open(filename, mmap=mmap) as f:
        return collections.OrderedDict((k, f[k]) for k in f.keys())


def metadata(filename):
    """The ``__metadata__`` dict of a safetensors file (``None`` if it has none)."""
    if os.fspath(filename).endswith(".index.json"):
        with safe_open(filename) as f:
            return f.metadata()
    return read_header(filename)[1]


def is_index(filename) -> bool:
    """Whether ``filename`` is a sharded-safetensors index (``model.safetensors.index.json``)."""
    if not isinstance(filename, (str, os.PathLike)) or not os.fspath(filename).endswith(".index.json"):
        return False
    from ._shardindex import _ShardIndex

    shards = _ShardIndex(filename).shards
    return bool(shards) and all(sh.endswith(".safetensors") for sh in shards)


def safe_open(filename, *, mmap=True):
    """A safetensors file opened lazily: the header is read and checked, ``f[name]`` reads one tensor.

    ``keys()``, ``metadata()``, ``entries`` (dtype/shape/offsets), ``get_tensor(name)``,
    ``f[name]``; a context manager. With ``mmap=True`` arrays view the mapping (it stays alive as
    long as they do); with ``mmap=False`` each tensor is read into its own array.
    A ``*.safetensors.index.json`` (Hugging Face shards) opens its shards as one file.
    """
    if isinstance(filename, (str, os.PathLike)) and os.fspath(filename).endswith(".index.json"):
        return _ShardedFile(filename, mmap=mmap)
    return SafetensorsFile(filename, mmap=mmap)


class _Entries:
    """The name-indexed side of an opened file: ``self._entries`` maps names to header entries."""

    @property
    def entries(self):
        return self._entries

    def keys(self):
        return list(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries


class SafetensorsFile(_Entries):
    """One safetensors file opened by :func:`safe_open`."""

    def __init__(self, filename, *, mmap=True):
        self.path = os.fspath(filename)
        self._fh = open(self.path, "rb")
        try:
            entries, meta, start, size = _read_header(self._fh, self.path)
        except BaseException:
            self._fh.close()
            raise
        self._entries = collections.OrderedDict((e.name, e) for e in entries)
        self._meta = meta
        self._start = start
        self._mmap = bool(mmap)
        self._stat = None  # the file's os.stat result, once a tensor is mapped

    def metadata(self):
        return self._meta

    def get_tensor(self, name) -> np.ndarray:
        if self._fh is None:
            raise ValueError("the safetensors file is closed")
        e = self._entries[name]
        n = e.end - e.begin
        if n == 0:
            return _array(b"", e, 0, self.path)
        if self._mmap:
            # a mapping of its own per tensor: tensors of one file share no owner (torchfree.save
            # then writes them as the independent tensors they are, not as views of one buffer)
            pos = self._start + e.begin
            base = pos - pos % _mmap.ALLOCATIONGRANULARITY
            try:
                mm = _mmap.mmap(self._fh.fileno(), pos + n - base, offset=base, access=_mmap.ACCESS_COPY)
            except ValueError:  # past the end: the file shrank since its header was read
                raise FormatError(f"{self.path}: file truncated while reading tensor {name!r}") from None
            except OSError:
                mm = None  # out of mappings (vm.max_map_count): read a copy instead
            if mm is not None:
                if self._stat is None:
                    self._stat = os.fstat(self._fh.fileno())
                note_mapping(mm, self._stat)  # writers replace the file while the array lives
                return np.frombuffer(mm, dtype=e.dtype, count=n // e.dtype.itemsize,
                                     offset=pos - base).reshape(e.array_shape)
        out = np.empty(e.array_shape, e.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < n:
            k = os.preadv(self._fh.fileno(), [buf[got:]], self._start + e.begin + got)
            if k <= 0:
                raise FormatError(f"{self.path}: file truncated while reading tensor {name!r}")
            got += k
        return out

    __getitem__ = get_tensor

    def items(self):
        for k in self._entries:
            yield k, self.get_tensor(k)

    def close(self) -> None:
        """Close the file; arrays already returned stay valid (their mappings close with them)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ShardedFile(_Entries):
    """The shards of a ``*.safetensors.index.json`` as one file: headers read up front, tensors on
    demand. Tensors are listed shard by shard, in each shard's header order."""

    def __init__(self, filename, *, mmap=True):
        from ._shardindex import _ShardIndex

        self.path = os.fspath(filename)
        self._index = _ShardIndex(self.path)
        self._mmap = mmap
        self._open: dict = {}
        self._entries = collections.OrderedDict()
        self._where: dict = {}
        self._meta = None
        for shard in self._index.shards:
            if not shard.endswith(".safetensors"):
                raise FormatError(f"{self.path}: shard {shard!r} is not a .safetensors file")
            entries, meta, _, _ = read_header(self._index.files[shard])
            if self._meta is None:
                self._meta = meta
            for e in entries:
                if e.name in self._entries:
                    raise FormatError(f"{self.path}: tensor {e.name!r} is in more than one shard")
                self._entries[e.name] = e
                self._where[e.name] = shard

    def metadata(self):
        """The first shard's ``__metadata__``."""
        return self._meta

    def get_tensor(self, name) -> np.ndarray:
        if self._open is None:
            raise ValueError("the safetensors file is closed")
        shard = self._where[name]
        if shard not in self._open:
            self._open[shard] = SafetensorsFile(self._index.files[shard], mmap=self._mmap)
        return self._open[shard].get_tensor(name)

    __getitem__ = get_tensor

    def items(self):
        for k in self._entries:
            yield k, self.get_tensor(k)

    def close(self) -> None:
        if self._open:
            for f in self._open.values():
                f.close()
        self._open = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def scan(filename):
    """A ``torchfree.CheckpointInfo`` of a safetensors file (header only), or of the shards of a
    ``*.safetensors.index.json``."""
    from ._info import CheckpointInfo, StorageInfo, TensorInfo
    from ._shardindex import _ShardIndex

    path = os.fspath(filename)
    if path.endswith(".index.json"):
        idx = _ShardIndex(path)
        info = CheckpointInfo(path, "sharded safetensors", "little")
        for shard in idx.shards:
            part = scan(idx.files[shard])
            info.records += part.records
            info.storages += [StorageInfo(f"{shard}:{s.key}", s.dtype, s.nbytes, s.location, f"{shard}:{s.record}")
                              for s in part.storages]
            info.tensors += [TensorInfo(t.name, t.dtype, t.shape, t.strides, t.stride, f"{shard}:{t.storage_key}",
                                        t.storage_offset, t.nbytes, t.location, t.torch_dtype) for t in part.tensors]
        return info
    entries, meta, start, size = read_header(path)
    return _info(path, entries, start)


def _info(path, entries, start):
    """The ``CheckpointInfo`` of a checked header's entries (``path`` None for bytes)."""
    from ._info import CheckpointInfo, RecordInfo, StorageInfo, TensorInfo

    info = CheckpointInfo(path, "safetensors", "little")
    info.records = [RecordInfo("header", False, start, start, 0)]
    by_offset = {id(e): i for i, e in enumerate(sorted(entries, key=lambda e: (e.begin, e.end)))}
    for e in entries:
        shape = e.array_shape
        item = e.dtype.itemsize
        stride, c = [], 1
        for s in reversed(shape):
            stride.append(c)
            c *= s
        stride = tuple(reversed(stride))
        key = str(by_offset[id(e)])
        info.storages.append(StorageInfo(key, e.dtype, e.end - e.begin, "cpu", e.name))
        info.tensors.append(TensorInfo(e.name, e.dtype, shape, tuple(s * item for s in stride), stride, key, 0,
                                       e.end - e.begin, "cpu", _TORCH_NAMES.get(e.code, e.dtype.name)))
    info.storages.sort(key=lambda s: int(s.key))
    return info


_TORCH_NAMES = {"F4": "float4_e2m1fn_x2", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu"}
