"""Zip64 checkpoints: records of 4 GiB and more, records whose local headers lie past 4 GiB,
zip64 extras on small records, the zip64 end record and locator, and malformed zip64 fields.

The archives are written by a small zip writer in this file into sparse files: a record's data
can be left as a hole (the file is seeked past it), so a 4.5 GiB checkpoint costs a few pages of
disk. The data of a hole reads as zeros; its CRC-32 is not computed (torchfree, like torch, does
not check CRCs of records: a stored tensor is mapped, not read). Everything is loaded with mmap
(the default for a path), so nothing but the touched pages is read.

The real 4.5 GB torch.save file is under the ``huge`` marker: it runs only with TORCHFREE_SLOW=1.
"""

from __future__ import annotations

import os
import pickle
import resource
import struct
import sys
import time
import zlib

import numpy as np
import pytest

import torchfree
from conftest import assert_same

GiB = 1 << 30
SAT32 = 0xFFFFFFFF
SAT16 = 0xFFFF

SIG_LOCAL, SIG_CENTRAL = 0x04034B50, 0x02014B50
SIG_EOCD, SIG_Z64_EOCD, SIG_Z64_LOC = 0x06054B50, 0x06064B50, 0x07064B50


# ---------------------------------------------------------------------------------------------
# data.pkl: a protocol-2 pickle of {name: tensor}, written opcode by opcode (as torch.save writes
# it), so these tests need neither torch nor anything importable under the torch names
# ---------------------------------------------------------------------------------------------

STORAGE = {np.dtype(np.uint8): "ByteStorage", np.dtype(np.float32): "FloatStorage",
           np.dtype(np.int64): "LongStorage"}


def _str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(n):
    if 0 <= n < 256:
        return b"K" + bytes([n])
    enc = pickle.encode_long(n)
    return b"\x8a" + bytes([len(enc)]) + enc


def _tuple(items):
    return b"(" + b"".join(_int(i) for i in items) + b"t"


def tensor_pickle(tensors):
    """tensors: {name: (storage key, dtype, storage numel, offset, shape, stride)}."""
    out = [b"\x80\x02ccollections\nOrderedDict\n)R("]
    for name, (key, dtype, numel, offset, shape, stride) in tensors.items():
        out += [_str(name), b"ctorch._utils\n_rebuild_tensor_v2\n(",
                b"(" + _str("storage") + b"ctorch\n" + STORAGE[np.dtype(dtype)].encode() + b"\n"
                + _str(key) + _str("cpu") + _int(numel) + b"tQ",
                _int(offset), _tuple(shape), _tuple(stride), b"\x89",
                b"ccollections\nOrderedDict\n)R", b"tR"]
    out.append(b"u.")
    return b"".join(out)


# ---------------------------------------------------------------------------------------------
# a zip writer for seekable files, with holes and every zip64 choice
# ---------------------------------------------------------------------------------------------

class SparseZip:
    """Write a torch-style checkpoint zip into the open binary file `f`.

    cd_z64: which central-directory fields are saturated (0xFFFFFFFF) with their 8-byte value in
    the zip64 extra: "needed" (only sizes >= 4 GiB - 1 and offsets past it, as torch writes),
    "all" (all three fields on every record, even small ones), "unsaturated" (a full 24-byte
    extra on every record that needs none: the 32-bit fields hold the values and readers
    take values from the extra only for saturated fields; records that need zip64 get the
    extra of "needed", since its fields must appear in order and only when saturated). local_z64: local headers carry a zip64 extra
    (usize, csize) on every record, not only on records of 4 GiB.
    """

    def __init__(self, f, prefix="archive", *, cd_z64="needed", local_z64=False):
        self.f, self.prefix = f, prefix
        self.cd_z64, self.local_z64 = cd_z64, local_z64
        self.entries = []

    def hole(self, n):
        """Leave n bytes of hole before the next record."""
        self.f.seek(n, os.SEEK_CUR)

    def add(self, name, data=b"", *, size=None, patches=()):
        """One stored record: `data`, or (size given) a record of `size` bytes whose data is a
        hole except for `patches` [(offset in the record, bytes)]."""
        full = f"{self.prefix}/{name}".encode()
        size = len(data) if size is None else size
        hoff = self.f.tell()
        crc = zlib.crc32(data) if size == len(data) else 0  # a hole's CRC is not computed
        lextra = b""
        if size >= SAT32 or self.local_z64:
            lextra = struct.pack("<HHQQ", 1, 16, size, size)
        lsize = SAT32 if lextra else size
        self.f.write(struct.pack("<IHHHHHIIIHH", SIG_LOCAL, 45, 0x800, 0, 0, 0x21, crc, lsize, lsize,
                                 len(full), len(lextra)) + full + lextra)
        start = self.f.tell()
        self.f.write(data)
        for off, b in patches:
            self.f.seek(start + off)
            self.f.write(b)
        self.f.seek(start + size)
        self.entries.append(dict(name=full, size=size, hoff=hoff, crc=crc))

    def central_entry(self, e):
        usize, csize, hoff = e["size"], e["size"], e["hoff"]
        vals = [usize, csize, hoff]
        if self.cd_z64 == "all":
            sat = [True, True, True]
        else:
            sat = [v >= SAT32 for v in vals]
        if self.cd_z64 == "unsaturated" and not any(sat):
            extra = struct.pack("<HHQQQ", 1, 24, *vals)
        elif any(sat):
            body = b"".join(struct.pack("<Q", v) for v, s in zip(vals, sat) if s)
            extra = struct.pack("<HH", 1, len(body)) + body
        else:
            extra = b""
        f_us, f_cs, f_off = (SAT32 if s else v for v, s in zip(vals, sat))
        return e.get("cd_head", b"") + struct.pack(
            "<IHHHHHHIIIHHHHHII", SIG_CENTRAL, 0x31E, 45, 0x800, 0, 0, 0x21, e["crc"], f_cs, f_us,
            len(e["name"]), len(extra), 0, 0, 0, 0, f_off) + e["name"] + extra

    def finish(self, *, eocd64="needed", z64_record=None):
        """Central directory, zip64 end record + locator (when needed, or eocd64="always"), end
        record. z64_record: field overrides for the zip64 end record (malformed archives)."""
        cd_off = self.f.tell()
        cd = b"".join(self.central_entry(e) for e in self.entries)
        self.f.write(cd)
        n = len(self.entries)
        need = cd_off >= SAT32 or len(cd) >= SAT32 or n >= SAT16
        if need or eocd64 == "always":
            z64_off = self.f.tell()
            rec = dict(size=44, made=0x31E, needed=45, disk=0, cd_disk=0, n_disk=n, n_total=n,
                       cd_size=len(cd), cd_off=cd_off)
            rec.update(z64_record or {})
            self.f.write(struct.pack("<IQHHIIQQQQ", SIG_Z64_EOCD, rec["size"], rec["made"], rec["needed"],
                                     rec["disk"], rec["cd_disk"], rec["n_disk"], rec["n_total"],
                                     rec["cd_size"], rec["cd_off"]))
            self.f.write(struct.pack("<IIQI", SIG_Z64_LOC, 0, rec.get("loc_off", z64_off), 1))
        self.f.write(struct.pack("<IHHHHIIH", SIG_EOCD, 0, 0, min(n, SAT16), min(n, SAT16),
                                 min(len(cd), SAT32), min(cd_off, SAT32), 0))
        return cd_off


def _sparse_ok(tmp_path):
    """Skip when tmp_path's filesystem cannot leave holes (the tests would write GiBs)."""
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        f.seek(256 << 20)
        f.write(b"x")
    blocks = os.stat(probe).st_blocks * 512
    probe.unlink()
    if blocks > (1 << 20):
        pytest.skip(f"{tmp_path} does not keep holes in sparse files")


def _allocated(path):
    return os.stat(path).st_blocks * 512


def _peak_rss():
    # ru_maxrss is in KiB on Linux and the BSDs, in bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


SMALL = np.arange(6, dtype=np.float32).reshape(2, 3) * 1.5 - 2
LONGS = np.array([-(1 << 40), 7, 1 << 62, -3], dtype=np.int64)


def write_ckpt(path, *, big_size=None, gap=0, cd_z64="needed", local_z64=False, eocd64="needed",
               z64_record=None):
    """A checkpoint with a uint8 record "0" of big_size bytes (a hole with markers at the start,
    at 4 GiB and at the end) when big_size is given, a float32 record "1" (SMALL, and a view of
    it at offset 2), an int64 record "2" (LONGS), version and byteorder. gap: hole bytes before
    the records after data.pkl.
    Returns (markers {offset: bytes} of the big record, layout dict)."""
    tensors = {}
    if big_size is not None:
        tensors["big"] = ("0", np.uint8, big_size, 0, (big_size,), (1,))
    tensors["small"] = ("1", np.float32, 6, 0, (2, 3), (3, 1))
    tensors["small_view"] = ("1", np.float32, 6, 2, (2, 2), (1, 2))
    tensors["longs"] = ("2", np.int64, 4, 0, (4,), (1,))
    markers = {}
    with open(path, "wb") as f:
        z = SparseZip(f, cd_z64=cd_z64, local_z64=local_z64)
        z.add("data.pkl", tensor_pickle(tensors))
        z.add(".format_version", b"1")
        if gap:
            z.hole(gap)
        if big_size is not None:
            for off in (0, 4 * GiB - 3, big_size - 5):
                if off + 5 <= big_size:
                    markers[off] = bytes([(off >> k) & 0xFF | 1 for k in (0, 8, 16, 24, 32)])
            z.add("data/0", size=big_size, patches=list(markers.items()))
        z.add("data/1", SMALL.tobytes())
        z.add("data/2", LONGS.tobytes())
        z.add("version", b"3\n")
        z.add("byteorder", b"little")
        cd_off = z.finish(eocd64=eocd64, z64_record=z64_record)
    return markers, dict(entries=z.entries, cd_off=cd_off)


def check_small(got):
    assert got["small"].dtype == np.float32 and got["small"].shape == (2, 3)
    assert np.array_equal(got["small"], SMALL)
    assert got["small_view"].shape == (2, 2) and got["small_view"].strides == (4, 8)
    assert np.array_equal(got["small_view"], np.lib.stride_tricks.as_strided(
        SMALL.reshape(-1)[2:], (2, 2), (4, 8)))
    assert np.shares_memory(got["small"], got["small_view"])
    assert got["longs"].dtype == np.int64 and np.array_equal(got["longs"], LONGS)


def check_big(big, size, markers):
    assert big.dtype == np.uint8 and big.shape == (size,) and big.strides == (1,)
    for off, b in markers.items():
        assert bytes(big[off:off + len(b)]) == b, f"marker at {off}"
    covered = {off + k for off, b in markers.items() for k in range(len(b))}
    holes = [p for p in (5, 1 << 20, 2 * GiB, 4 * GiB + 3, size - 6) if p < size and p not in covered]
    assert len(holes) >= 3
    for p in holes:  # hole bytes, some right next to the markers
        assert big[p] == 0, f"byte {p}"


# ---------------------------------------------------------------------------------------------
# well-formed zip64 archives
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cd_z64,local_z64", [("needed", False), ("all", True), ("unsaturated", True)])
def test_record_over_4gib(tmp_path, cd_z64, local_z64):
    """(1) a stored record of 4 GiB + 4 KiB + 3 bytes (sizes in zip64 extras), and after it
    records whose local headers lie past 4 GiB (2), a zip64 end record and locator (4);
    mapped, not read."""
    _sparse_ok(tmp_path)
    path = tmp_path / "big.pt"
    size = 4 * GiB + 4096 + 3
    try:
        markers, lay = write_ckpt(path, big_size=size, cd_z64=cd_z64, local_z64=local_z64)
        assert os.path.getsize(path) > size and _allocated(path) < (16 << 20)
        hoffs = {e["name"].decode().split("/", 1)[1]: e["hoff"] for e in lay["entries"]}
        assert hoffs["data/1"] > SAT32 and lay["cd_off"] > SAT32
        rss = _peak_rss()
        got = torchfree.load(path)
        check_big(got["big"], size, markers)
        check_small(got)
        assert _peak_rss() - rss < (512 << 20), "the huge record was read into memory"
        # the lazy reader and scan see the same records
        infos = {r.name: r for r in torchfree.scan(path).records}
        assert infos["data/0"].size == size and infos["data/1"].offset == hoffs["data/1"]
        del got
    finally:
        path.unlink(missing_ok=True)


def test_small_records_past_4gib(tmp_path):
    """(2) small records whose local headers lie past 4 GiB (a hole before them): their offsets
    come from zip64 extras; the central directory starts past 4 GiB too."""
    _sparse_ok(tmp_path)
    path = tmp_path / "far.pt"
    try:
        _, lay = write_ckpt(path, gap=4 * GiB + 12345)
        assert all(e["hoff"] > SAT32 for e in lay["entries"][2:]) and lay["cd_off"] > SAT32
        check_small(torchfree.load(path))
        check_small(torchfree.load(path, mmap=False))  # read with pread at 64-bit offsets
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("cd_z64", ["all", "unsaturated"])
@pytest.mark.parametrize("eocd64", ["needed", "always"])
def test_zip64_extras_on_small_records(tmp_path, cd_z64, eocd64):
    """(3) zip64 extras on records that do not need them (all fields saturated with the values
    in the extra, or the extra beside unsaturated fields), local zip64 extras, and (4) a zip64
    end record in a small archive."""
    path = tmp_path / "small.pt"
    write_ckpt(path, cd_z64=cd_z64, local_z64=True, eocd64=eocd64)
    for kw in ({}, {"mmap": False}):
        check_small(torchfree.load(path, **kw))
    check_small(torchfree.load(path.read_bytes()))


def test_zip64_end_record_with_extensible_data(tmp_path):
    """(4) a zip64 end record longer than 56 bytes (extensible data): found through the
    locator's offset."""
    path = tmp_path / "ext.pt"
    with open(path, "wb") as f:
        z = SparseZip(f)
        z.add("data.pkl", tensor_pickle({"small": ("1", np.float32, 6, 0, (2, 3), (3, 1))}))
        z.add("data/1", SMALL.tobytes())
        z.add("version", b"3\n")
        cd_off = f.tell()
        cd = b"".join(z.central_entry(e) for e in z.entries)
        f.write(cd)
        z64_off = f.tell()
        ext = b"\x01\x00\x04\x00abcd"
        f.write(struct.pack("<IQHHIIQQQQ", SIG_Z64_EOCD, 44 + len(ext), 0x31E, 45, 0, 0, 3, 3, len(cd),
                            cd_off) + ext)
        f.write(struct.pack("<IIQI", SIG_Z64_LOC, 0, z64_off, 1))
        f.write(struct.pack("<IHHHHIIH", SIG_EOCD, 0, 0, SAT16, SAT16, SAT32, SAT32, 0))
    got = torchfree.load(path)
    assert np.array_equal(got["small"], SMALL)


# ---------------------------------------------------------------------------------------------
# against torch (mmap=True, so torch does not read the holes either)
# ---------------------------------------------------------------------------------------------

def test_crafted_zip64_matches_torch(torch, tmp_path):
    """torch itself accepts the crafted sparse archive and gives the same tensors."""
    _sparse_ok(tmp_path)
    path = tmp_path / "big.pt"
    size = 4 * GiB + 5
    try:
        markers, _ = write_ckpt(path, big_size=size, cd_z64="all", local_z64=True)
        exp = torch.load(path, mmap=True, weights_only=True)
        got = torchfree.load(path)
        assert list(got) == list(exp)
        assert_same({k: got[k] for k in ("small", "small_view", "longs")},
                    {k: exp[k] for k in ("small", "small_view", "longs")})
        tb = exp["big"]
        assert got["big"].shape == tuple(tb.shape)
        for off, b in markers.items():
            sl = slice(off - 3 if off else 0, off + len(b) + 3)
            assert np.array_equal(got["big"][sl], tb[sl].numpy()), f"bytes around {off}"
        del exp, tb, got
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# malformed zip64 fields
# ---------------------------------------------------------------------------------------------

class RawZip(SparseZip):
    def central_entry(self, e):
        if "raw" not in e:
            return super().central_entry(e)
        f_cs, f_us, f_off, extra = e["raw"]
        return struct.pack("<IHHHHHHIIIHHHHHII", SIG_CENTRAL, 0x31E, 45, 0x800, 0, 0, 0x21, e["crc"], f_cs,
                           f_us, len(e["name"]), len(extra), 0, 0, 0, 0, f_off) + e["name"] + extra


def write_raw(path, raw, *, eocd64="always", z64_record=None, gap=0):
    """The small checkpoint with central entry i of `raw` {i: (csize, usize, hoff, extra)}."""
    with open(path, "wb") as f:
        z = RawZip(f)
        z.add("data.pkl", tensor_pickle({"small": ("1", np.float32, 6, 0, (2, 3), (3, 1))}))
        if gap:
            z.hole(gap)
        z.add("data/1", SMALL.tobytes())
        z.add("version", b"3\n")
        for i, r in raw.items():
            z.entries[i]["raw"] = r
        z.finish(eocd64=eocd64, z64_record=z64_record)
    return z.entries


def z64x(*vals, length=None):
    body = b"".join(struct.pack("<Q", v) for v in vals)
    return struct.pack("<HH", 1, len(body) if length is None else length) + body


MALFORMED = {
    # sizes in the extra far beyond the file
    "size_beyond_file": {1: (SAT32, SAT32, None, z64x(5 * GiB, 5 * GiB))},
    "size_2_64": {1: (SAT32, SAT32, None, z64x(2**64 - 1, 2**64 - 1))},
    # stored record whose zip64 sizes disagree
    "stored_sizes_differ": {1: (SAT32, SAT32, None, z64x(24, 25))},
    # saturated header offset without its 8 bytes in the extra
    "extra_lacks_offset": {1: (SAT32, SAT32, SAT32, z64x(24, 24))},
    # extra length claims more bytes than the extra area holds
    "extra_runs_past_end": {1: (SAT32, SAT32, None, z64x(24, 24, length=40))},
    # two zip64 extras in one entry
    "two_zip64_extras": {1: (SAT32, SAT32, None, z64x(24, 24) + z64x(24, 24))},
    # header offset in the extra points past the file / into the central directory / at 0
    "offset_beyond_file": {1: (24, 24, SAT32, z64x(6 * GiB))},
    "offset_into_data_pkl": {1: (24, 24, SAT32, z64x(40))},
    # a record claims a size that runs over the next record
    "overlaps_next": {1: (SAT32, SAT32, None, z64x(24 + 100, 24 + 100))},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_zip64_extra(tmp_path, case):
    path = tmp_path / f"{case}.pt"
    entries = write_raw(path, {})
    hoff = entries[1]["hoff"]
    raw = {}
    for i, (cs, us, off, extra) in MALFORMED[case].items():
        raw[i] = (cs, us, entries[i]["hoff"] if off is None else off, extra)
    write_raw(path, raw)
    assert entries[1]["hoff"] == hoff
    for kw in ({}, {"mmap": False}):
        with pytest.raises(torchfree.FormatError):
            torchfree.load(path, **kw)


MALFORMED_END = {
    "cd_offset_beyond": dict(cd_off=8 * GiB),
    "cd_size_beyond": dict(cd_size=8 * GiB),
    "cd_size_short": dict(cd_size=46),
    "entries_2_40": dict(n_disk=1 << 40, n_total=1 << 40),
    "entries_more_than_cd": dict(n_disk=4, n_total=4),
    "entries_fewer_than_cd": dict(n_disk=2, n_total=2),
    "several_disks": dict(n_disk=1),
    "locator_points_nowhere": dict(size=60, loc_off=5 * GiB),
    "record_size_wrong": dict(size=1 << 40),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_END))
def test_malformed_zip64_end_record(tmp_path, case):
    path = tmp_path / f"{case}.pt"
    write_raw(path, {}, z64_record=MALFORMED_END[case])
    with pytest.raises(torchfree.FormatError):
        torchfree.load(path)


@pytest.mark.parametrize("field", ["cd_size", "cd_off"])
def test_saturated_end_record_without_locator(tmp_path, field):
    """An end record with a saturated (zip64) field but no zip64 locator before it."""
    path = tmp_path / "nolocator.pt"
    write_raw(path, {}, eocd64="needed")
    raw = bytearray(path.read_bytes())
    eocd = raw.rindex(struct.pack("<I", SIG_EOCD))
    assert raw[eocd - 20:eocd - 16] != struct.pack("<I", SIG_Z64_LOC)
    struct.pack_into("<I", raw, eocd + (12 if field == "cd_size" else 16), SAT32)
    path.write_bytes(bytes(raw))
    with pytest.raises(torchfree.FormatError, match="saturated"):
        torchfree.load(path)


def test_zip64_offset_into_a_hole(tmp_path):
    """A zip64 header offset past 4 GiB that lands in a hole (zeros, no local header)."""
    _sparse_ok(tmp_path)
    path = tmp_path / "hole.pt"
    try:
        entries = write_raw(path, {}, gap=5 * GiB)
        far = entries[1]["hoff"]
        write_raw(path, {1: (24, 24, SAT32, z64x(far - GiB))}, gap=5 * GiB)
        with pytest.raises(torchfree.FormatError, match="local header"):
            torchfree.load(path)
    finally:
        path.unlink(missing_ok=True)


def test_huge_record_truncated(tmp_path):
    """A 4 GiB record whose zip64 size runs past the end of a (sparse) file."""
    _sparse_ok(tmp_path)
    path = tmp_path / "trunc.pt"
    size = 4 * GiB + 100
    try:
        write_ckpt(path, big_size=size)
        # grow the claimed size of data/0 by 1 GiB: past the next records and the file end
        with open(path, "r+b") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            tail_len = min(end, 1 << 16)
            f.seek(end - tail_len)
            tail = bytearray(f.read())
            pos = tail.find(b"archive/data/0" + struct.pack("<HH", 1, 16))
            assert pos > 0
            q = pos + len(b"archive/data/0") + 4
            struct.pack_into("<QQ", tail, q, size + GiB, size + GiB)
            f.seek(end - tail_len)
            f.write(tail)
        with pytest.raises(torchfree.FormatError):
            torchfree.load(path)
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# a real > 4 GiB torch.save file (TORCHFREE_SLOW=1)
# ---------------------------------------------------------------------------------------------

@pytest.mark.huge
def test_real_torch_save_over_4gib(torch, tmp_path):
    """torch 2.13 writes a 4.5 GB (4 GiB + 200 MiB) uint8 tensor plus small tensors after it (their records past
    4 GiB); torchfree maps it and agrees with torch.load(mmap=True) on slices and a CRC-32 of
    the whole tensor."""
    import shutil

    n = 4 * GiB + 200 * (1 << 20)
    free = shutil.disk_usage(tmp_path).free
    if free < n + 2 * GiB:
        pytest.skip(f"needs {(n + 2 * GiB) / 1e9:.1f} GB free in {tmp_path}, has {free / 1e9:.1f}")
    path = tmp_path / "huge.pt"
    try:
        t0 = time.monotonic()
        big = torch.arange(256, dtype=torch.uint8).repeat(n // 256)
        g = torch.Generator().manual_seed(0)
        for at in (0, 4 * GiB - 7, n - 64):
            big[at:at + 64] = torch.randint(0, 256, (64,), dtype=torch.uint8, generator=g)
        obj = {"big": big, "after": torch.randn(3, 5, generator=g), "view": big[4 * GiB - 10:4 * GiB + 10],
               "ids": torch.arange(7)}
        torch.save(obj, path)
        del obj, big
        t_save = time.monotonic() - t0
        t0 = time.monotonic()
        got = torchfree.load(path)
        t_load = time.monotonic() - t0
        exp = torch.load(path, mmap=True, weights_only=True)
        assert list(got) == list(exp)
        assert_same({k: got[k] for k in ("after", "view", "ids")}, {k: exp[k] for k in ("after", "view", "ids")},
                    sharing=False)
        a, tb = got["big"], exp["big"]
        assert a.shape == tuple(tb.shape) and a.dtype == np.uint8
        for sl in (slice(0, 4096), slice(4 * GiB - 4096, 4 * GiB + 4096), slice(n - 4096, n),
                   slice(2 * GiB, 2 * GiB + 999)):
            assert np.array_equal(a[sl], tb[sl].numpy()), sl
        assert np.shares_memory(a, got["view"])
        t0 = time.monotonic()
        crc_ours = zlib.crc32(memoryview(a))
        t_crc = time.monotonic() - t0
        crc_torch = zlib.crc32(memoryview(tb.numpy()))
        assert crc_ours == crc_torch
        print(f"\nsave {t_save:.1f}s, torchfree.load {t_load * 1e3:.1f} ms, crc32 over "
              f"{n / 1e9:.2f} GB {t_crc:.1f}s")
        del got, exp, a, tb
    finally:
        path.unlink(missing_ok=True)
