"""save(): write numpy objects as a checkpoint that torch.load reads back.

The byte work (walking the object, grouping arrays into storages, pickling,
the zip layout and writing the tensor bytes with the GIL released) is in the
C core (src/save.c); this module opens the target: paths (atomically by
default) or file objects.
"""

from __future__ import annotations

import os

from . import _core
from ._files import atomic_write, check_file_object, check_parent, open_rewrite

__all__ = ["save"]

_FORMATS = ("zip", "legacy")


def save(obj, f, *, pickle_protocol=2, format="zip", atomic=True):
    """Write ``obj`` as a checkpoint that ``torch.load(f, weights_only=True)`` reads back.

    Arrays come back from torch as tensors with the same values, dtypes, shapes, strides
    and storage sharing: arrays that view one buffer become one storage record (views of
    a ``torchfree.Storage`` from ``torchfree.load`` share the whole storage, exactly as
    torch wrote it; views of any other buffer share the span of it that they cover).
    For the same objects the zip file is byte for byte what ``torch.save`` writes.

    Args:
        obj: nested ``dict`` / ``OrderedDict`` / ``Counter`` / ``list`` / ``tuple`` / ``set``
            of ``str``, ``bytes``, ``bytearray``, ``int``, ``float``, ``complex``, ``bool``,
            ``None``, numpy arrays (every dtype torch has: bool, int8-64, uint8-64,
            float16/32/64, complex64/128 and the ml_dtypes bfloat16 and float8 kinds),
            numpy dtypes, and what ``torchfree.load`` returns (``MetaArray``, ``Storage``,
            ``QuantizedArray``, ``SparseArray``: written as torch writes quantized and sparse
            tensors; per-channel float-qparams tensors as ``per_channel_affine``, as torch does).
        f: a path (``str`` / ``os.PathLike``) or a binary file object with ``write``
            (written in one sequential pass: non-seekable streams work). A file object
            whose file this process maps is refused before anything is written.
        pickle_protocol: 2, the only protocol whose opcodes torch's weights-only
            unpickler understands.
        format: ``"zip"`` (torch >= 1.6, the default) or ``"legacy"`` (the pre-1.6 stream,
            which torch 1.x and 2.x read; not for the dtypes torch added later:
            uint16/32/64 and the float8 kinds).
        atomic: for paths, write a temporary file in the same directory, fsync it,
            rename it over ``f`` and fsync the directory, so that a crash at any moment
            leaves either the old file or the new one. ``False`` writes ``f`` in place
            (as ``torch.save`` does), without fsync, except a file that arrays or tensors
            of this process map (a load with mmap, the default of ``torchfree.load``):
            that one is still written to a temporary file renamed over it (no fsync), so
            that the mappings keep the old file's bytes (truncating it would kill the
            process with SIGBUS when they are read).

    Notes:
        Arrays are written in their own dtype (a ``complex64`` array that ``load`` upcast from
        ``complex32`` stays ``complex64``); non-native byte orders are written little-endian;
        arrays torch cannot view (negative strides, strides or offsets off the item size) are
        written as contiguous copies of their own. Every storage is tagged ``"cpu"``.
        ``b""`` is written as ``_codecs.encode('', 'latin1')`` (pickle's ``bytes()`` is not in
        torch's weights-only allowlist). Numpy scalars, ``frozenset``, ``slice``, ``range``,
        ``argparse.Namespace`` and ``torchfree.Opaque`` placeholders are refused: torch's
        weights-only unpickler cannot rebuild them.

    Raises:
        TypeError: an object torch's weights-only unpickler could not rebuild (the message
            names its key path), or an array dtype torch does not have.
        ValueError: arrays viewing the same bytes as different dtypes (as ``torch.save``),
            a bad ``format`` / ``pickle_protocol``, a path with an empty file name.
        OverflowError: an int of more than 255 bytes.
        OSError: from writing; ``errno.ETXTBSY`` for a file object whose file this process
            maps; a mapped path that cannot be replaced by renaming (its folder not writable)
            raises with the file left as it was. Errors name ``f``, never the temporary file;
            ``FileNotFoundError`` ("Parent directory ... does not exist") for a missing folder;
            with ``atomic=True`` a writable file in a folder that is not writable raises an error
            that says ``atomic=False`` would write it.
    """
    if pickle_protocol != 2:
        raise ValueError(
            f"pickle_protocol={pickle_protocol!r} is not supported: torchfree writes protocol 2, the only "
            "one torch.load(weights_only=True) reads")
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, not {format!r}")
    legacy = format == "legacy"
    if isinstance(f, (str, bytes, os.PathLike)):
        path = os.fsdecode(os.fspath(f))
        name = _archive_name(path)
        if atomic:
            _save_atomic(obj, path, name, legacy)
            return
        check_parent(path)
        fd = open_rewrite(path)
        if fd is None:  # arrays of this process map the file: a new file, renamed over it
            atomic_write(path, lambda fd: _core.save(obj, fd, name, legacy), sync=False, mapped=True)
            return
        try:
            _core.save(obj, fd, name, legacy)
        finally:
            os.close(fd)
        return
    if not callable(getattr(f, "write", None)):
        raise TypeError(f"save() expects a path or a binary file object with write(), not {type(f).__name__}")
    check_file_object(f)
    _core.save(obj, f, "archive", legacy)


def _archive_name(path: str) -> str:
    """The zip's top folder torch 2.x gives a path: the last component without its last
    extension ("model.v1.pt" -> "model.v1"); "archive" for names that are not ASCII (torch
    2.x writes those through a Python stream)."""
    if not path.isascii():
        return "archive"
    start = max(path.rfind("/"), path.rfind("\\")) + 1
    base = path[start:]
    dot = base.rfind(".")
    if dot >= 0:
        base = base[:dot]
    if not base:
        raise ValueError(f"invalid file name: {path!r} (torch needs a name before the extension)")
    return base


def _save_atomic(obj, path: str, name: str, legacy: bool) -> None:
    # sync=True: writeback starts while writing, so the fsync that follows is short
    atomic_write(path, lambda fd: _core.save(obj, fd, name, legacy, sync=True),
                 in_place_hint="save(..., atomic=False) writes it in place (without the crash safety)")
