"""``.npz`` archives for the command line: write (as numpy.savez), read, and describe from headers."""

from __future__ import annotations

import collections
import os
import zipfile

import numpy as np

from ._core import FormatError

_EXACT_UPCAST = ("bfloat16", "float8_")


def needs_upcast(dtype) -> bool:
    """The ml_dtypes types (bfloat16, float8_*), which ``.npy`` can only store as opaque ``V2``/``V1``
    records: :func:`save_npz` writes them as float32 (exact) so that ``numpy.load`` reads values."""
    return dtype.kind == "V" and dtype.name.startswith(_EXACT_UPCAST)


def save_npz(tensors, fh, progress=None) -> None:
    """Write ``{name: array}`` as an uncompressed ``.npz`` (what ``numpy.savez`` writes) to a binary
    file object or path, one array at a time; bfloat16/float8 arrays as float32 (see
    :func:`needs_upcast`)."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in tensors.items():
            if arr.dtype.hasobject:
                raise TypeError(f"{name}: object arrays cannot be stored without pickle")
            n = arr.nbytes
            if needs_upcast(arr.dtype):
                arr = arr.astype(np.float32)
            with zf.open(name + ".npy", "w", force_zip64=True) as out:
                np.lib.format.write_array(out, arr, allow_pickle=False)
            del arr
            if progress is not None:
                progress(n)


def load_npz(path) -> "collections.OrderedDict[str, np.ndarray]":
    """Arrays of an ``.npz`` (never unpickles: object arrays raise)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.zip.namelist())
            return collections.OrderedDict((k, z[k]) for k in z.files if k + ".npy" in names)
    except zipfile.BadZipFile as e:
        raise FormatError(f"{os.fspath(path)}: not a valid .npz ({e})") from None


def open_npz(path):
    """``numpy.load`` of an ``.npz``: a lazy mapping name -> array (pickles refused)."""
    try:
        return np.load(path, allow_pickle=False)
    except zipfile.BadZipFile as e:
        raise FormatError(f"{os.fspath(path)}: not a valid .npz ({e})") from None


def scan_npz(path):
    """A ``torchfree.CheckpointInfo`` of an ``.npz``, from the ``.npy`` headers only."""
    from ._info import CheckpointInfo, RecordInfo, StorageInfo, TensorInfo

    path = os.fspath(path)
    info = CheckpointInfo(path, "npz", "little")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise FormatError(f"{path}: not a valid .npz ({e})") from None
    with zf:
        for zi in zf.infolist():
            info.records.append(RecordInfo(zi.filename, zi.compress_type != zipfile.ZIP_STORED, zi.compress_size,
                                           zi.file_size, zi.header_offset))
            if not zi.filename.endswith(".npy"):
                continue
            name = zi.filename[:-4]
            with zf.open(zi) as fh:
                try:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                except ValueError as e:
                    raise FormatError(f"{path}: member {zi.filename}: {e}") from None
            item = dtype.itemsize
            stride, c = [], 1
            for s in (shape if fortran else reversed(shape)):
                stride.append(c)
                c *= s
            stride = tuple(stride if fortran else reversed(stride))
            nbytes = c * item
            order = "<" if dtype.byteorder in "=|" else dtype.byteorder
            if order == ">":
                info.byteorder = "big"
            key = str(len(info.storages))
            info.storages.append(StorageInfo(key, dtype, nbytes, "cpu", zi.filename))
            info.tensors.append(TensorInfo(name, dtype, tuple(shape), tuple(s * item for s in stride), stride, key, 0,
                                           nbytes, "cpu", "bool" if dtype == np.bool_ else dtype.name))
    return info
