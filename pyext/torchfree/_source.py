"""An input opened for the C core (``Source``), the core's options for load()'s arguments (map_location
classified once, here), and the one function that runs a load of a zip or legacy file (``run_load``,
used by load, Checkpoint.load, sharded loads and torchfree.torch); safetensors inputs, told by content."""

from __future__ import annotations

import errno
import io
import mmap as _mmap
import os
import stat as _stat

from . import _core
from ._core import CheckpointError, FormatError
from ._files import note_mapping

__all__ = ["Source", "is_index_json", "is_safetensors", "load_file", "load_safetensors",
           "options", "run_load", "safetensors_entries", "safetensors_input", "safetensors_meta"]

# must match src/loader.h
_SRC_MAP, _SRC_COPY, _SRC_FD, _SRC_PYFILE = 0, 1, 2, 3
_ZIP_MAGIC = b"PK\x03\x04"


def run_load(f, mmap, opts, *, shared=False, zip_byteorder=None, legacy_end=None):
    """Open f as a Source, run _core.load_zip or _core.load_legacy on it with the core's options
    ``opts`` (``options()``), close it. torchfree.torch's extras: ``zip_byteorder()`` gives a zip's
    default_byteorder; ``legacy_end(end)`` is told where a legacy stream ends (before the close)."""
    src = Source(f, mmap, shared=shared)
    try:
        if src.format == "zip":
            if zip_byteorder is not None:
                return _core.load_zip(*src.args(), **src.kwargs(), **opts, default_byteorder=zip_byteorder())
            return _core.load_zip(*src.args(), **src.kwargs(), **opts)
        if legacy_end is None:
            return _core.load_legacy(*src.args(), **src.kwargs(), **opts)
        obj, end = _core.load_legacy(*src.args(), **src.kwargs(), **opts, with_end=True)
        legacy_end(end)
        return obj
    finally:
        src.close()


def load_file(f, map_location, mmap, opts):
    """load() of one file, not a shard index: a safetensors file (told by its header, whatever its
    name) as ``load_safetensors``, else a zip / legacy stream / tar by ``run_load``."""
    st = safetensors_input(f)
    if st is not None:
        return load_safetensors(*st, map_location, mmap)
    return run_load(f, mmap, opts)


def is_index_json(f) -> bool:
    """Whether f names a sharded checkpoint's index (``*.index.json``): load, scan and open send it
    to _shards."""
    return isinstance(f, (str, os.PathLike)) and os.fspath(f).endswith(".index.json")


_is_index_json = is_index_json


def is_safetensors(head: bytes, size: int) -> bool:
    """Whether an input whose first bytes are ``head`` (of ``size`` bytes in all) is a safetensors
    file: an 8-byte little-endian header length N, then N bytes of JSON starting with ``{``. A zip,
    a legacy stream or a tar never has ``{`` at byte 8 after a length that fits; a ``{`` there after a
    length that does not fit, in nothing torch writes, is a damaged safetensors header (its reader
    then says what is wrong)."""
    if len(head) < 9 or head[8:9] != b"{" or head.startswith(_ZIP_MAGIC):
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 or not _format_of(head)


def safetensors_input(f):
    """``("path", path)`` or ``("buffer", bytes-like)`` when ``f`` is a safetensors file, else None
    (told by content, not by name; a file object is then read whole from its position)."""
    if isinstance(f, (str, os.PathLike)):
        try:
            fd = os.open(f, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        except OSError:
            return None  # Source says why
        try:
            st = os.fstat(fd)
            if not _stat.S_ISREG(st.st_mode):
                return None
            head = os.pread(fd, 9, 0)
        finally:
            os.close(fd)
        return ("path", os.fspath(f)) if is_safetensors(head, st.st_size) else None
    if isinstance(f, (bytes, bytearray, memoryview, _mmap.mmap)):
        view = memoryview(f)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        return ("buffer", f) if is_safetensors(bytes(view[:9]), view.nbytes) else None
    if hasattr(f, "read") and hasattr(f, "seek"):
        start = _tell(f)
        if start is None:
            return None
        end = f.seek(0, io.SEEK_END)
        f.seek(start)
        head = f.read(9)
        f.seek(start)
        if not isinstance(head, bytes) or not is_safetensors(head, end - start):
            return None
        return "buffer", _read_rest(f)
    return None


def safetensors_meta(map_location) -> bool:
    """Whether ``map_location`` sends a safetensors file's tensors (all saved on "cpu") to "meta"."""
    target = _core.map_target(map_location, "cpu")
    if target is None:
        raise TypeError("map_location as a callable needs torch storages, which a safetensors file does not "
                        "have: pass a location string or a dict")
    return target.split(":")[0] == "meta"


def safetensors_entries(buf):
    """(header entries, data start) of safetensors bytes, checked."""
    from . import safetensors as st

    view = memoryview(buf).cast("B")
    size = len(view)
    n, start = st._split(size, bytes(view[:8]) if size >= 8 else b"", "<bytes>")
    return st.parse_header(bytes(view[8:start]), size - start, "<bytes>")[0], start


def load_safetensors(kind, src, map_location=None, mmap=None):
    """load() of a safetensors file: what ``torchfree.safetensors.load_file`` returns (an OrderedDict
    of arrays), or ``MetaArray``s for ``map_location="meta"``."""
    import collections

    from . import safetensors as st
    from ._types import MetaArray

    meta = safetensors_meta(map_location)
    if kind == "path":
        if meta:
            entries = st.read_header(src)[0]
        else:
            return st.load_file(src, mmap=mmap is not False)
    else:
        if mmap:
            raise ValueError("f must be a file path in order to use the mmap argument")
        if meta:
            entries = safetensors_entries(src)[0]
        else:  # arrays over a buffer of our own: writable, as load's arrays are
            return st.load(src if isinstance(src, bytearray) else bytearray(src))
    return collections.OrderedDict((e.name, MetaArray(e.array_shape, e.dtype)) for e in entries)


def _safe_globals(sg):
    if sg is None:
        return None
    if isinstance(sg, dict):
        return {str(k): v for k, v in sg.items()}
    out = {}
    for obj in sg:
        if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], str):
            obj, name = obj
        else:
            name = f"{obj.__module__}.{obj.__qualname__}"
        out[name] = obj
    return out


def _limits(lim):
    """load(..., limits=) checked and completed: {name: int} for every name of LIMITS."""
    if lim is None:
        return None
    unknown = set(lim) - set(_core.LIMITS)
    if unknown:
        raise TypeError(f"unknown limits: {sorted(unknown)}; known: {list(_core.LIMITS)}")
    return {**_core.LIMITS, **{k: int(v) for k, v in lim.items()}}


_HEAD = 512  # enough to see a tar header's "ustar" at byte 257


def _format_of(head: bytes) -> str:
    """"zip", "legacy" (the magic-number stream or a tar archive: _core.load_legacy tells them
    apart) or "" (neither)."""
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[257:262] == b"ustar" or head[:1] == b"\x80":  # tar, or a pickle's PROTO opcode
        return "legacy"
    if head.startswith(_TEXT_MAGIC):  # a legacy stream pickled with protocol 0 or 1
        return "legacy"
    return ""


# the magic number 0x1950a86a20f9469cfc6c as protocol 0/1 pickle it (LONG; INT as Python 2 may)
_TEXT_MAGIC = (b"L119547037146038801333356L\n.", b"L119547037146038801333356\n.", b"I119547037146038801333356\n.")


def _not_zip(head: bytes):
    if len(head) < 4:
        return FormatError("file is empty or too short to be a checkpoint")
    return FormatError(
        f"not a torch checkpoint (starts with {head[:8]!r}; expected a zip archive, a legacy "
        "torch.save stream or a tar archive)"
    )


class Source:
    """An opened input: the arguments the C core reads it with, and what keeps it alive.

    ``lazy`` sources (scan, open) read only what is asked for: a path is mapped (or, with
    ``mmap=False``, kept open and read with pread), a seekable file object is read with
    seek/readinto; one-shot loads read file objects into memory first. Legacy streams and tars
    (``format == "legacy"``) are always a buffer: a read-only mapping of a path, or the bytes.
    """

    def __init__(self, f, mmap=None, *, lazy=False, shared=False):
        self._file = None  # the descriptor pread reads (mmap=False), closed by close()
        self._mapping = None
        self.drop_pages = False  # the buffer is a private mapping of a path, made for this call alone
        self.format = "zip"
        if isinstance(f, (str, os.PathLike)):
            self.path = os.fspath(f)
            self._open_path(mmap, shared)
            return
        self.path = None
        if mmap:
            raise ValueError("f must be a file path in order to use the mmap argument")
        if isinstance(f, (bytes, bytearray, memoryview, _mmap.mmap)):
            buf = memoryview(f).cast("B") if isinstance(f, memoryview) else f
            self._set_buffer(buf, _SRC_COPY)
        elif hasattr(f, "read"):
            start = _tell(f) if lazy else None
            if start is not None:
                end = f.seek(0, io.SEEK_END)
                f.seek(start)
                head = f.read(_HEAD)
                f.seek(start)
                fmt = _format_of(head)
                if not fmt:
                    raise _not_zip(head)
            if start is not None and fmt == "zip":
                self.src, self.size, self.mode = (f, start), max(end - start, 0), _SRC_PYFILE
                self.require_map = False
            else:  # one-shot loads, non-seekable streams, and legacy/tar (read whole)
                self._set_buffer(_read_rest(f), _SRC_MAP)
        else:
            raise TypeError(f"expected a path, a bytes-like object or a binary file object, not {type(f).__name__}")

    def _set_buffer(self, buf, mode):
        head = bytes(memoryview(buf)[:_HEAD])
        self.format = _format_of(head)
        if self.format != "zip":
            if not self.format:
                raise _not_zip(head)
            mode = _SRC_COPY  # storages are copied out of the buffer
        self.src, self.mode, self.require_map = buf, mode, False
        self.size = buf.nbytes if isinstance(buf, memoryview) else len(buf)

    def _open_path(self, mmap, shared=False):
        """shared (with mmap=True; torch mode, for torch.serialization.set_default_mmap_options(
        MAP_SHARED)): a zip is mapped shared and writable, so writes to its tensors reach the file."""
        # a bare descriptor, no file object: io.open costs several times os.open (a scan of a
        # small file is ~0.3 ms in all)
        fd = fh = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        try:
            st = os.fstat(fd)
            if _stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self.path)
            self.size = st.st_size
            head = os.pread(fd, _HEAD, 0)
            self.format = _format_of(head)
            if self.format != "zip":
                if not self.format:
                    raise _not_zip(head)
                if mmap:
                    raise CheckpointError(
                        "mmap can only be used with files saved with torch.save(<f>, "
                        "_use_new_zipfile_serialization=True) (the default since torch 1.6): this is "
                        "a legacy stream or tar archive, which is read into memory (mmap=None or False)"
                    )
                # storages are copied out of a read-only mapping, which closes on return
                # (mode MAP tells the core the buffer is a file mapping, whose pages it may drop)
                self._mapping = _mmap.mmap(fd, 0, access=_mmap.ACCESS_READ)
                note_mapping(self._mapping, st)  # writers replace the file, never rewrite it
                self.src, self.mode, self.require_map = self._mapping, _SRC_MAP, False
                return
            self.require_map = bool(mmap)
            if mmap is False:
                self.src, self.mode, self._file = fd, _SRC_FD, fh
                fh = None
            elif shared and mmap:
                wfd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
                try:
                    self._mapping = _mmap.mmap(wfd, 0, access=_mmap.ACCESS_WRITE)
                finally:
                    os.close(wfd)
                note_mapping(self._mapping, st)  # for as long as arrays view it (_files.py)
                self.src, self.mode = self._mapping, _SRC_MAP
            else:
                self._mapping = _mmap.mmap(fd, 0, access=_mmap.ACCESS_COPY)
                note_mapping(self._mapping, st)  # for as long as arrays view it (_files.py)
                self.src, self.mode = self._mapping, _SRC_MAP
                self.drop_pages = True
        finally:
            if fh is not None:
                os.close(fh)

    def args(self):
        return (self.src, self.size)

    def kwargs(self):
        """The core's source options. drop_pages lets a one-shot zip load drop the pages of the
        mapping it has read (the core decides when that is safe; Archive never does)."""
        return {"mode": self.mode, "require_map": self.require_map, "drop_pages": self.drop_pages}

    def __del__(self):
        if getattr(self, "_file", None) is not None:  # a descriptor never closed (an unclosed open())
            try:
                os.close(self._file)
            except OSError:
                pass
            self._file = None

    def close(self):
        """Close the file; the mapping stays alive as long as arrays view it."""
        if self._file is not None:
            os.close(self._file)
            self._file = None
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                pass  # arrays still view it: it closes when they are gone
            self._mapping = None
        self.src = None


def _tell(f):
    try:
        if hasattr(f, "seekable") and not f.seekable():
            return None
        return f.tell()
    except (OSError, AttributeError, ValueError):
        return None


def options(map_location=None, weights_only=True, safe_globals=None, encoding="utf-8", limits=None):
    """The keyword arguments of the C core for these load() options (map_location checked and
    normalized by the core's one classifier, before any file is opened)."""
    return dict(
        map_location=_core.map_location(map_location),
        weights_only=bool(weights_only),
        safe_globals=_safe_globals(safe_globals),
        encoding=None if encoding == "bytes" else str(encoding),
        limits=_limits(limits),
        torch=None,  # torchfree.torch sets its helpers here (torch objects instead of arrays)
    )


def _read_rest(f) -> bytearray:
    """Everything from the file object's position, in memory we own."""
    try:
        pos = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(pos)
    except (OSError, AttributeError, ValueError):
        return bytearray(f.read())
    buf = bytearray(max(end - pos, 0))
    view = memoryview(buf)
    got = 0
    readinto = getattr(f, "readinto", None)
    while got < len(buf):
        if readinto is not None:
            n = readinto(view[got:])
        else:
            chunk = f.read(len(buf) - got)
            n = len(chunk)
            view[got : got + n] = chunk
        if not n:
            break
        got += n
    del view
    if got < len(buf):
        del buf[got:]
    return buf
