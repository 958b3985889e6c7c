"""The ``torchfree`` command (also ``python -m torchfree``): info, diff, convert.

Exit status: 0 success (``diff``: no difference), 1 ``diff`` found differences, 2 error (one line
on stderr: ``torchfree: error: ...``; ``--traceback`` shows the whole traceback instead).
"""

from __future__ import annotations

import gc
import os
import sys

__all__ = ["main"]

PROG = "torchfree"
TORCH_EXTS = (".pt", ".pth", ".bin", ".ckpt")
FORMATS = ("pt", "safetensors", "npz")
PROGRESS_MIN_BYTES = 64 << 20


class CLIError(Exception):
    """An error the command reports in one line (exit status 2)."""


# ---- argument parsing -------------------------------------------------------------------------


def _parser():
    import argparse  # here: the plain `info FILE` does not need it (see _quick_args)

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, compare and convert PyTorch checkpoints without torch. "
                    "Nothing in a checkpoint is ever executed.",
        epilog="Run 'torchfree COMMAND --help' for the options of a command. Exit status: 0 ok, "
               "1 'diff' found differences, 2 error.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--traceback", action="store_true", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser(
        "info", help="list the tensors of a checkpoint (reads no tensor data)",
        description="List the tensors of a checkpoint (anything torch.save writes, .safetensors, .npz, "
                    "or a Hugging Face *.bin.index.json / *.safetensors.index.json of shards): name, "
                    "dtype, shape, storage, size, location, and totals. Reads the index and the pickle "
                    "or header only, never tensor bytes, and never fails on unknown classes (they are "
                    "listed as 'other globals'). The format is told by content, not by extension.")
    info.add_argument("file", metavar="FILE", help="the checkpoint")
    info.add_argument("--json", action="store_true",
                      help="print the description as JSON: the totals and one compact entry per tensor "
                           "(name, dtype, shape, stride, storage, offset, nbytes, location)")
    info.add_argument("--records", action="store_true",
                      help="with --json: also every zip record and storage (CheckpointInfo.to_dict())")
    info.set_defaults(func=cmd_info)

    diff = sub.add_parser(
        "diff", help="compare the tensors of two checkpoints (exit 1 if they differ)",
        description="Compare the tensors of two checkpoints by dotted name (as torchfree.flatten names "
                    "them): names only in one, dtype or shape changes, and the largest absolute "
                    "difference of common tensors. Any of torch checkpoints, "
                    ".safetensors, .npz and shard indexes, in any combination. Non-tensor values "
                    "(epoch, config) are not "
                    "compared. Exit status 0 if the tensors are the same, 1 if they differ, 2 on error.")
    diff.add_argument("a", metavar="A", help="the first checkpoint")
    diff.add_argument("b", metavar="B", help="the second checkpoint")
    diff.add_argument("--atol", type=float, default=0.0, metavar="X",
                      help="count elements as equal when they differ by at most X (default 0: exact)")
    diff.add_argument("--unsafe-globals", action="store_true",
                      help="read checkpoints that reference classes outside torch's weights_only "
                           "allowlist (weights_only=False: they become inert placeholders; nothing is run)")
    diff.add_argument("--json", action="store_true",
                      help="print the report as JSON (names only in A or B, changed dtypes or shapes, value "
                           "differences with counts and the largest absolute difference; inf as \"inf\", "
                           "null where values are not numbers)")
    diff.set_defaults(func=cmd_diff)

    conv = sub.add_parser(
        "convert", help="convert between .pt, .safetensors and .npz",
        description="Convert IN to OUT; formats by extension: .pt/.pth/.bin/.ckpt (torch.save format), "
                    ".safetensors, .npz (IN is told by content, and may also be a shard index "
                    "*.index.json). Nested checkpoints are "
                    "flattened to dotted names for .safetensors and .npz, which hold tensors only "
                    "(other values are dropped, with a note); views of one storage are written once per "
                    "name. A .pt written from .safetensors or .npz holds a flat OrderedDict. bfloat16 and "
                    "float8 become float32 in .npz (exact; numpy has no such dtypes). OUT is written "
                    "to a temporary file and renamed into place. A progress bar shows on a terminal "
                    "for large conversions.")
    conv.add_argument("input", metavar="IN", help="the checkpoint to read")
    conv.add_argument("output", metavar="OUT", help="the file to write (replaced if it exists)")
    conv.add_argument("--to", choices=FORMATS, help="output format, when OUT's extension does not say")
    conv.add_argument("--unsafe-globals", action="store_true",
                      help="read a checkpoint that references classes outside torch's weights_only "
                           "allowlist (weights_only=False; nothing is run)")
    g = conv.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show the progress bar (on stderr)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="never show it")
    conv.add_argument("-q", "--quiet", action="store_true", help="no notes about dropped values")
    conv.set_defaults(func=cmd_convert)
    return p


def _version() -> str:
    try:
        from ._version import __version__

        return __version__
    except Exception:  # pragma: no cover - broken install
        return "?"


def _quick_args(argv):
    """The Namespace argparse would make for the plain ``info [--json] FILE``, or None: that
    command then skips building the parser (argparse, gettext and shutil: ~4 ms a process)."""
    if len(argv) not in (2, 3) or argv[0] != "info":
        return None
    rest = argv[1:]
    js = "--json" in rest
    files = [a for a in rest if a != "--json"]
    if len(files) != 1 or len(rest) != 1 + js or files[0].startswith("-") or not files[0]:
        return None
    import types

    return types.SimpleNamespace(traceback=False, command="info", file=files[0], json=js, records=False,
                                 func=cmd_info)


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    args = _quick_args(sys.argv[1:] if argv is None else list(argv))
    if args is None:
        parser = _parser()
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.traceback:
        return args.func(args)
    from ._core import CheckpointError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`torchfree info x.pt | head`): not an error; keep Python quiet
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except (CLIError, CheckpointError, OSError, ValueError, OverflowError, MemoryError, UnicodeError) as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        msg = f"{e.filename}: {e.strerror}"
        if e.filename2 is not None:
            msg += f" (-> {e.filename2})"
    else:
        msg = str(e) or type(e).__name__
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return "; ".join(lines) if lines else type(e).__name__


# ---- inputs ------------------------------------------------------------------------------------


class _about:
    """Prefix errors raised while reading ``path`` with the path (unless they already name it)."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __enter__(self):
        return self

    def __exit__(self, tp, e, tb):
        if e is None or isinstance(e, (CLIError, OSError)):
            return False
        from ._core import CheckpointError

        if isinstance(e, CheckpointError) and self.path not in str(e):
            raise CLIError(f"{self.path}: {_one_line(e)}") from e
        return False


def detect(path) -> str:
    """``"pt"``, ``"safetensors"`` or ``"npz"``, from the file's first bytes: a zip whose first member
    is a ``.npy`` (or named ``*.npz``) is an npz, any other zip a torch checkpoint; the extension
    matters only for files that are neither (``*.safetensors`` then gets the safetensors reader's
    error, anything else the torch reader's)."""
    p = os.fspath(path)
    if p.endswith(".index.json"):
        from .safetensors import is_index

        return "safetensors" if is_index(p) else "pt"
    with open(p, "rb") as fh:
        head = fh.read(30 + 512)
        size = os.fstat(fh.fileno()).st_size
    if head[:4] == b"PK\x03\x04" and len(head) >= 30:
        n = int.from_bytes(head[26:28], "little")
        first = head[30 : 30 + n]
        return "npz" if first.endswith(b".npy") or p.lower().endswith(".npz") else "pt"
    if len(head) >= 10 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if p.lower().endswith(".safetensors"):
        return "safetensors"  # let the reader say what is wrong with it
    return "pt"


def _unsafe_hint(path, e) -> CLIError:
    return CLIError(f"{os.fspath(path)}: {_one_line(e)}; or run with --unsafe-globals to read unknown classes "
                    "as inert placeholders (nothing is run)")


class Tensors:
    """The tensors of one input by dotted name: dtype/shape from headers, arrays read one at a time."""

    def __init__(self, path, unsafe=False):
        self.path = os.fspath(path)
        self._h = None
        try:
            with _about(self.path):
                self._open(unsafe)
        except BaseException:
            self.close()
            raise

    def _open(self, unsafe):
        from ._core import UnsafeGlobalError

        self.format = detect(self.path)
        self._h = None
        self._owner = None
        if self.format == "pt":
            from ._scan import open as tf_open
            from ._scan import weights_only_check

            try:
                if self.path.endswith(".index.json"):
                    # each shard on its own, by what it holds (the index's weight_map may be stale)
                    from ._shardindex import _ShardIndex

                    self._h = _Group()
                    self._owner, infos = {}, []
                    idx = _ShardIndex(self.path)
                    for shard in idx.shards:
                        with _about(idx.files[shard]):
                            ck = tf_open(idx.files[shard], weights_only=not unsafe)
                            if not unsafe:  # open reads tensors past unknown globals; load would not
                                weights_only_check(idx.files[shard])
                            self._h.members.append(ck)
                            for t in ck.info.tensors:
                                if t.name in self._owner:
                                    raise CLIError(f"{self.path}: tensor {t.name!r} is in more than one shard")
                                self._owner[t.name] = ck
                                infos.append(t)
                else:
                    self._h = tf_open(self.path, weights_only=not unsafe)
                    if not unsafe:
                        weights_only_check(self.path)
                    infos = self._h.info.tensors
                    if unsafe:
                        infos = self._model_names(infos)
            except UnsafeGlobalError as e:
                raise _unsafe_hint(self.path, e) from None
        elif self.format == "safetensors":
            from . import safetensors as st

            self._h = st.safe_open(self.path)
            infos = st.scan(self.path).tensors
        else:
            from ._npz import open_npz, scan_npz

            infos = scan_npz(self.path).tensors
            self._h = open_npz(self.path)
        self.meta = {}
        for t in infos:
            if t.name in self.meta:
                raise CLIError(f"{self.path}: two tensors are both named {t.name!r}")
            self.meta[t.name] = t

    def _model_names(self, infos):
        """A pickled whole model (``torch.save(model)``) is compared by its state_dict names, as
        ``info`` and ``convert`` name its tensors: then it is loaded, its tensors found by walking
        module_state_dict. Other files keep their open() handle and names."""
        from . import _core
        from ._info import _is_torch_global
        from ._load import load
        from ._scan import _state_dict_children, scan_state_dict_names
        from ._walk import _PAIRS

        # a module's class is torch.nn's or another than torch's: without one, nothing to rename
        # (and the pickle is not run a second time)
        if not any(g.startswith("torch.nn.") or not _is_torch_global(g) for g in self._h.info.globals):
            return infos
        named = scan_state_dict_names(self.path).tensors
        if [t.name for t in named] == [t.name for t in infos]:
            return infos
        pairs = _core.walk(load(self.path, weights_only=False), _PAIRS, ".", _state_dict_children, False,
                           max_depth=_core.LIMITS["marks"])
        self._h.close()
        self._h = _Arrays(pairs)
        return named

    def __getitem__(self, name):
        h = self._h if self._owner is None else self._owner[name]
        with _about(self.path):
            arr = h[name]
        cache = getattr(h, "_cache", None)  # torchfree.open keeps what it read: not needed here
        if isinstance(cache, dict):
            cache.pop(name, None)
        return arr

    def close(self):
        if self._h is not None:
            self._h.close()
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Arrays(dict):
    """Arrays already loaded, by name, behind the handle interface of Tensors."""

    def close(self):
        self.clear()


class _Group:
    """Open checkpoints closed together."""

    def __init__(self):
        self.members = []

    def close(self):
        for m in self.members:
            m.close()
        self.members = []


# ---- info --------------------------------------------------------------------------------------


def cmd_info(args) -> int:
    with _about(args.file):
        return _info(args)


def _info(args) -> int:
    # its objects live until the process ends, or are freed by reference counts: no collection pass
    # (three of them, ~1 ms, in `torchfree info` of a 231-tensor file)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _info_unpaused(args)
    finally:
        if was_enabled:
            gc.enable()


def _info_unpaused(args) -> int:
    fmt = detect(args.file)
    meta = None
    if fmt == "pt":
        from ._scan import scan_state_dict_names

        info = scan_state_dict_names(args.file)  # a pickled model's tensors by state_dict names
    elif fmt == "safetensors":
        from . import safetensors as st

        info = st.scan(args.file)
        meta = st.metadata(args.file)
    else:
        from ._npz import scan_npz

        info = scan_npz(args.file)
    if args.records and not args.json:
        raise CLIError("--records needs --json")
    if args.json and args.records:
        import json

        d = info.to_dict()
        if meta is not None:
            d["metadata"] = meta
        out = json.dumps(d, indent=1)
    elif args.json:
        out = _info_json(info, meta)
    else:
        out = info.to_text()
        if meta:
            out += "\nmetadata: " + ", ".join(f"{k}={v}" for k, v in meta.items())
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
    return 0


def _info_json(info, meta=None) -> str:
    """``info --json``: the totals, then one compact object per tensor, one per line (a 48,000-tensor
    checkpoint in about the time of the text table). Tensor entries: name, dtype (torch's name),
    shape, stride (elements), storage (key, or null), offset (elements), nbytes, location; quantized
    and sparse tensors add layout, quant (qscheme, scale, zero_point, axis), nnz and parts."""
    from json import dumps
    from json.encoder import encode_basestring as enc

    head = {
        "path": None if info.path is None else str(info.path),
        "format": info.format,
        "byteorder": info.byteorder,
        "tensor_count": len(info.tensors),
        "storage_count": len(info._storage_list()),
        "total_bytes": info.total_bytes,
        "param_count": info.param_count,
        "dtype_totals": info.dtype_totals,
        "globals": list(info.globals),
    }
    if meta is not None:
        head["metadata"] = meta

    memo: dict = {}

    def cell(v):  # dtype, location, shape, stride: few distinct values in a checkpoint
        r = memo.get(v)
        if r is None:
            r = memo[v] = enc(v) if isinstance(v, str) else "[" + ",".join(map(str, v)) + "]"
        return r

    def rare(t):  # quantized and sparse tensors: their layout, quantizer, nnz and parts
        parts = [{"name": p.name, "dtype": p.torch_dtype, "shape": list(p.shape), "storage": p.storage_key,
                  "offset": p.storage_offset, "nbytes": p.nbytes} for p in t.parts]
        return "," + dumps({"layout": t.layout, "quant": None if t.quant is None else t.quant._asdict(),
                            "nnz": t.nnz, "parts": parts}, separators=(",", ":"))[1:-1]

    rows = [f'{{"name":{enc(t.name)},"dtype":{cell(t.torch_dtype)},"shape":{cell(t.shape)},'
            f'"stride":{cell(t.stride)},"storage":{"null" if (k := t.storage_key) is None else enc(str(k))},'
            f'"offset":{t.storage_offset},"nbytes":{t.nbytes},"location":{cell(t.location)}'
            f'{"" if t.quant is None and t.layout == "torch.strided" else rare(t)}}}'
            for t in info.tensors]
    return dumps(head, separators=(",", ":"))[:-1] + ',"tensors":[' + ("\n" if rows else "") + ",\n".join(rows) + "]}"


# ---- diff --------------------------------------------------------------------------------------


def _dtype_name(dt) -> str:
    import numpy as np

    if isinstance(dt, np.dtype):
        return "bool" if dt == np.bool_ else dt.name
    return str(dt)


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _numeric(a):
    """The array as float64/complex128 (exact for every float type numpy or ml_dtypes has, ints up
    to 2**53), or None if it has no numeric value (void, strings)."""
    import numpy as np

    k = a.dtype.kind
    if k == "c":
        return a.astype(np.complex128)
    if k in "fiub":
        return a.astype(np.float64)
    if k == "V" and a.dtype.name.startswith(("bfloat16", "float8", "float4", "float6")):
        return a.astype(np.float32).astype(np.float64)
    return None


_CHUNK = 1 << 22


def compare_arrays(a, b, atol=0.0):
    """``(elements that differ, max abs difference)`` of two arrays of one shape.

    NaN equals NaN; NaN against a number, or infinities of opposite sign, count as an infinite
    difference. Arrays without numeric values compare by bytes (max difference None).
    """
    import numpy as np

    fa = a.reshape(-1)
    fb = b.reshape(-1)
    n = fa.size
    differ, worst = 0, 0.0
    for s in range(0, n, _CHUNK):
        x, y = fa[s : s + _CHUNK], fb[s : s + _CHUNK]
        if x.dtype == y.dtype and x.tobytes() == y.tobytes():
            continue
        xn, yn = _numeric(x), _numeric(y)
        if xn is None or yn is None:
            if x.dtype != y.dtype or x.dtype.itemsize == 0:
                raise CLIError(f"cannot compare values of {x.dtype} and {y.dtype}")
            eq = (x.view(np.uint8).reshape(x.size, -1) == y.view(np.uint8).reshape(y.size, -1)).all(axis=1)
            differ += int(x.size - np.count_nonzero(eq))
            worst = None
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(xn - yn)
            same = (xn == yn) | (np.isnan(xn) & np.isnan(yn))
        d[same] = 0.0
        d[np.isnan(d)] = np.inf
        if x.dtype.kind in "iu" and y.dtype.kind in "iu":
            exact = x != y  # float64 rounds ints beyond 2**53
            d[exact & (d == 0)] = np.finfo(np.float64).tiny
            d[~exact] = 0.0
        differ += int(np.count_nonzero(d > atol))
        if worst is not None:
            worst = max(worst, float(d.max()) if d.size else 0.0)
    return differ, worst


def _nm(name: str) -> str:
    return name or "<root>"


def _fmt_diff(x) -> str:
    return "n/a (not numbers)" if x is None else f"{x:.6g}"


def cmd_diff(args) -> int:
    import numpy as np

    from ._types import MetaArray

    if args.atol < 0 or args.atol != args.atol:
        raise CLIError("--atol must be a non-negative number")

    def entry(name, t):
        return {"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}

    with Tensors(args.a, args.unsafe_globals) as A, Tensors(args.b, args.unsafe_globals) as B:
        only_a = [entry(k, A.meta[k]) for k in A.meta if k not in B.meta]
        only_b = [entry(k, B.meta[k]) for k in B.meta if k not in A.meta]
        common = [k for k in A.meta if k in B.meta]
        changed, valdiff, nodata = [], [], []
        same = 0
        for k in common:
            ta, tb = A.meta[k], B.meta[k]
            da, db = _dtype_name(ta.dtype), _dtype_name(tb.dtype)
            if tuple(ta.shape) != tuple(tb.shape):
                changed.append({"name": k, "a": entry(k, ta), "b": entry(k, tb)})
                continue
            x, y = A[k], B[k]
            if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
                what = "meta" if isinstance(x, MetaArray) or isinstance(y, MetaArray) else "no array"
                nodata.append(k)
                if da != db:
                    changed.append({"name": k, "a": entry(k, ta), "b": entry(k, tb), "not_compared": what})
                continue
            if da != db:
                c = {"name": k, "a": entry(k, ta), "b": entry(k, tb)}
                try:
                    n, worst = compare_arrays(x, y, args.atol)
                    c.update(elements_differ=n, max_abs_diff=worst if n else 0.0)
                except CLIError:
                    pass
                changed.append(c)
                continue
            n, worst = compare_arrays(x, y, args.atol)
            del x, y
            if n:
                total = 1
                for d in ta.shape:
                    total *= d
                valdiff.append({"name": k, "dtype": da, "shape": list(ta.shape), "elements_differ": n,
                                "elements": total, "max_abs_diff": worst})
            else:
                same += 1
    differ = bool(only_a or only_b or changed or valdiff)
    report = {
        "a": {"path": str(args.a), "format": A.format, "tensors": len(A.meta)},
        "b": {"path": str(args.b), "format": B.format, "tensors": len(B.meta)},
        "atol": args.atol, "differ": differ, "only_in_a": only_a, "only_in_b": only_b, "changed": changed,
        "values_differ": valdiff, "not_compared": nodata, "common": len(common), "identical": same,
    }
    if args.json:
        import json

        for e in report["changed"] + report["values_differ"]:  # JSON has no infinity
            if e.get("max_abs_diff") == float("inf"):
                e["max_abs_diff"] = "inf"
        out = json.dumps(report, indent=1)
    else:
        out = _diff_text(report)
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
    return 1 if differ else 0


def _diff_text(r) -> str:
    """The text form of cmd_diff's report."""
    out = [f"A: {r['a']['path']} ({r['a']['format']}, {r['a']['tensors']} tensors)",
           f"B: {r['b']['path']} ({r['b']['format']}, {r['b']['tensors']} tensors)"]

    def section(title, rows):
        if rows:
            out.append("")
            out.append(f"{title} ({len(rows)}):")
            out.extend(rows)

    def changed(c):
        a, b = c["a"], c["b"]
        if a["shape"] != b["shape"]:
            return f"  ~ {_nm(c['name'])}: {a['dtype']} {_shape(a['shape'])} -> {b['dtype']} {_shape(b['shape'])}"
        if "not_compared" in c:
            extra = f" (values not compared: {c['not_compared']})"
        elif "elements_differ" in c:
            extra = f", max abs diff {_fmt_diff(c['max_abs_diff'])}" if c["elements_differ"] else ", same values"
        else:
            extra = ""
        return f"  ~ {_nm(c['name'])}: {a['dtype']} -> {b['dtype']} {_shape(a['shape'])}{extra}"

    section("only in A", [f"  - {_nm(e['name'])}: {e['dtype']} {_shape(e['shape'])}" for e in r["only_in_a"]])
    section("only in B", [f"  + {_nm(e['name'])}: {e['dtype']} {_shape(e['shape'])}" for e in r["only_in_b"]])
    section("dtype or shape changed", [changed(c) for c in r["changed"]])
    atol = r["atol"]
    section("values differ" + (f" by more than {atol:g}" if atol else ""),
            [f"  ! {_nm(v['name'])}: {v['dtype']} {_shape(v['shape'])}: {v['elements_differ']:,} of "
             f"{v['elements']:,} elements differ, max abs diff {_fmt_diff(v['max_abs_diff'])}"
             for v in r["values_differ"]])
    section("no data to compare (meta tensors)", [f"  ? {_nm(k)}" for k in r["not_compared"]])
    out.append("")
    if r["differ"]:
        parts = [f"{len(r[x])} {w}" for x, w in (("only_in_a", "only in A"), ("only_in_b", "only in B"),
                                                 ("changed", "changed"), ("values_differ", "with different values"))
                 if r[x]]
        out.append(f"differ: {', '.join(parts)}; {r['identical']} of {r['common']} common tensors identical")
    else:
        out.append(f"same: {r['identical']} tensors identical" + (f" within {atol:g}" if atol else ""))
    return "\n".join(out)


# ---- convert -----------------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


class Progress:
    """A one-line progress bar on a terminal (``\\r`` redrawn, at most 10 times a second).

    Shown when ``enabled`` is True, or when it is None, the stream is a terminal and ``total`` is
    at least :data:`PROGRESS_MIN_BYTES`. Otherwise every call does nothing.
    """

    def __init__(self, total: int, label: str, stream=None, enabled=None):
        import time

        self._time = time.monotonic
        self.stream = sys.stderr if stream is None else stream
        self.total = max(int(total), 0)
        self.label = label
        self.done = 0
        if enabled is None:
            try:
                enabled = self.total >= PROGRESS_MIN_BYTES and self.stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = bool(enabled)
        self.start = self._time()
        self._last = 0.0
        self._width = 0

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = self._time()
        if now - self._last >= 0.1:
            self._last = now
            self._draw(now)

    def _draw(self, now) -> None:
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        bar_w = 28
        filled = int(frac * bar_w)
        rate = self.done / max(now - self.start, 1e-9)
        line = (f"{self.label} [{'#' * filled}{'.' * (bar_w - filled)}] {frac * 100:3.0f}% "
                f"{_human(self.done)} / {_human(self.total)}  {_human(rate)}/s")
        pad = max(self._width - len(line), 0)
        self._width = len(line)
        try:
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False

    def close(self) -> None:
        if self.enabled:
            self._draw(self._time())
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass
            self.enabled = False


class _CountingWriter:
    """A binary file object that reports the bytes written through it to a Progress."""

    def __init__(self, fh, progress):
        self._fh = fh
        self._progress = progress

    def write(self, b) -> int:
        n = self._fh.write(b)
        self._progress(len(memoryview(b).cast("B")) if n is None else n)
        return n

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _out_format(path, to) -> str:
    if to:
        return to
    low = os.fspath(path).lower()
    if low.endswith(TORCH_EXTS):
        return "pt"
    if low.endswith(".safetensors"):
        return "safetensors"
    if low.endswith(".npz"):
        return "npz"
    raise CLIError(f"cannot tell the output format from {os.fspath(path)!r}: use an extension "
                   f"({', '.join(TORCH_EXTS)}, .safetensors, .npz) or --to")


def _quantized_parts(name, q):
    """[(name, array)] a quantized tensor is written as in safetensors and npz: its integers
    (torch's ``int_repr()``) under its own name, then ``<name>.scale`` and ``<name>.zero_point``
    (0-d float64 / int64 per tensor, as ``q_scale()`` / ``q_zero_point()``; per channel the 1-D
    ``q_per_channel_scales()`` / ``q_per_channel_zero_points()`` arrays) and, per channel,
    ``<name>.axis`` (0-d int64): the names torch's quantized modules give their own scale and
    zero_point in ``state_dict()``. Sub-byte dtypes (quint4x2, quint2x4) are refused."""
    import numpy as np

    where = name or "<root>"
    if q.dtype in ("torch.quint4x2", "torch.quint2x4"):
        raise CLIError(f"{where}: a {q.dtype} tensor packs several values a byte; safetensors and npz "
                       "cannot hold it (convert to .pt)")
    out = [(name, q.int_repr)]
    pre = f"{name}." if name else ""
    if q.axis is None:
        out += [(pre + "scale", np.array(q.scale, dtype=np.float64)),
                (pre + "zero_point", np.array(q.zero_point, dtype=np.int64))]
    else:
        out += [(pre + "scale", np.ascontiguousarray(q.scale)), (pre + "zero_point", np.ascontiguousarray(q.zero_point)),
                (pre + "axis", np.array(q.axis, dtype=np.int64))]
    return out


def _flat_tensors(obj, note):
    """``OrderedDict`` dotted name -> ndarray of a loaded checkpoint; non-tensor leaves are noted.

    A quantized tensor becomes its integers plus ``.scale`` / ``.zero_point`` (``.axis``) arrays
    (``_quantized_parts``); a sparse tensor is refused, naming it."""
    import collections

    import numpy as np

    from ._scan import _state_dict_children as _children  # a pickled model: its state_dict names
    from ._types import MetaArray, QuantizedArray, SparseArray

    flat = collections.OrderedDict()
    dropped = []
    stack = [("", obj)]
    seen = set()
    while stack:
        name, o = stack.pop()
        if isinstance(o, np.ndarray):
            if name in flat:
                raise CLIError(f"two tensors would both be named {name!r}: cannot flatten this checkpoint")
            flat[name] = o
            continue
        if isinstance(o, MetaArray):
            raise CLIError(f"{name or '<root>'}: a meta tensor has no data to convert")
        if isinstance(o, QuantizedArray):
            for k, a in _quantized_parts(name, o):
                if k in flat:
                    raise CLIError(f"two tensors would both be named {k!r}: cannot flatten this checkpoint")
                flat[k] = a
            continue
        if isinstance(o, SparseArray):
            raise CLIError(f"{name or '<root>'}: a sparse tensor ({o.layout}) cannot be converted: safetensors "
                           "and npz hold dense tensors only (convert to .pt, which keeps it sparse)")
        kids = _children(o)
        if kids is None or (not kids and not isinstance(o, (dict, list, tuple))):
            if o is not None:
                kind = o.qualname if hasattr(o, "qualname") else type(o).__name__
                if hasattr(o, "int_repr") or hasattr(o, "todense"):
                    raise CLIError(f"{name or '<root>'}: {type(o).__name__} cannot be converted "
                                   "(safetensors and npz hold dense tensors only)")
                dropped.append(f"{name or '<root>'} ({kind})")
            continue
        if id(o) in seen:
            continue
        seen.add(id(o))
        for k, v in reversed(kids):
            stack.append((f"{name}.{k}" if name else k, v))
    if dropped:
        more = f" and {len(dropped) - 8} more" if len(dropped) > 8 else ""
        note(f"{len(dropped)} non-tensor value(s) not converted: {', '.join(dropped[:8])}{more}")
    return flat


def _models_as_state_dicts(obj):
    """A whole pickled model (or one under a key of the top-level dict) as its state_dict
    (``torchfree.module_state_dict``): what a .pt can hold without the model's classes."""
    import collections

    from .statedict import _module_state, module_state_dict

    if _module_state(obj) is not None:
        return module_state_dict(obj)
    if isinstance(obj, dict) and any(_module_state(v) is not None for v in obj.values()):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = module_state_dict(v) if _module_state(v) is not None else v
        return out
    return obj


def _read_input(path, fmt, unsafe):
    """(object to write, metadata or None) of the input."""
    if fmt == "pt":
        from ._core import UnsafeGlobalError
        from ._load import load

        try:
            obj = load(path, weights_only=not unsafe)
        except UnsafeGlobalError as e:
            raise _unsafe_hint(path, e) from None
        return obj, None
    if fmt == "safetensors":
        import collections

        from . import safetensors as st

        with st.safe_open(path) as f:
            return collections.OrderedDict(f.items()), f.metadata()
    from ._npz import load_npz

    return load_npz(path), None


def _atomic_write(path, write):
    """Call ``write(fh)`` on a temporary file next to ``path``, then rename it over ``path``."""
    from ._files import atomic_write, write_through_file

    atomic_write(path, write_through_file(write))


def cmd_convert(args) -> int:
    import collections

    notes = []  # printed once OUT is written, so that an error stays the only line
    note = notes.append

    out_fmt = _out_format(args.output, args.to)
    in_fmt = detect(args.input)
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise CLIError(f"IN and OUT are the same file: {args.output}")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise CLIError(f"{args.output}: no such folder: {folder}")
    if os.path.isdir(args.output):
        raise CLIError(f"{args.output}: is a folder")
    if out_fmt == "pt":
        from ._save import save

    with _about(args.input):
        obj, meta = _read_input(args.input, in_fmt, args.unsafe_globals)
    if out_fmt == "pt":
        from ._walk import flatten

        if in_fmt != "pt":
            obj = collections.OrderedDict(obj)
        obj = _models_as_state_dicts(obj)
        flat = flatten(obj)
        total = sum(int(getattr(a, "nbytes", 0)) for a in flat.values())
    else:
        flat = obj if in_fmt != "pt" else _flat_tensors(obj, note)
        total = sum(int(a.nbytes) for a in flat.values())
    progress = Progress(total, f"{os.path.basename(args.output)}", enabled=args.progress)
    try:
        if out_fmt == "safetensors":
            from . import safetensors as st

            if meta is None:
                meta = {"format": "np" if in_fmt == "npz" else "pt"}
            try:
                head = st._prepare(flat, meta)  # check every name and dtype before writing anything
            except TypeError as e:
                raise CLIError(str(e)) from None
            del head
            _atomic_write(args.output, lambda fh: st.save_file(flat, fh, meta, progress=progress))
        elif out_fmt == "npz":
            from ._npz import needs_upcast, save_npz

            up = [f"{k} ({a.dtype.name})" for k, a in flat.items() if needs_upcast(a.dtype)]
            if up:
                more = f" and {len(up) - 4} more" if len(up) > 4 else ""
                note(f"{len(up)} bfloat16/float8 tensor(s) stored as float32 (exact; numpy has no such "
                     f"dtype): {', '.join(up[:4])}{more}")
            try:
                _atomic_write(args.output, lambda fh: save_npz(flat, fh, progress))
            except TypeError as e:
                raise CLIError(str(e)) from None
        else:
            def write_pt(fh):  # always a file object, so the bytes do not depend on the terminal
                save(obj, _CountingWriter(fh, progress))

            try:
                _atomic_write(args.output, write_pt)
            except TypeError as e:
                raise CLIError(str(e)) from None
    finally:
        progress.close()
    if not args.quiet:
        for msg in notes:
            print(f"{PROG}: note: {msg}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
