"""Tests of the Python-free zip reader (src/zipread.c) through tests/c/zipdump.c.

The C driver is compiled twice with gcc: once with the project's warning flags
and -Werror, once more with -fsanitize=address,undefined. Python's zipfile and
zlib are the oracle for names, sizes, data offsets and bytes.
"""

import json
import os
import shutil
import struct
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
SAMPLES = DATA / "samples"
CORPUS = DATA / "corpus"

WARN = ["-std=c11", "-Wall", "-Wextra", "-Wshadow", "-Werror", "-fvisibility=hidden"]
SOURCES = [REPO / "tests" / "c" / "zipdump.c", REPO / "src" / "zipread.c", REPO / "src" / "zipentry.c",
           REPO / "src" / "common.c"]

ST_FORMAT, ST_LIMIT = 1, 2

# ----------------------------------------------------------------- building


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot build the C zip reader tests")
    out = tmp_path_factory.mktemp("zipdump")
    built = {}
    for kind, extra in (
        ("plain", ["-O2"]),
        ("asan", ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer"]),
    ):
        exe = out / f"zipdump_{kind}"
        cmd = [gcc, *WARN, *extra, "-UNDEBUG", "-o", str(exe), *map(str, SOURCES), "-lz"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"compile failed: {' '.join(cmd)}\n{res.stderr}"
        built[kind] = exe
    return built


ASAN_ENV = dict(os.environ, ASAN_OPTIONS="abort_on_error=0:detect_leaks=1", LSAN_OPTIONS="exitcode=23",
                UBSAN_OPTIONS="print_stacktrace=1")


def run(exe, path, *args, binary=False):
    res = subprocess.run([str(exe), *args, str(path)], capture_output=True, env=ASAN_ENV, timeout=60)
    assert res.returncode in (0, 1), (
        f"{exe.name} {' '.join(args)} {path}: exit {res.returncode}\n"
        f"{res.stdout[-2000:]!r}\n{res.stderr.decode(errors='replace')[-4000:]}"
    )
    assert not res.stderr, res.stderr.decode(errors="replace")[-4000:]
    return res.returncode, (res.stdout if binary else res.stdout.decode())


def listing(exe, path, *args):
    """Parse zipdump's listing: (prefix, {name: (method, csize, usize, data_offset, crc[, xcrc])})."""
    rc, out = run(exe, path, *args)
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("PREFIX ")
    prefix = lines[0][len("PREFIX "):]
    entries = {}
    for line in lines[1:]:
        parts = line.rsplit(" ", 6 if "--verify" in args else 5)
        name, nums = parts[0], parts[1:]
        entries[name] = (int(nums[0]), int(nums[1]), int(nums[2]), int(nums[3]), *(int(x, 16) for x in nums[4:]))
    return prefix, entries


def error_of(exe, path, *args):
    rc, out = run(exe, path, *args)
    assert rc == 1, f"expected an error, got:\n{out[:2000]}"
    last = out.splitlines()[-1]
    assert last.startswith("ERROR "), out
    _, status, offset, detail = last.split(" ", 3)
    return int(status), int(offset), detail


# ------------------------------------------------------------------- oracle


def oracle(path):
    """What Python's zipfile says about a file: prefix and per-entry facts."""
    raw = Path(path).read_bytes()
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    prefix = infos[0].filename.split("/", 1)[0]
    entries = {}
    for info in infos:
        assert info.filename.startswith(prefix + "/")
        h = info.header_offset
        assert raw[h:h + 4] == b"PK\x03\x04"
        nl, xl = struct.unpack_from("<HH", raw, h + 26)
        data_off = h + 30 + nl + xl
        comp = raw[data_off:data_off + info.compress_size]
        data = comp if info.compress_type == 0 else zlib.decompress(comp, -15)
        assert len(data) == info.file_size
        entries[info.filename[len(prefix) + 1:]] = (
            info.compress_type, info.compress_size, info.file_size, data_off, info.CRC, zlib.crc32(data), data)
    return prefix, entries


def check_against_oracle(tools, path):
    prefix, want = oracle(path)
    for exe, args in ((tools["plain"], ("--verify",)), (tools["asan"], ("--verify", "--mem"))):
        got_prefix, got = listing(exe, path, *args)
        assert got_prefix == prefix
        assert list(got) == list(want), "entry names or order differ"
        for name, w in want.items():
            method, csize, usize, off, crc, xcrc, _ = w
            assert got[name] == (method, csize, usize, off, crc, xcrc), name
    return prefix, want


def zip_samples():
    return sorted(p for p in SAMPLES.glob("*.pt") if zipfile.is_zipfile(p))


def corpus_zips():
    rows = [json.loads(line) for line in (CORPUS / "MANIFEST.jsonl").read_text().splitlines() if line.strip()]
    return [(CORPUS / r["path"], r) for r in rows if r.get("format") == "zip"]


# ------------------------------------------------------------ crafted zips


def deflate_raw(data, level=6):
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def build_zip(members, *, zip64=False, z64_entries=(), z64_extra_override=None, count=None,
              comment=b"", z64_ext_data=b"", local_names=None):
    """Build a zip by hand. members: (name, data, method) or dicts with overrides.

    Returns (bytes, layout) where layout has 'cd' (absolute offsets of central
    directory entries), 'cd_off', 'eocd', 'z64' (offsets of the end records).
    """
    out, cd, cd_offs = bytearray(), bytearray(), []
    for i, m in enumerate(members):
        m = dict(zip(("name", "data", "method"), m)) if isinstance(m, tuple) else dict(m)
        name = m["name"].encode() if isinstance(m["name"], str) else m["name"]
        data, method = m["data"], m.get("method", 0)
        comp = m.get("comp", data if method == 0 else deflate_raw(data))
        usize = m.get("usize", len(data))
        csize = m.get("csize", len(comp))
        crc = zlib.crc32(data)
        flags = m.get("flags", 0x800)
        hoff = len(out)
        lname = local_names[i] if local_names else name
        lextra = m.get("local_extra", b"")
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0, crc, csize, usize,
                           len(lname), len(lextra)) + lname + lextra + comp
        extra = m.get("cd_extra", b"")
        f_us, f_cs, f_off = usize, csize, m.get("hoff", hoff)
        if i in z64_entries:
            extra = struct.pack("<HHQQQ", 1, 24, f_us, f_cs, f_off) + extra
            f_us = f_cs = f_off = 0xFFFFFFFF
        if z64_extra_override is not None and i in z64_extra_override:
            f_us, f_cs, f_off, extra = z64_extra_override[i]
        cd_offs.append(len(cd))
        cd += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, method, 0, 0, crc, f_cs, f_us,
                          len(name), len(extra), 0, 0, 0, 0, f_off) + name + extra
    cd_off = len(out)
    out += cd
    n = len(members) if count is None else count
    layout = {"cd": [cd_off + x for x in cd_offs], "cd_off": cd_off, "cd_size": len(cd)}
    if zip64:
        layout["z64"] = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44 + len(z64_ext_data), 0x31E, 45, 0, 0, n, n, len(cd),
                           cd_off) + z64_ext_data
        layout["loc"] = len(out)
        out += struct.pack("<IIQI", 0x07064B50, 0, layout["z64"], 1)
        layout["eocd"] = len(out)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, len(comment))
    else:
        layout["eocd"] = len(out)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(cd), cd_off, len(comment))
    out += comment
    return bytes(out), layout


BASIC = [("archive/data.pkl", b"\x80\x02}q\x00.", 0), ("archive/data/0", bytes(range(24)), 0),
         ("archive/version", b"3\n", 0)]


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ------------------------------------------------------------------- tests


def test_samples_match_zipfile(tools):
    samples = zip_samples()
    assert len(samples) >= 8, f"expected the zip samples in {SAMPLES}"
    for p in samples:
        _, want = check_against_oracle(tools, p)
        for name in ("data.pkl", "version"):
            rc, out = run(tools["plain"], p, "--extract", name, binary=True)
            assert rc == 0 and out == want[name][6]


def test_corpus_zips_match_zipfile(tools):
    rows = corpus_zips()
    assert len(rows) >= 50, f"expected the zip files listed in {CORPUS / 'MANIFEST.jsonl'}"

    def one(item):
        path, row = item
        prefix, want = check_against_oracle(tools, path)
        assert [prefix] == row["zip_prefix"], path
        assert len(want) == row["zip_entries"], path

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, rows))


def test_non_zip_samples_fail_cleanly(tools):
    for p in sorted(SAMPLES.glob("*.pt")):
        if not zipfile.is_zipfile(p):
            status, _, detail = error_of(tools["asan"], p, "--mem")
            assert status == ST_FORMAT and "end of central directory" in detail


def _sample_bytes(name="basic211.pt"):
    return (SAMPLES / name).read_bytes()


def test_deflated_copy_extracts_identically(tools, tmp_path):
    src = write(tmp_path, "src.pt", _sample_bytes())
    dst = tmp_path / "deflated.pt"
    _, orig = oracle(src)  # data taken raw, so CRC-less (skip_data) samples work too
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        prefix = zin.infolist()[0].filename.split("/", 1)[0]
        for name, w in orig.items():
            zout.writestr(f"{prefix}/{name}", w[6])
    _, want = check_against_oracle(tools, dst)
    assert any(w[0] == 8 for w in want.values())
    for name, w in want.items():
        assert w[6] == orig[name][6]
        rc, out = run(tools["asan"], dst, "--mem", "--extract", name, binary=True)
        assert rc == 0 and out == orig[name][6], name


def test_big_deflated_entry_spans_many_input_chunks(tools, tmp_path):
    data = os.urandom(200_000) + bytes(3_000_000) + os.urandom(100_000)  # > 64 KiB compressed
    blob, _ = build_zip([("archive/data.pkl", b"x", 0), ("archive/data/0", data, 8)])
    p = write(tmp_path, "big.zip", blob)
    check_against_oracle(tools, p)
    rc, out = run(tools["plain"], p, "--extract", "data/0", binary=True)
    assert rc == 0 and out == data


def test_junk_before_and_after_the_zip(tools, tmp_path):
    raw = _sample_bytes()
    _, base = oracle(write(tmp_path, "plain.pt", raw))
    for label, blob in (
        ("junk6", b"JUNK!!" + raw),
        ("junk6_tail", b"JUNK!!" + raw + b"trailing bytes"),
        ("classic_junk", b"\x00" * 6 + build_zip(BASIC)[0]),
        ("zip64_junk", b"\xff" * 1000 + build_zip(BASIC, zip64=True)[0]),
    ):
        p = write(tmp_path, label, blob)
        _, got = listing(tools["asan"], p, "--verify", "--mem")
        if label.startswith("junk6"):
            assert {k: v[3] for k, v in got.items()} == {k: v[3] + 6 for k, v in base.items()}
        check_against_oracle(tools, p)


def test_zipfile_written_archive_with_comment(tools, tmp_path):
    p = tmp_path / "zf.zip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("some.dir/data.pkl", b"pickle")
        zf.writestr("some.dir/data/0", b"\x01" * 100)
        zf.writestr("some.dir/data/1", b"")
        zf.writestr("some.dir/extra/", b"")  # a directory entry
        zf.writestr("some.dir/" + "long" * 700, b"a name longer than one local-header read")
        zf.comment = b"an archive comment: ...................."
    prefix, _ = check_against_oracle(tools, p)
    assert prefix == "some.dir"
    # An end-record signature inside the comment: zipfile (rfind) trips on it;
    # the reader prefers the record whose comment ends exactly at the end.
    fake = p.read_bytes().replace(b"an archive comment: ", b"PK\x05\x06".ljust(20, b"x"))
    got = listing(tools["asan"], write(tmp_path, "fake.zip", fake), "--mem", "--verify")
    assert got == listing(tools["asan"], p, "--mem", "--verify")


def test_zip64_extras_and_extensible_zip64_record(tools, tmp_path):
    blob, _ = build_zip(BASIC, zip64=True, z64_entries={0, 1, 2})
    check_against_oracle(tools, write(tmp_path, "z64.zip", blob))
    # Zip64 end record with an extensible data sector: found through the
    # locator's offset (zipfile cannot read it; same entries as without it).
    blob, _ = build_zip(BASIC, zip64=True, z64_entries={1}, z64_ext_data=b"\x00" * 8)
    want = check_against_oracle(tools, write(tmp_path, "z64.zip", build_zip(BASIC, zip64=True)[0]))
    got = listing(tools["asan"], write(tmp_path, "z64ext.zip", blob), "--mem", "--verify")
    assert got == (want[0], {k: v[:6] for k, v in want[1].items()})
    # Only the saturated fields are in the extra, in order usize, csize, offset;
    # other extra fields before it are skipped.
    hoff1 = 30 + len(BASIC[0][0]) + len(BASIC[0][1])
    other = struct.pack("<HH", 0x4246, 3) + b"ZZZ"
    for fields in ((0xFFFFFFFF, 24, 0xFFFFFFFF, (24, hoff1)), (24, 0xFFFFFFFF, hoff1, (24,)),
                   (24, 24, 0xFFFFFFFF, (hoff1,))):
        us, cs, off, vals = fields
        extra = other + struct.pack(f"<HH{len(vals)}Q", 1, 8 * len(vals), *vals)
        blob, _ = build_zip(BASIC, zip64=True, z64_extra_override={1: (us, cs, off, extra)})
        check_against_oracle(tools, write(tmp_path, "z64partial.zip", blob))


def test_hundred_thousand_entries_fast_and_findable(tools, tmp_path):
    members = [("archive/data.pkl", b"p", 0)] + [(f"archive/data/{i}", b"", 0) for i in range(100_000)]
    blob, _ = build_zip(members, zip64=True)
    p = write(tmp_path, "many.zip", blob)
    prefix, got = listing(tools["plain"], p, "--verify")  # --verify also checks zipread_find per entry
    assert prefix == "archive" and len(got) == 100_001 and "data/99999" in got
    rc, out = run(tools["plain"], p, "--bench", "10")
    us = float(out.split()[1])
    assert us < 100_000, f"opening 100k entries took {us:.0f} us"
    _, got = listing(tools["asan"], p, "--mem", "--verify")
    assert len(got) == 100_001


def test_limits_at_n_and_n_plus_one(tools, tmp_path):
    p = write(tmp_path, "basic.zip", build_zip(BASIC)[0])
    listing(tools["plain"], p, "--records", "3")
    status, _, detail = error_of(tools["plain"], p, "--records", "2")
    assert status == ST_LIMIT and "limit" in detail
    longest = max(len(m[0]) for m in BASIC)
    listing(tools["plain"], p, "--name-limit", str(longest))
    status, _, _ = error_of(tools["plain"], p, "--name-limit", str(longest - 1))
    assert status == ST_LIMIT


def _patched(blob, off, fmt, value):
    b = bytearray(blob)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def test_corrupt_inputs_fail_cleanly(tools, tmp_path):
    ok, lay = build_zip(BASIC)
    ok64, lay64 = build_zip(BASIC, zip64=True)
    e, e64 = lay["eocd"], lay64["eocd"]
    zero_deflate = deflate_raw(bytes(10_000_000))
    cases = {
        # end records
        "empty": (b"", "too small"),
        "tiny": (b"PK\x05\x06", "too small"),
        "no_eocd": (b"\x00" * 5000, "no end of central directory"),
        "no_entries": (struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0, 0, 0, 0, 0), "no entries"),
        "cd_offset_plus1": (_patched(ok, e + 16, "<I", lay["cd_off"] + 1), "past where the directory"),
        "cd_offset_minus1": (_patched(ok, e + 16, "<I", lay["cd_off"] - 1), "local header"),
        "cd_offset_huge": (_patched(ok, e + 16, "<I", 0xFFFFFFF0), "past where the directory"),
        "cd_size_plus1": (_patched(ok, e + 12, "<I", lay["cd_size"] + 1), "past where the directory"),
        "cd_size_minus1": (_patched(ok, e + 12, "<I", lay["cd_size"] - 1), "bad signature"),
        "cd_size_huge": (_patched(ok, e + 12, "<I", 0x7FFFFFFF), "larger than the bytes"),
        "count_more": (_patched(_patched(ok, e + 8, "<H", 4), e + 10, "<H", 4), "cannot fit"),
        "count_less": (_patched(_patched(ok, e + 8, "<H", 2), e + 10, "<H", 2), "left after"),
        "count_mismatch_disk": (_patched(ok, e + 8, "<H", 2), "disks"),
        "multi_disk": (_patched(ok, e + 4, "<H", 1), "disks"),
        "saturated_no_locator": (_patched(ok, e + 16, "<I", 0xFFFFFFFF), "saturated"),
        "z64_huge_count": (_patched(_patched(ok64, lay64["z64"] + 24, "<Q", 1 << 22), lay64["z64"] + 32, "<Q",
                                    1 << 22), "cannot fit"),
        "z64_count_2_63": (_patched(_patched(ok64, lay64["z64"] + 24, "<Q", 1 << 63), lay64["z64"] + 32, "<Q",
                                    1 << 63), "cannot fit"),
        "z64_cd_size_huge": (_patched(ok64, lay64["z64"] + 40, "<Q", 1 << 62), "larger than the bytes"),
        "z64_cd_off_huge": (_patched(ok64, lay64["z64"] + 48, "<Q", (1 << 64) - 1), "past where"),
        "z64_bad_sig": (_patched(ok64, lay64["z64"], "<I", 0x12345678), "no zip64 end of central directory"),
        "z64_locator_disk": (_patched(ok64, lay64["loc"] + 16, "<I", 5), "disks"),
        # central directory entries
        "cd_bad_sig": (_patched(ok, lay["cd"][1], "<I", 0x02014B51), "bad signature"),
        "cd_name_len_huge": (_patched(ok, lay["cd"][2] + 28, "<H", 0xFFFF), "run past the end"),
        "hoff_outside": (_patched(ok, lay["cd"][1] + 42, "<I", 0xFFFFFF00), "outside the file"),
        "hoff_into_cd": (_patched(ok, lay["cd"][2] + 42, "<I", lay["cd_off"] - 20), "overlaps the central"),
        "stored_size_mismatch": (_patched(ok, lay["cd"][1] + 20, "<I", 23), "stored entry"),
        "dup": (build_zip(BASIC + [("archive/data/0", b"x", 0)])[0], "duplicate name"),
        "overlap_shared_header": (build_zip(BASIC + [{"name": "archive/data/1", "data": bytes(24), "hoff": 0}])[0],
                                  "must not share bytes"),
        "no_slash": (build_zip([("data.pkl", b"x", 0), ("archive/version", b"3\n", 0)])[0],
                     "not in a subdirectory"),
        "other_prefix": (build_zip(BASIC + [("other/data/1", b"x", 0)])[0], "top folder"),
        "prefix_only": (build_zip(BASIC + [("archive", b"x", 0)])[0], "top folder"),
        "nul_in_name": (build_zip(BASIC + [("archive/data/1\x00x", b"x", 0)])[0], "NUL"),
        "bad_z64_extra_short": (build_zip(BASIC, z64_extra_override={
            1: (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, struct.pack("<HHQ", 1, 8, 24))})[0], "zip64 extra"),
        "bad_z64_extra_empty": (build_zip(BASIC, z64_extra_override={
            1: (24, 24, 0xFFFFFFFF, struct.pack("<HH", 1, 0))})[0], "local header offset"),
        "bad_extra_overrun": (build_zip(BASIC, z64_extra_override={
            1: (24, 24, 0xFFFFFFFF, struct.pack("<HHQ", 1, 100, 0))})[0], "runs past"),
        "two_z64_extras": (build_zip(BASIC, z64_extra_override={
            1: (0xFFFFFFFF, 24, 53, struct.pack("<HHQHHQ", 1, 8, 24, 1, 8, 24))})[0], "two zip64"),
        # local headers and data
        "local_bad_sig": (build_zip(BASIC, local_names=None)[0].replace(b"PK\x03\x04", b"PK\x03\x05", 1),
                          "local header signature"),
        "local_name_differs": (build_zip(BASIC, local_names=[b"archive/data.pkX", b"archive/data/0",
                                                             b"archive/version"])[0], "name differs"),
        "local_name_len_differs": (build_zip(BASIC, local_names=[b"archive/data.pk", b"archive/data/0",
                                                                 b"archive/version"])[0], "name length"),
        "local_extra_past_end": (_local_extra_past_end(), "outside the file"),
        "local_long_name_differs": (build_zip(BASIC + [("archive/" + "n" * 1000, b"x", 0)], local_names=[
            m[0].encode() for m in BASIC] + [b"archive/" + b"n" * 999 + b"m"])[0], "name differs"),
        # deflate
        "bomb_small_usize": (build_zip([BASIC[0], {"name": "archive/data/0", "data": b"", "method": 8,
                                                   "comp": zero_deflate, "usize": 1000}])[0],
                             "more than the declared"),
        "bomb_ratio": (build_zip([BASIC[0], {"name": "archive/data/0", "data": b"", "method": 8,
                                             "comp": b"\x03\x00", "usize": 0xFFFFFFF0}])[0], "maximum ratio"),
        "deflate_short": (build_zip([BASIC[0], {"name": "archive/data/0", "data": b"", "method": 8,
                                                "comp": deflate_raw(b"abc" * 100), "usize": 301}])[0],
                          "ends after"),
        "deflate_truncated": (build_zip([BASIC[0], {"name": "archive/data/0", "data": b"", "method": 8,
                                                    "comp": deflate_raw(os.urandom(5000))[:-50],
                                                    "usize": 5000}])[0], "ends before"),
        "deflate_corrupt": (build_zip([BASIC[0], {"name": "archive/data/0", "data": b"", "method": 8,
                                                  "comp": b"\xff" * 64, "usize": 100}])[0], "corrupt deflate"),
        "method_bzip2": (build_zip([BASIC[0], {"name": "archive/data/0", "data": b"abc", "method": 12,
                                               "comp": b"abc"}])[0], "method 12"),
        "method_huge_usize": (build_zip([BASIC[0], {"name": "archive/data/0", "data": b"abc", "method": 14,
                                                    "usize": 0xFFFFFFF0}])[0], "method 14"),
        "encrypted": (build_zip([BASIC[0], {"name": "archive/data/0", "data": b"abc", "flags": 0x801}])[0],
                      "encrypted"),
    }
    for label, (blob, needle) in cases.items():
        p = write(tmp_path, label, blob)
        for exe, args in ((tools["plain"], ("--verify",)), (tools["asan"], ("--verify", "--mem"))):
            status, offset, detail = error_of(exe, p, *args)
            assert status == ST_FORMAT, (label, detail)
            assert needle in detail, (label, detail)
            assert 0 <= offset <= max(len(blob), 1), (label, offset)


def _local_extra_past_end():
    """A zip whose last local header claims an extra field that runs past the end of the file."""
    blob, lay = build_zip(BASIC)
    # Entry 2's local header: claim a 60000-byte extra so its data lies beyond the input.
    hoff = struct.unpack_from("<I", blob, lay["cd"][2] + 42)[0]
    return _patched(blob, hoff + 28, "<H", 60000)


def test_truncation_at_every_offset_never_crashes(tools, tmp_path):
    raw = (SAMPLES / "a113.pt").read_bytes() if (SAMPLES / "a113.pt").is_file() else build_zip(BASIC, zip64=True)[0]
    exe = tools["plain"]

    def one(k):
        p = tmp_path / f"t{k}.pt"
        p.write_bytes(raw[:k])
        rc, out = run(exe, p, "--verify")
        assert rc == (0 if k == len(raw) else 1), (k, out)
        p.unlink()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(len(raw) + 1)))


def test_sanitized_in_process_sweeps(tools, tmp_path):
    """Truncate at every length and mutate every byte, in-process under ASan/UBSan."""
    inputs = {"crafted64": build_zip(BASIC, zip64=True, z64_entries={1})[0],
              "crafted_deflate": build_zip([BASIC[0], ("archive/data/0", b"abc" * 300, 8), BASIC[2]])[0]}
    for name in ("a113.pt", "basic211.pt", "many113.pt"):
        if (SAMPLES / name).is_file():
            inputs[name] = (SAMPLES / name).read_bytes()
    inputs["junk"] = b"JUNK!!" + next(iter(inputs.values()))
    for label, blob in inputs.items():
        p = write(tmp_path, label, blob)
        rc, out = run(tools["asan"], p, "--sweep-truncate", "--sweep-flip")
        assert rc == 0 and out.startswith("SWEEP "), (label, out)
