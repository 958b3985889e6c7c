"""Python-level fuzzing of torchfree.load, scan, open and _core.pickle_globals.

    python tests/fuzz/atheris_load.py [libFuzzer flags, e.g. -max_total_time=20] [SEED_DIR ...]

With atheris (pip install atheris): libFuzzer mutates whole files, guided by the coverage of
torchfree's Python layer. Without it, with --loop, or under a preloaded AddressSanitizer (whose
runtime takes atheris' coverage callbacks): the same checks on random mutations of the seeds
(bit flips, interesting integers, inserts, deletes, splices), for -max_total_time seconds. Seeds default to tests/data, tests/hostile and a few hand-built
archives. Each input is checked for:

* only CheckpointError (or the documented TypeError) ever escapes load/scan/open/pickle_globals;
* no code runs: it works in an empty directory where a payload would create torchfree-canary;
* pickle_globals and the VM agree: a pickle the static walk refuses (UnpicklingError) the VM
  refuses too, and a pickle the VM loads (weights_only=False) the walk accepts.

A failure raises (atheris writes crash-<hash> with the input); the loop writes the input to
./crash-loop-<hash> and exits 1. Prints "FUZZ <engine> runs=N secs=S" at the end.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent

try:
    import atheris  # type: ignore
except ImportError:  # pragma: no cover - depends on the machine
    atheris = None
# Under a preloaded gcc AddressSanitizer (the ASan pass of .ci/run) the sanitizer runtime owns
# the coverage callbacks, atheris gets no coverage and only mutates an empty input: use the
# seed-driven mutation loop there instead.
if atheris is not None and "asan" in os.environ.get("LD_PRELOAD", "") and "--loop" not in sys.argv:
    sys.argv.append("--loop")

if atheris is not None and "--loop" not in sys.argv:
    with atheris.instrument_imports():
        import torchfree
        from torchfree import _core
else:
    import torchfree
    from torchfree import _core

CANARY = "torchfree-canary"
RUNS = 0
# Known bugs outside the reader core, each with a reproducer in tests/hostile/ (strict xfail
# there): counted here instead of stopping the run, so fuzzing goes on past them.
KNOWN: dict[str, int] = {}


def _raised_in(e: BaseException, filename: str) -> bool:
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.sep + filename):
            return True
        tb = tb.tb_next
    return False


def _known(name: str) -> None:
    KNOWN[name] = KNOWN.get(name, 0) + 1


def _wrap_pickle(pk: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pk)
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


def _data_pkl(data: bytes):
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            if names and z.getinfo(names[0]).file_size < (4 << 20):
                return z.read(names[0])
    except Exception:
        return None
    return None


def _expect_ours(fn):
    """(True, result) or (False, None) for our errors; anything else escapes, except the known bugs."""
    try:
        return True, fn()
    except (torchfree.CheckpointError, TypeError):
        return False, None
    except UnicodeDecodeError:  # tests/hostile/zip_name_not_utf8.pt: Archive.records() names
        _known("zip_name_not_utf8")
        return False, None
    except Exception as e:  # numpy's errors escaping _rebuild.py (tests/hostile/numpy_*.pt)
        if not _raised_in(e, "_rebuild.py"):
            raise
        _known(f"{type(e).__name__} escaping _rebuild.py")
        return False, None


def _read_all(ck):
    with ck:
        for k in list(ck.keys()):
            ck[k]


def one_input(data: bytes) -> None:
    global RUNS
    RUNS += 1
    _expect_ours(lambda: torchfree.load(data))
    _expect_ours(lambda: torchfree.load(data, weights_only=False))
    _expect_ours(lambda: torchfree.scan(data))
    _expect_ours(lambda: _read_all(torchfree.open(io.BytesIO(data))))
    pk = _data_pkl(data)
    if pk is None and data[:1] == b"\x80":
        pk = data  # a bare pickle: fuzz the VM through a clean archive
    if pk is not None:
        try:
            _core.pickle_globals(pk)
            walk_ok = True
        except torchfree.LimitError:
            walk_ok = None
        except torchfree.UnpicklingError:
            walk_ok = False
        vm_ok, _ = _expect_ours(lambda: torchfree.load(_wrap_pickle(pk), weights_only=False))
        if walk_ok is False and vm_ok:
            raise AssertionError("pickle_globals refused a pickle the VM loads")
    if os.path.exists(CANARY):
        raise AssertionError("a payload ran: the canary file exists")


def default_seeds() -> list[Path]:
    dirs = [TESTS / "data", TESTS / "hostile"]
    return [p for d in dirs for p in sorted(d.iterdir()) if p.is_file() and p.suffix in (".pt", ".bin")]


# ---- the fallback mutation loop ------------------------------------------------------------------

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1, 10**18]


def mutate(rng: random.Random, data: bytearray, seeds: list[bytes]) -> bytearray:
    for _ in range(rng.randint(1, 8)):
        n = len(data)
        op = rng.randrange(7)
        if op == 0 and n:
            data[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            data[rng.randrange(n)] = rng.randrange(256)
        elif op == 2 and n >= 8:
            w = rng.choice((1, 2, 4, 8))
            at = rng.randrange(n - w + 1)
            data[at:at + w] = (rng.choice(INTERESTING) % (1 << (8 * w))).to_bytes(w, "little")
        elif op == 3:
            at = rng.randrange(n + 1)
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4 and n:
            at = rng.randrange(n)
            del data[at:at + rng.randint(1, 64)]
        elif op == 5 and n:
            other = rng.choice(seeds)
            if other:
                a = rng.randrange(len(other))
                chunk = other[a:a + rng.randint(1, 512)]
                at = rng.randrange(n)
                data[at:at + len(chunk)] = chunk
        elif op == 6 and n:
            del data[rng.randrange(n):]
    return data


def loop(seconds: float, seeds: list[bytes], seed: int = 0) -> int:
    rng = random.Random(seed)
    t0 = time.monotonic()
    for s in seeds:
        one_input(s)
    while time.monotonic() - t0 < seconds:
        data = bytes(mutate(rng, bytearray(rng.choice(seeds)), seeds))
        try:
            one_input(data)
        except BaseException:
            name = f"crash-loop-{hashlib.sha1(data).hexdigest()[:16]}"
            Path(name).write_bytes(data)
            print(f"FUZZ crash: input written to {os.path.abspath(name)}", file=sys.stderr)
            raise
    return RUNS


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--loop"]
    flags = [a for a in args if a.startswith("-")]
    dirs = [Path(a) for a in args if not a.startswith("-")]
    seconds = 20.0
    for f in flags:
        if f.startswith("-max_total_time="):
            seconds = float(f.split("=", 1)[1])
    seed_files = [p for d in dirs for p in sorted(d.iterdir()) if p.is_file()] if dirs else default_seeds()
    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="torchfree-fuzz-")
    home = os.getcwd()
    os.chdir(work)  # payloads would write their canary here
    try:
        if atheris is not None and "--loop" not in sys.argv:
            corpus = Path(work) / "corpus"
            corpus.mkdir()
            for p in seed_files:
                (corpus / p.name).write_bytes(p.read_bytes())

            def test_one(data: bytes):
                one_input(data)

            argv = [sys.argv[0], *flags, f"-artifact_prefix={home}/", "-rss_limit_mb=4096", str(corpus)]
            atheris.Setup(argv, test_one)
            import atexit

            atexit.register(lambda: print(f"FUZZ atheris runs={RUNS} secs={time.monotonic() - t0:.0f} known={KNOWN}",
                                                  flush=True))
            atheris.Fuzz()  # exits the process when -max_total_time is reached
        else:
            seeds = [p.read_bytes() for p in seed_files]
            os.chdir(work)
            loop(seconds, seeds)
            print(f"FUZZ loop runs={RUNS} secs={time.monotonic() - t0:.0f} known={KNOWN}")
    finally:
        os.chdir(home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
