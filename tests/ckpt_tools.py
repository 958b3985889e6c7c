"""Torch-free tools to rewrite checkpoint zips for tests (used by the oracle tests and by
tests/data/make_fixtures.py).

* :func:`zip_records` / :func:`write_zip`: read all records in order, write them back (stored or
  deflated) with Python's zipfile.
* :func:`storage_swap_units`: for every storage key of a checkpoint, the byte-swap unit of its
  elements (element size; half of it for complex dtypes), found by scanning ``data.pkl`` with a
  stub unpickler that never imports torch or anything else.
* :func:`make_big_endian`: turn a little-endian checkpoint into the file a big-endian host would
  have written: every storage record byte-swapped per element, ``byteorder`` record = ``big``.
"""

from __future__ import annotations

import io
import pickletools
import pickle
import zipfile

import numpy as np

# swap unit in bytes for the legacy (v2) storage classes
V2_STORAGE_UNIT = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "ComplexDoubleStorage": 8, "ComplexFloatStorage": 4,
    "QInt8Storage": 1, "QUInt8Storage": 1, "QInt32Storage": 4, "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
}

# swap unit in bytes for dtypes passed to _rebuild_tensor_v3 (complex: per half)
V3_DTYPE_UNIT = {
    "uint16": 2, "uint32": 4, "uint64": 8, "complex32": 2, "bits16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1, "bits8": 1, "bits1x8": 1, "bits2x4": 1,
    "bits4x2": 1,
    # legacy dtypes can also appear through v3 (bare untyped storages are uint8)
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex128": 8, "complex64": 4,
}


def zip_records(data):
    """[(ZipInfo, bytes)] in central-directory order. CRCs are not checked by the caller's
    tools, but zipfile checks them: use only on files with real CRCs."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info, z.read(info.filename)) for info in z.infolist()]


def write_zip(records, compression=zipfile.ZIP_STORED):
    """Write [(name or ZipInfo, bytes)] as a fresh zip (fixed timestamps, so the output is
    deterministic); returns the bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as z:
        for info, payload in records:
            name = info.filename if isinstance(info, zipfile.ZipInfo) else info
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = compression
            z.writestr(zi, payload)
    return out.getvalue()


def rezip(data, compression=zipfile.ZIP_DEFLATED):
    """Same records, same order, rewritten with ``compression``."""
    return write_zip(zip_records(data), compression)


def record_prefix(data):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        first = z.infolist()[0].filename
    return first.split("/", 1)[0]


# --- data.pkl scan without torch ----------------------------------------------------------

class _Global:
    def __init__(self, module, name, scan):
        self.module, self.name, self.scan = module, name, scan

    def __call__(self, *args):
        if self.name in ("_rebuild_tensor_v3",) and len(args) >= 7:
            storage, dtype = args[0], args[6]
            if isinstance(storage, _StorageRef) and isinstance(dtype, _Global):
                self.scan.v3_dtypes.setdefault(storage.key, dtype.name)
        return _Obj(self, args)


class _Obj:
    def __init__(self, g, args):
        self.g, self.args = g, args

    def __setstate__(self, state):
        self.state = state


class _StorageRef:
    def __init__(self, key, cls, location, numel):
        self.key, self.cls, self.location, self.numel = key, cls, location, numel


class StorageScan(pickle.Unpickler):
    """Unpickles data.pkl with inert stubs; records storage ids and v3 dtypes."""

    def __init__(self, payload):
        super().__init__(io.BytesIO(payload))
        self.storages = {}  # key -> _StorageRef (first use)
        self.v3_dtypes = {}  # key -> dtype name

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            import collections
            return collections.OrderedDict
        return _Global(module, name, self)

    def persistent_load(self, pid):
        tag = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
        assert tag == "storage", pid
        cls, key, location, numel = pid[1], str(pid[2]), pid[3], pid[4]
        ref = _StorageRef(key, cls, location, numel)
        self.storages.setdefault(key, ref)
        return ref


def scan_storages(data):
    """{key: (storage class name, location, numel, v3 dtype name or None)} of a zip checkpoint."""
    prefix = record_prefix(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        payload = z.read(f"{prefix}/data.pkl")
    sc = StorageScan(payload)
    sc.load()
    return {k: (r.cls.name, r.location, r.numel, sc.v3_dtypes.get(k)) for k, r in sc.storages.items()}


def storage_swap_units(data):
    units = {}
    for key, (cls, _loc, _numel, v3) in scan_storages(data).items():
        if cls in V2_STORAGE_UNIT:
            units[key] = V2_STORAGE_UNIT[cls]
        else:
            assert v3 is not None, f"untyped storage {key} without a _rebuild_tensor_v3 dtype"
            units[key] = V3_DTYPE_UNIT[v3]
    return units


def byteswap(payload, unit):
    if unit == 1 or not payload:
        return payload
    assert len(payload) % unit == 0
    dt = {2: np.uint16, 4: np.uint32, 8: np.uint64}[unit]
    return np.frombuffer(payload, dtype=dt).byteswap().tobytes()


def make_big_endian(data):
    """Little-endian torch.save zip -> the same checkpoint as written by a big-endian host."""
    units = storage_swap_units(data)
    prefix = record_prefix(data)
    out, seen_byteorder, swapped = [], False, set()
    for info, payload in zip_records(data):
        rel = info.filename[len(prefix) + 1:]
        if rel == "byteorder":
            assert payload == b"little", payload
            payload = b"big"
            seen_byteorder = True
        elif rel.startswith("data/"):
            key = rel[len("data/"):]
            payload = byteswap(payload, units[key])
            swapped.add(key)
        out.append((info, payload))
    if not seen_byteorder:
        out.insert(1, (f"{prefix}/byteorder", b"big"))
    assert swapped == set(units), (swapped, set(units))
    return write_zip(out, zipfile.ZIP_STORED)


# --- legacy stream (torch.save(..., _use_new_zipfile_serialization=False)) -------------------

LEGACY_SYS_INFO_BE = {"protocol_version": 1001, "little_endian": False,
                      "type_sizes": {"short": 2, "int": 4, "long": 4}}


def legacy_split(data):
    """(the five pickles as bytes, [(key, numel header, blob bytes)], storage scan) of a stream."""
    f = io.BytesIO(data)
    pickles = []
    for _ in range(5):
        start = f.tell()
        for _op in pickletools.genops(f):
            pass
        pickles.append(data[start:f.tell()])
    sc = StorageScan(pickles[3])
    sc.load()
    keys = pickle.loads(pickles[4])
    blobs, pos = [], f.tell()
    for key in keys:
        ref = sc.storages[str(key)]
        unit = V2_STORAGE_UNIT.get(ref.cls.name, 1) * (2 if ref.cls.name.startswith("Complex") else 1)
        numel = int.from_bytes(data[pos:pos + 8], "little", signed=True)
        blobs.append((str(key), numel, data[pos + 8:pos + 8 + numel * unit]))
        pos += 8 + numel * unit
    assert pos == len(data), (pos, len(data))
    return pickles, blobs, sc


def make_big_endian_legacy(data):
    """A little-endian legacy stream -> the same checkpoint as torch writes it on a big-endian
    host: sys_info says so, elements of 2/4/8 bytes were converted to little-endian (so those
    bytes are unchanged), complex64 went over as one 8-byte unit (its halves swapped),
    complex128 and untyped (v3) storages were not converted (big-endian on disk)."""
    pickles, blobs, sc = legacy_split(data)
    out = [pickles[0], pickles[1], pickle.dumps(LEGACY_SYS_INFO_BE, protocol=2), pickles[3], pickles[4]]
    for key, numel, blob in blobs:
        cls = sc.storages[key].cls.name
        if cls == "ComplexFloatStorage":
            blob = np.frombuffer(blob, dtype=np.uint32).reshape(-1, 2)[:, ::-1].tobytes()
        elif cls == "ComplexDoubleStorage":
            blob = byteswap(blob, 8)
        elif cls not in V2_STORAGE_UNIT:
            blob = byteswap(blob, V3_DTYPE_UNIT[sc.v3_dtypes[key]])
        out.append(numel.to_bytes(8, "little", signed=True) + blob)
    return b"".join(out)


class NonSeekable(io.RawIOBase):
    """A read-only stream without seek/tell (like a pipe), giving short reads: load() reads it
    into memory first (API.md)."""

    def __init__(self, data):
        self._b = io.BytesIO(data)

    def readable(self):
        return True

    def seekable(self):
        return False

    def tell(self):
        raise OSError("not seekable")

    def readinto(self, buf):
        chunk = self._b.read(min(len(buf), 1000))
        buf[:len(chunk)] = chunk
        return len(chunk)
