"""The attack corpus (tests/hostile/), truncations at every byte, and every limit at N and N+1.

Torch-free: the corpus is built from raw opcodes and raw zip records (tests/hostile/make_hostile.py).
For every attack file, ``load`` (default and ``weights_only=False``, from a path, a mapped path,
a copied path and bytes), ``scan``, ``open`` (reading every tensor) and ``_core.pickle_globals``
must answer as the corpus README says, never run code (the canary file is never created), and
stay under the file's memory bound (tracemalloc peak).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import pytest

import torchfree
from torchfree import _core

HERE = Path(__file__).resolve().parent
HOSTILE = HERE / "hostile"
sys.path.insert(0, str(HOSTILE))
import make_hostile  # noqa: E402
from make_hostile import ATTACKS, CANARY  # noqa: E402
from test_core import PROTO2, P, archive, binint, glob, nested_lists, tensor_v2, unicode  # noqa: E402

BY_NAME = {a.file: a for a in ATTACKS}
MiB = 1 << 20


@pytest.fixture
def in_empty_dir(tmp_path, monkeypatch):
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    yield d
    assert not (d / CANARY).exists(), "a payload ran: the canary file was created"
    assert list(d.iterdir()) == [], f"something wrote into the working directory: {list(d.iterdir())}"


def outcome(fn):
    """('ok', value) or (exception, None); only CheckpointError, TypeError and MemoryError are expected."""
    try:
        return "ok", fn()
    except (torchfree.CheckpointError, TypeError) as e:
        return e, None


def check(expected: str, got, what: str):
    res, _ = got
    if "|" in expected:  # either answer is right
        errors = []
        for alt in expected.split("|"):
            try:
                return check(alt, got, what)
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError("; ".join(errors))
    if expected == "ok":
        assert res == "ok", f"{what}: expected an inert result, got {type(res).__name__}: {res}"
        return
    cls = getattr(torchfree, expected)
    assert isinstance(res, cls), f"{what}: expected {expected}, got {res!r}"


def bounded(fn, peak_mib: int, what: str):
    """Run fn under tracemalloc; its peak must stay under peak_mib."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        got = outcome(fn)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < peak_mib * MiB, f"{what}: tracemalloc peak {peak / MiB:.1f} MiB over the bound of {peak_mib} MiB"
    return got


def read_all(ck):
    with ck:
        for k in list(ck.keys()):
            ck[k]
        return ck


def data_pkl(blob: bytes):
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl")]
            return z.read(names[0]) if names else None
    except Exception:
        return None


# ---- the corpus ------------------------------------------------------------------------------


def test_corpus_matches_generator_and_readme():
    assert len(ATTACKS) >= 40
    files = sorted(p.name for p in HOSTILE.iterdir() if p.suffix == ".pt")
    assert files == sorted(BY_NAME), "tests/hostile/*.pt and make_hostile.ATTACKS differ: run make_hostile.py"
    readme = (HOSTILE / "README.md").read_text()
    assert readme == make_hostile.readme(), "tests/hostile/README.md is stale: run make_hostile.py"
    for a in ATTACKS:
        assert f"| `{a.file}` |" in readme


SAFE = [a for a in ATTACKS if not a.xfail and not a.isolate]


@pytest.mark.parametrize("a", SAFE, ids=[a.file for a in SAFE])
def test_attack(a, in_empty_dir):
    path = HOSTILE / a.file
    blob = path.read_bytes()
    kw = dict(a.load_kwargs)
    peak = a.peak_mib
    check(a.load, bounded(lambda: torchfree.load(path, **kw), peak, "load(path)"), "load(path)")
    kw_nomm = {k: v for k, v in kw.items() if k != "mmap"}
    check(a.load, bounded(lambda: torchfree.load(blob, **kw_nomm), peak, "load(bytes)"), "load(bytes)")
    check(a.load, bounded(lambda: torchfree.load(path, **dict(kw, mmap=False)), peak, "load(mmap=False)"),
          "load(mmap=False)")
    check(a.unsafe, bounded(lambda: torchfree.load(path, weights_only=False, **kw), peak, "load(wo=False)"),
          "load(weights_only=False)")
    scan_kw = {k: v for k, v in kw.items() if k == "limits"}
    got = bounded(lambda: torchfree.scan(path, **scan_kw), peak, "scan")
    check(a.scan, got, "scan")
    if got[0] == "ok" and a.scan_global:
        assert a.scan_global in got[1].globals, f"scan did not list {a.scan_global}: {got[1].globals}"
    check(a.open or a.unsafe, bounded(lambda: read_all(torchfree.open(path, **kw)), peak, "open"), "open")
    pk = data_pkl(blob)
    if pk is not None:
        res, names = bounded(lambda: _core.pickle_globals(pk), peak, "pickle_globals")
        if res == "ok" and a.scan_global:
            assert a.scan_global in names or "?" in names, names
        if res != "ok":
            assert isinstance(res, (torchfree.UnpicklingError, torchfree.LimitError)), res


ISOLATED = [a for a in ATTACKS if a.isolate]

_ISOLATED = textwrap.dedent("""
    import sys, tracemalloc, torchfree
    path, peak_mib, expected, api = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[5]
    kw = eval(sys.argv[4])  # the test's own literal dict
    tracemalloc.start()
    try:
        getattr(torchfree, api)(path, **kw)
        got = "ok"
    except torchfree.CheckpointError as e:
        got = type(e).__name__
        if "CheckpointError" in expected.split("|"):
            got = "CheckpointError"
    except Exception as e:  # the bug: something else escapes
        got = "escaped " + type(e).__name__
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    print(got, round(peak, 1))
    sys.exit(0 if got in expected.split("|") and peak < peak_mib else 3)
""")


@pytest.mark.parametrize("a", ISOLATED, ids=[a.file for a in ISOLATED])
def test_isolated_attack(a, tmp_path):
    """Attacks that crashed the process once, and reproducers of open bugs outside the reader core
    (strict: an xfail row that starts passing fails until its xfail is dropped), in a subprocess."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    expected = a.scan if a.xfail_api == "scan" else a.load
    res = subprocess.run([sys.executable, "-c", _ISOLATED, str(HOSTILE / a.file), str(a.peak_mib), expected,
                          repr(a.load_kwargs), a.xfail_api], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert not (tmp_path / CANARY).exists()
    detail = f"exit {res.returncode}: {res.stdout.strip()} {res.stderr.strip()[-300:]}"
    if not a.xfail:
        assert res.returncode == 0, f"{a.file}: expected {expected} ({detail})"
    elif res.returncode != 0:
        pytest.xfail(f"{a.xfail} ({detail})")
    else:
        pytest.fail(f"{a.file} now behaves ({res.stdout.strip()}): the bug is fixed; drop its xfail in make_hostile.py")


LIVE = [a for a in ATTACKS if a.live]


@pytest.mark.parametrize("a", LIVE, ids=[a.file for a in LIVE])
def test_payloads_are_live_under_pickle(a, tmp_path):
    """Control: Python's own pickle does run these payloads (so the canary check means something)."""
    pk = data_pkl((HOSTILE / a.file).read_bytes())
    assert pk is not None
    code = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
    src = tmp_path / "payload.pkl"
    src.write_bytes(pk)
    subprocess.run([sys.executable, "-c", code, str(src)], cwd=tmp_path, capture_output=True, timeout=60,
                   env=dict(os.environ, LD_PRELOAD=""))
    assert (tmp_path / CANARY).exists(), f"{a.file}: the payload does not run under pickle.loads"


def test_zip_bomb_honest_is_charged_to_total_bytes(in_empty_dir):
    path = HOSTILE / "zip_bomb_honest_16mib.pt"
    with pytest.raises(torchfree.LimitError):
        torchfree.load(path, limits={"total_bytes": 1 << 20})
    # scan reads and inflates nothing: it finds the view past the end from the pickle alone
    res, _ = bounded(lambda: torchfree.scan(path), 4, "scan")
    assert isinstance(res, torchfree.FormatError)


# ---- truncation at every byte ---------------------------------------------------------------------


def _truncations(blob: bytes, step: int = 1):
    """Every prefix (the end records lost) and every suffix (the start lost, the end records kept)."""
    return [blob[:k] for k in range(0, len(blob), step)] + [blob[k:] for k in range(1, len(blob), step)]


TRUNCATED_SOURCES = {
    "proto4.pt": lambda: (HERE / "data" / "proto4.pt").read_bytes(),
    "sd_views_deflated.pt": lambda: (HERE / "data" / "sd_views_deflated.pt").read_bytes(),
    "legacy": lambda: make_hostile.legacy(P(PROTO2, make_hostile.sd("w", make_hostile.legacy_pid("1", 12)), b"."),
                                          ["1"], [make_hostile.struct.pack("<q", 12) + make_hostile.W]),
    "tar": lambda: make_hostile.tar_ckpt({"sys_info": make_hostile.tar_sys_info(), "pickle": P(PROTO2, b"N."),
                                          "tensors": P(PROTO2, binint(0), b"."),
                                          "storages": P(PROTO2, binint(0), b".")}),
}


def tar_intact(cut: bytes, blob: bytes) -> bool:
    """A cut tar that still holds, whole, the three members torch reads (its sys_info member,
    the last padding and the end-of-archive blocks are not needed): loading it must succeed."""
    import tarfile

    def data_end(data):
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as t:
                members = {m.name: m for m in t.getmembers()}
        except tarfile.TarError:
            return None
        if not all(n in members for n in ("storages", "tensors", "pickle")):
            return None
        return max(members[n].offset_data + members[n].size for n in ("storages", "tensors", "pickle"))

    if blob.startswith(cut):
        return len(cut) >= data_end(blob)
    end = data_end(cut)
    return end is not None and end <= len(cut)


@pytest.mark.parametrize("source", list(TRUNCATED_SOURCES))
def test_truncated_at_every_byte(source, in_empty_dir):
    blob = TRUNCATED_SOURCES[source]()
    step = 1 if len(blob) <= 8192 else 3
    for cut in _truncations(blob, step):
        for what, fn in (("load", lambda: torchfree.load(cut)), ("scan", lambda: torchfree.scan(cut)),
                         ("open", lambda: read_all(torchfree.open(io.BytesIO(cut))))):
            res, _ = outcome(fn)
            if source == "tar" and tar_intact(cut, blob):
                assert res == "ok", f"{source}[:{len(cut)}] {what}: {res!r}"
                continue
            assert isinstance(res, torchfree.CheckpointError), f"{source}[:{len(cut)}] {what}: {res!r}"
        pk = data_pkl(cut)
        if pk is not None:
            outcome(lambda: _core.pickle_globals(pk))


# ---- limits: in one place, documented, per call, at N passes and N+1 fails --------------------------

F32B = bytes(48)
ONE = P(b"}", unicode("w"), tensor_v2("0", 12, 0, (3, 4), (4, 1)), b"s")
LIMIT_CASES = {
    # case: (archive bytes, N: the smallest value that passes); the case is the limit's name,
    # or name:detail for a second case of one limit
    "pickle_bytes": (archive(P(PROTO2, b"N.")), 4),
    "memo": (archive(P(PROTO2, b"]", b"\x94" * 10, b".")), 10),
    "stack": (archive(P(PROTO2, b"N" * 50, b"(t", b"0" * 50, b".")), 51),
    "marks": (archive(nested_lists(100)), 100),
    "records": (archive(P(PROTO2, b"N."), {str(i): b"" for i in range(10)}), 13),
    "name": (archive(P(PROTO2, b"N.")), len("archive/byteorder")),
    "name:global": (archive(P(PROTO2, glob("collections", "OrderedDict"), b")R."), prefix="a", byteorder=None),
                    len("OrderedDict")),
    "ndim": (archive(P(PROTO2, b"}", unicode("w"), tensor_v2("0", 1, 0, (1,) * 5, (1,) * 5), b"s", b"."),
                     {"0": bytes(4)}), 5),
    "total_bytes": (archive(P(PROTO2, ONE, b"."), {"0": F32B}), 48),
}
# what each API does not look at: scan reads no storage byte
NOT_APPLICABLE = {("scan", "total_bytes")}


def test_limits_named_in_one_place_and_documented():
    header = (HERE.parent / "src" / "limits.h").read_text()
    in_header = {m.lower() for m in re.findall(r"#define TF_LIMIT_(\w+) ", header)}
    assert in_header == set(torchfree.LIMITS) == {c.split(":")[0] for c in LIMIT_CASES}
    readme = (HERE.parent / "README.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", readme, re.M))
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}

    def value(text):
        text = text.strip().replace(",", "")
        if m := re.fullmatch(r"(\d+) (\w+)", text):
            return int(m[1]) * units[m[2]]
        if m := re.fullmatch(r"(\d+)\^(\d+)", text):
            return int(m[1]) ** int(m[2])
        return int(text)

    for name, default in torchfree.LIMITS.items():
        assert name in table, f"README limits table lacks {name}"
        assert value(table[name]) == default, (name, table[name], default)
    assert torchfree.LIMITS is _core.LIMITS


def _api(api, data, limits, tmp_path):
    if api == "load":
        return torchfree.load(data, limits=limits)
    if api == "load_mmap_false":
        path = tmp_path / "limits.pt"
        path.write_bytes(data)
        return torchfree.load(path, limits=limits, mmap=False)
    if api == "scan":
        return torchfree.scan(data, limits=limits)
    return read_all(torchfree.open(data, limits=limits))


@pytest.mark.parametrize("api", ["load", "load_mmap_false", "scan", "open"])
@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_limit_at_n_and_past_it(case, api, tmp_path):
    data, n = LIMIT_CASES[case]
    name = case.split(":")[0]
    _api(api, data, {name: n}, tmp_path)  # at the limit: passes
    if (api, name) in NOT_APPLICABLE:
        _api(api, data, {name: n - 1}, tmp_path)
        return
    with pytest.raises(torchfree.LimitError):
        _api(api, data, {name: n - 1}, tmp_path)  # one past it: fails


PICKLE_LIMITS = {
    "pickle_bytes": (P(PROTO2, b"N."), 4),
    "memo": (P(PROTO2, b"]", b"\x94" * 10, b"."), 10),
    "stack": (P(PROTO2, b"N" * 50, b"(t", b"0" * 50, b"."), 51),
    "marks": (nested_lists(100), 100),
    "name": (P(PROTO2, glob("collections", "OrderedDict"), b")R."), len("OrderedDict")),
}


@pytest.mark.parametrize("name", list(PICKLE_LIMITS))
def test_pickle_globals_limits(name):
    data, n = PICKLE_LIMITS[name]
    _core.pickle_globals(data, limits={name: n})
    with pytest.raises(torchfree.LimitError):
        _core.pickle_globals(data, limits={name: n - 1})
    assert _core.pickle_globals(data) == (["collections.OrderedDict"] if name == "name" else [])


def test_limit_overrides_are_per_call():
    data, n = LIMIT_CASES["marks"]
    with pytest.raises(torchfree.LimitError):
        torchfree.load(data, limits={"marks": n - 1})
    torchfree.load(data)  # the defaults are untouched
    assert torchfree.LIMITS["marks"] == 10000


# ---- pickle_globals --------------------------------------------------------------------------------


def test_pickle_globals_lists_every_global():
    import collections

    assert _core.pickle_globals(pickle.dumps(collections.OrderedDict(a=1), protocol=2)) == ["collections.OrderedDict"]
    for proto in range(6):
        got = _core.pickle_globals(pickle.dumps([range(3), collections.Counter(), collections.OrderedDict()],
                                                protocol=proto))
        assert set(got) == {"builtins.range", "collections.Counter", "collections.OrderedDict"}, (proto, got)
    # Python 2 names are mapped as the VM maps them
    assert _core.pickle_globals(P(b"c__builtin__\nxrange\n", b"(K\x03tR.")) == ["builtins.range"]
    # a STACK_GLOBAL of computed strings cannot be named statically
    dyn = (HOSTILE / "dynamic_stack_global.pt").read_bytes()
    assert _core.pickle_globals(data_pkl(dyn)) == ["torch.serialization._get_layout", "?"]
    # every global of every real checkpoint, as the VM sees them
    for path in sorted((HERE / "data").glob("*.pt")):
        if data_pkl(path.read_bytes()) is None:
            continue  # a legacy stream: no data.pkl record to walk
        info = torchfree.scan(path)
        assert set(_core.pickle_globals(data_pkl(path.read_bytes()))) == set(info.globals), path


@pytest.mark.parametrize("body,match", [
    (b"q\x05", "underflow"), (P(b"N", b"q\x40"), "sparse"), (b"h\x00", "not set"), (b"X\xff\xff\xff\x7f", "truncated"),
    (b"N", "no STOP"), (b"N.N", "after the STOP"), (b"\x82\x01", "extension"), (b"\xff", "invalid pickle opcode"),
    (b"(N)u", "odd|target"), (b"1", "no MARK"),
])
def test_pickle_globals_rejects_what_the_vm_rejects(body, match):
    data = body if body.endswith((b".", b"N")) or b"." in body else body + b"."
    with pytest.raises(torchfree.UnpicklingError, match=match):
        _core.pickle_globals(data)
    with pytest.raises(torchfree.CheckpointError):
        torchfree.load(archive(data))


def test_pickle_globals_accepts_buffers_and_releases_them():
    data = bytearray(pickle.dumps({"a": 1}, protocol=2))
    assert _core.pickle_globals(data) == []
    assert _core.pickle_globals(memoryview(data)) == []
    data += b"x"  # no buffer export left behind
    with pytest.raises(TypeError):
        _core.pickle_globals("not bytes")
    with pytest.raises(TypeError):
        _core.pickle_globals(b".", limits={"nope": 1})
