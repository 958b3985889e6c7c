"""Write the seed corpora of the fuzz targets (no torch needed).

    python tests/fuzz/make_seeds.py OUTDIR

OUTDIR/zip: whole files: tests/data/*.pt, the vendored samples and corpus files
(tests/data/samples, tests/data/corpus), tests/hostile/* (the attack corpus), and a few archives built here.
OUTDIR/pickle: the data.pkl of every zip above, the pickles of tests/hostile/pickles.py
attacks, and pickles of protocols 0-5 made here with Python's pickle.
Files are named by the SHA-1 of their bytes, so reruns are idempotent.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import pickle
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent


def zip_sources():
    yield from sorted((TESTS / "data").glob("*.pt"))
    yield from sorted((TESTS / "data").glob("*.bin"))
    yield from sorted((TESTS / "hostile").glob("*.pt"))
    for d in (TESTS / "data" / "samples", TESTS / "data" / "corpus"):
        yield from sorted(p for p in d.rglob("*") if p.is_file() and p.suffix not in (".md", ".jsonl", ".json"))


def handmade_zips():
    """Container variants the fixtures lack: zip64 records, deflate, comments, leading bytes."""
    body = pickle.dumps({"a": 1, "b": [1.5, "x"]}, protocol=2)
    for zip64 in (False, True):
        for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", method) as z:
                for name, data in (("archive/data.pkl", body), ("archive/byteorder", b"little"),
                                   ("archive/data/0", bytes(range(64))), ("archive/version", b"3\n")):
                    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                    info.compress_type = method
                    with z.open(info, "w", force_zip64=zip64) as f:
                        f.write(data)
                if zip64:
                    z.comment = b"a comment"
            yield buf.getvalue()
            yield b"leading bytes" + buf.getvalue()


def handmade_pickles():
    objs = [
        None, 1, -1, 2**31, 2**100, -(2**70), 1.5, "s", "é" * 3, b"\x00\xff", bytearray(b"ab"), (1, (2,)), [1, [2]],
        {"a": 1}, {1, 2}, frozenset([3]), 1 - 2j, slice(1, 9, 2), range(3, 10, 2),
        collections.OrderedDict(z=1, a=2), collections.Counter(a=2), [[[[]]]], {"k": [None] * 20},
    ]
    shared = [1, 2]
    objs.append({"x": shared, "y": shared})
    for proto in range(0, 6):
        yield pickle.dumps(objs, protocol=proto)
        for o in objs[:8]:
            yield pickle.dumps(o, protocol=proto)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    zdir, pdir = args.out / "zip", args.out / "pickle"
    zdir.mkdir(parents=True, exist_ok=True)
    pdir.mkdir(parents=True, exist_ok=True)

    def put(d: Path, data: bytes):
        (d / hashlib.sha1(data).hexdigest()).write_bytes(data)

    nz = np_ = 0
    for path in zip_sources():
        data = path.read_bytes()
        if len(data) > 1 << 20:
            continue
        put(zdir, data)
        nz += 1
        if zipfile.is_zipfile(io.BytesIO(data)):
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    for name in z.namelist():
                        if name.endswith(".pkl"):
                            put(pdir, z.read(name))
                            np_ += 1
            except Exception:  # hostile archives: their pickle is not needed
                pass
        else:  # legacy streams and others: the bytes are pickles too
            put(pdir, data)
            np_ += 1
    sys.path.insert(0, str(TESTS / "hostile"))
    try:
        from make_hostile import attack_pickles  # the pickles of the attack corpus
    except ImportError:
        attack_pickles = list
    for data in attack_pickles():
        put(pdir, data)
        np_ += 1
    for data in handmade_zips():
        put(zdir, data)
        nz += 1
    for data in handmade_pickles():
        put(pdir, data)
        np_ += 1
    print(f"seeds: {len(list(zdir.iterdir()))} zip files ({nz} read), {len(list(pdir.iterdir()))} pickles ({np_})")


if __name__ == "__main__":
    main()
