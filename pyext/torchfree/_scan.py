"""scan(), open() and flatten(): look inside a checkpoint without loading it.

``scan`` runs the pickle on the C core in lazy mode: every tensor becomes a validated
``TensorRef`` (dtype, shape, strides, storage) and no storage byte is read. ``open`` keeps
that lazy archive open and reads one storage record when one of its tensors is asked for.
Both name tensors with the dotted paths of ``flatten``.
"""

from __future__ import annotations

import builtins
import collections
import gc
import os
import operator
import weakref
from collections import namedtuple

from ._np import np

from . import _core
from ._load import Source, load_safetensors, options, safetensors_entries, safetensors_input, safetensors_meta
from ._types import MetaArray, Opaque, QuantizedArray, SparseArray

__all__ = ["flatten", "scan", "open", "Checkpoint", "CheckpointInfo", "TensorInfo", "StorageInfo", "RecordInfo",
           "QuantInfo"]


# ---- flatten ---------------------------------------------------------------------------


def _children(obj):
    """(name, child) pairs of a container, in order; None for leaves and scalars."""
    if isinstance(obj, dict):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(obj)]
    if isinstance(obj, Opaque):
        # an Opaque's state comes first, then its items, list and args; a state that is itself an
        # Opaque (BUILD of BUILD ...) is followed down in a loop, not by recursion: a hostile pickle
        # can chain them deeper than Python's stack, or make one its own state
        chain, seen = [obj], {id(obj)}
        while isinstance(chain[-1].state, Opaque) and id(chain[-1].state) not in seen:
            seen.add(id(chain[-1].state))
            chain.append(chain[-1].state)
        out = []
        state = chain[-1].state
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(s, (dict, type(None))) for s in state):
            for part in state:
                out += _children(part or {})
        elif isinstance(state, (dict, list, tuple)):
            out += _children(state)
        for o in reversed(chain):
            out += [(str(k), v) for k, v in o.items.items()]
            out += [(str(i), v) for i, v in enumerate(o.list)]
            if o.args and not o.wrapper_subclass:  # a wrapper's args: its placeholder
                out += [(f"args.{i}", v) for i, v in enumerate(o.args)]
        return out
    return None


def _max_depth(opts) -> int:
    """How deep the walk may go: the loader's ``marks`` limit (container nesting)."""
    lim = opts.get("limits") if opts else None
    return int(lim["marks"]) if lim else _core.LIMITS["marks"]


_PAIRS, _INDEX, _INFOS, _FIND = 0, 1, 2, 3


def _walk(obj, sep=".", refs=False, max_depth=None):
    """[(dotted name, leaf)] of every array (and TensorRef when refs) under obj, depth first, a
    shared container once; C (_core.walk), with Opaque children from _children."""
    return _core.walk(obj, _PAIRS, sep, _children, refs, max_depth=max_depth or _core.LIMITS["marks"])


def flatten(obj, sep: str = ".") -> "collections.OrderedDict[str, np.ndarray]":
    """Every tensor in nested containers (and in Opaque states) by dotted path.

    ``{"model_state_dict.fc1.weight": array, "optimizer_state_dict.state.0.momentum_buffer": ...}``.
    A bare array flattens to ``{"": array}``. The names are the ones ``scan`` and ``open`` use.
    A quantized or sparse tensor is one entry, the ``QuantizedArray`` / ``SparseArray`` itself
    (its integers, scales, indices and values are not listed apart), as torch's ``state_dict()``
    holds the quantized tensor: a dynamic-quantized Linear's weight is
    ``"0._packed_params._packed_params.0"``, its bias ``"...1"``.
    """
    return collections.OrderedDict(_walk(obj, sep))


# ---- scan --------------------------------------------------------------------------------


class RecordInfo(namedtuple("RecordInfo", "name compressed compressed_size size offset")):
    """One record of the container (zip entry): name, compressed, compressed_size, size, offset."""

    __slots__ = ()


class StorageInfo(namedtuple("StorageInfo", "key dtype nbytes location record")):
    """One storage record, listed once however many tensors view it: key, dtype, nbytes, location,
    record."""

    __slots__ = ()


class QuantInfo(namedtuple("QuantInfo", "qscheme scale zero_point axis")):
    """A quantized tensor's quantizer, as ``TensorInfo.quant``: ``qscheme`` (torch's name, such as
    ``"torch.per_tensor_affine"``), ``scale`` and ``zero_point`` (a float and an int per tensor,
    as torch's ``q_scale()`` / ``q_zero_point()``; per channel, tuples of floats and of ints (floats
    for ``per_channel_affine_float_qparams``), as ``q_per_channel_scales()`` /
    ``q_per_channel_zero_points()``), and ``axis`` (None per tensor, else ``q_per_channel_axis()``).
    """

    __slots__ = ()


class TensorInfo(_core.TensorInfoBase):
    """One tensor, as ``load`` would return it, without its bytes.

    ``name``, ``dtype`` (numpy dtype of the array load returns, or ``"torch.<name>"``), ``shape``,
    ``strides`` (bytes, as the array's), ``stride`` (elements, as torch's ``.stride()``),
    ``storage_key`` (None for arrays pickled inline), ``storage_offset`` (elements), ``nbytes``
    (the tensor's own elements), ``location``, ``torch_dtype``, ``conj``/``neg`` (torch's lazy
    bits: load applies them to a copy), and ``numel``. Scan makes these in C; the tuples are
    built on first access.

    Quantized and sparse tensors are listed too, as ``load`` returns them
    (``torchfree.QuantizedArray`` / ``SparseArray``):

    - quantized: ``dtype`` is torch's name (``"torch.qint8"``), ``torch_dtype`` ``"qint8"``;
      shape, strides, storage and ``nbytes`` are those of its integers (``int_repr``); ``quant``
      is its ``QuantInfo``; a per-channel tensor's ``parts`` are the TensorInfos of its scales
      and zero points (``<name>.q_per_channel_scales`` / ``<name>.q_per_channel_zero_points``)
      when the file holds them as tensors.
    - sparse: ``layout`` is torch's (``"torch.sparse_coo"``, ``"torch.sparse_csr"``, ...), ``shape``
      the dense shape, ``dtype`` that of its values, ``nnz`` its number of specified elements,
      ``strides``/``stride`` ``()`` and ``storage_key`` None (torch's sparse tensors have neither);
      ``parts`` are the TensorInfos of its arrays under torch's accessor names
      (``<name>.indices``, ``<name>.values``; ``<name>.crow_indices``, ``<name>.col_indices``, ...),
      each with its own storage; ``nbytes`` is theirs in all.

    For every other tensor ``layout`` is ``"torch.strided"``, ``quant`` and ``nnz`` None and
    ``parts`` ``()``.
    """

    __slots__ = ()
    _fields = ("name", "dtype", "shape", "strides", "stride", "storage_key", "storage_offset", "nbytes",
               "location", "torch_dtype", "conj", "neg", "layout", "quant", "nnz", "parts")

    def _astuple(self) -> tuple:
        return _ti_fields(self)

    def _asdict(self) -> dict:
        return dict(zip(self._fields, self._astuple()))

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._astuple() == other._astuple()

    def __hash__(self):
        return hash(self._astuple())

    def __reduce__(self):
        return type(self), self._astuple()

    def __repr__(self) -> str:
        return "TensorInfo(" + ", ".join(f"{k}={v!r}" for k, v in zip(self._fields, self._astuple())) + ")"


_ti_fields = operator.attrgetter(*TensorInfo._fields)


def _array_info(name, a, dtype=None, torch_dtype=None, shape=None, **kw) -> TensorInfo:
    """TensorInfo of an ndarray: its storage record's key, offset and location when it views one
    (a part of a quantized or sparse tensor a lazy archive rebuilt), else "pickle"."""
    key, offset, location = None, 0, "pickle"
    base = a.base
    if isinstance(base, _core.Storage):
        key, location = base.key, base.location
        if a.size and base.nbytes:
            start = np.frombuffer(base, np.uint8).__array_interface__["data"][0]
            offset = (a.__array_interface__["data"][0] - start) // max(a.itemsize, 1)
    item = a.itemsize
    return TensorInfo(name, a.dtype if dtype is None else dtype, a.shape if shape is None else shape, a.strides,
                      tuple(s // item for s in a.strides) if item else a.strides, key, offset, a.nbytes, location,
                      _torch_name(a.dtype) if torch_dtype is None else torch_dtype, **kw)


def _tensor_info(name, leaf) -> TensorInfo:
    """TensorInfo of a leaf that is not a TensorRef (the C walk makes those)."""
    if isinstance(leaf, QuantizedArray):
        if leaf.axis is None:
            quant = QuantInfo(leaf.qscheme, leaf.scale, leaf.zero_point, None)
            parts = ()
        else:
            zp = leaf.zero_point.tolist()
            quant = QuantInfo(leaf.qscheme, tuple(leaf.scale.tolist()), tuple(zp), leaf.axis)
            parts = tuple(_array_info(f"{name}.{what}", a)
                          for what, a in (("q_per_channel_scales", leaf.scale),
                                          ("q_per_channel_zero_points", leaf.zero_point))
                          if isinstance(a.base, _core.Storage))
        shape = leaf.shape if leaf.int_repr.shape == leaf.shape else None  # quint4x2: packed bytes
        info = _array_info(name, leaf.int_repr, leaf.dtype, leaf.dtype.removeprefix("torch."), quant=quant,
                           parts=parts)
        if shape is None:  # sub-byte: the tensor's shape, torch's contiguous strides of it
            stride, c = [], 1
            for s in reversed(leaf.shape):
                stride.append(c)
                c *= s
            stride = tuple(reversed(stride))
            info = TensorInfo(name, leaf.dtype, leaf.shape, (), stride, info.storage_key, info.storage_offset,
                              info.nbytes, info.location, info.torch_dtype, quant=quant, parts=parts)
        return info
    if isinstance(leaf, SparseArray):
        if leaf.layout == "torch.sparse_coo":
            arrays = (("indices", leaf.indices), ("values", leaf.values))
        else:
            c, p = _SPARSE_PART_NAMES[leaf.layout]
            arrays = ((c, leaf.compressed_indices), (p, leaf.plain_indices), ("values", leaf.values))
        parts = tuple(_array_info(f"{name}.{what}", a) for what, a in arrays)
        values = parts[-1]
        return TensorInfo(name, leaf.dtype, leaf.shape, (), (), None, 0, sum(p.nbytes for p in parts),
                          values.location, values.torch_dtype, layout=leaf.layout, nnz=leaf.nnz, parts=parts)
    if isinstance(leaf, MetaArray):
        dt = leaf.dtype
        item = dt.itemsize if isinstance(dt, np.dtype) else 0
        n = leaf.size
        strides, c = [], 1
        for s in reversed(leaf.shape):
            strides.append(c)
            c *= s
        stride = tuple(reversed(strides))
        return TensorInfo(name, dt, leaf.shape, tuple(s * item for s in stride), stride, None, 0, n * item, "meta",
                          _torch_name(dt))
    return _array_info(name, leaf)


_SPARSE_PART_NAMES = {
    "torch.sparse_csr": ("crow_indices", "col_indices"),
    "torch.sparse_csc": ("ccol_indices", "row_indices"),
    "torch.sparse_bsr": ("crow_indices", "col_indices"),
    "torch.sparse_bsc": ("ccol_indices", "row_indices"),
}


def _rare(t) -> str:
    """The table's quantizer / layout cell of a TensorInfo."""
    q = t.quant
    if q is not None:
        scheme = q.qscheme.removeprefix("torch.")
        if q.axis is None:
            return f"{scheme} scale={q.scale!r} zero_point={q.zero_point}"
        sc = ", ".join(f"{v:.6g}" for v in q.scale[:3]) + (", ..." if len(q.scale) > 3 else "")
        zp = ", ".join(str(v) for v in q.zero_point[:3]) + (", ..." if len(q.zero_point) > 3 else "")
        return f"{scheme} axis={q.axis} scales=[{sc}] zero_points=[{zp}]"
    if t.nnz is not None:
        return f"{t.layout.removeprefix('torch.')} nnz={t.nnz}"
    return ""


def _tensor_infos(obj, max_depth=None, children=None) -> list:
    return _core.walk(obj, _INFOS, ".", children or _children, True, TensorInfo, _tensor_info,
                      max_depth or _core.LIMITS["marks"])


def _torch_name(dt) -> str:
    if isinstance(dt, np.dtype):
        return "bool" if dt == np.bool_ else dt.name
    return str(dt).removeprefix("torch.")


def _memo(fn):
    """fn with its results kept for the call at hand."""
    cache: dict = {}

    def get(key):
        v = cache.get(key)
        if v is None:
            v = cache[key] = fn(key)
        return v

    return get


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class _Later:
    """A list made on first access: fn(*args)."""

    __slots__ = ("fn", "args")

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args


def _lazy_list(attr):
    def get(self):
        v = getattr(self, attr)
        if type(v) is _Later:
            v = v.fn(*v.args)
            setattr(self, attr, v)
        return v

    def set(self, value):
        setattr(self, attr, value)

    return property(get, set)


_TEXT_ROWS = 60  # rows print(info) shows: the first 50 and the last 10 of a longer table
_HTML_ROWS = 500  # rows the notebook view shows: the first 450 and the last 50


class CheckpointInfo:
    """What ``scan`` found: container, records, storages, tensors and globals.

    ``records`` and ``storages`` are listed on first access.
    """

    def __init__(self, path, format, byteorder, records=None, storages=None, tensors=None, globals=None):
        self.path = path
        self.format = format
        self.byteorder = byteorder
        self._records = [] if records is None else records
        self._storages = [] if storages is None else storages
        self.tensors = [] if tensors is None else tensors
        self.globals = [] if globals is None else globals

    records = _lazy_list("_records")
    storages = _lazy_list("_storages")

    def __getstate__(self):
        self.records, self.storages  # noqa: B018 - lists made now: what they are made from stays here
        return self.__dict__

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k)
                   for k in ("path", "format", "byteorder", "records", "storages", "tensors", "globals"))

    __hash__ = None

    @property
    def total_bytes(self) -> int:
        """Bytes of all storages (shared ones once)."""
        return sum(s.nbytes for s in self._storage_list())

    def _storage_list(self) -> list:
        """The storages, or what StorageInfos are made of (as many, the same nbytes) when they are
        not made yet: the header and totals need no numpy dtype (bfloat16: no ml_dtypes import)."""
        v = self._storages
        return v.args[0] if type(v) is _Later else v

    @property
    def param_count(self) -> int:
        """Elements of all tensors (a view counts its own elements)."""
        return sum(t.numel for t in self.tensors)

    @property
    def dtype_totals(self) -> dict:
        """{dtype name: bytes of tensors of that dtype} (meta tensors hold no bytes: they count
        in ``param_count``, not here, as not in ``total_bytes``)."""
        out: dict = collections.Counter()
        for t in self.tensors:  # torch's names: listing them needs no ml_dtypes
            if t.location != "meta":
                out[t.torch_dtype] += t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def __getitem__(self, name) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict:
        """A JSON-safe dict."""

        def dt(d):  # a numpy dtype's name (asked without importing numpy), else str(d) ("torch.<name>")
            name = None if isinstance(d, str) else getattr(d, "name", None)
            return name if isinstance(name, str) else str(d)

        return {
            "path": None if self.path is None else str(self.path),
            "format": self.format,
            "byteorder": self.byteorder,
            "total_bytes": self.total_bytes,
            "param_count": self.param_count,
            "dtype_totals": self.dtype_totals,
            "globals": list(self.globals),
            "records": [r._asdict() for r in self.records],
            "storages": [dict(s._asdict(), dtype=dt(s.dtype)) for s in self.storages],
            "tensors": [
                {
                    "name": t.name,
                    "dtype": dt(t.dtype),
                    "torch_dtype": t.torch_dtype,
                    "shape": list(t.shape),
                    "strides": list(t.strides),
                    "stride": list(t.stride),
                    "storage_key": t.storage_key,
                    "storage_offset": t.storage_offset,
                    "nbytes": t.nbytes,
                    "location": t.location,
                    "layout": t.layout,
                    "quant": None if t.quant is None else t.quant._asdict(),
                    "nnz": t.nnz,
                    "parts": [{"name": p.name, "dtype": dt(p.dtype), "shape": list(p.shape),
                               "storage_key": p.storage_key, "storage_offset": p.storage_offset,
                               "nbytes": p.nbytes} for p in t.parts],
                }
                for t in self.tensors
            ],
        }

    def to_json(self, **kw) -> str:
        import json  # here: `torchfree info` without --json does not need it

        return json.dumps(self.to_dict(), **kw)

    def _header(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        return (f"{where}{self.format} checkpoint ({self.byteorder}-endian), {len(self.tensors)} tensors, "
                f"{len(self._storage_list())} storages, {_human(self.total_bytes)}, {self.param_count:,} elements")

    def __str__(self) -> str:
        return self.to_text(max_rows=_TEXT_ROWS)

    def to_text(self, max_rows: "int | None" = None) -> str:
        """The header, the tensor table and the totals: what ``print(info)`` shows. With
        ``max_rows`` (``print`` uses 60, as the notebook view caps its table) a longer table keeps
        its first and last rows around a "... N more tensors" line; ``None`` lists every tensor
        (``torchfree info``)."""
        ts = self.tensors
        cut = max_rows is not None and len(ts) > max(max_rows, 2)
        if cut:
            tail = max(max_rows // 6, 1)
            head = max_rows - tail
            ts = ts[:head] + ts[len(ts) - tail:]
        table = _core.info_table(ts)  # C, for what scan made: 50,000 rows in ~10 ms
        if table is None:
            table = self._table(ts)
        if cut:
            rows = table.split("\n")
            rows.insert(2 + head, f"... {len(self.tensors) - head - tail:,} more tensors")
            table = "\n".join(rows)
        lines = [self._header(), "", table]
        totals = ", ".join(f"{k} {_human(v)}" for k, v in self.dtype_totals.items())
        lines += ["", f"by dtype: {totals or '-'}"]
        odd = [g for g in self.globals if not _is_torch_global(g)]
        if odd:
            lines.append(f"other globals: {', '.join(odd)}")
        return "\n".join(lines)

    def _table(self, ts=None) -> str:
        """The table of to_text (of every tensor, or of ts), made here for tensors scan did not make
        (shards, TensorInfos made by hand) or with non-ASCII cells."""
        ts = self.tensors if ts is None else ts
        human = _memo(_human)
        cols = [
            ["name"] + [t.name or "<root>" for t in ts],
            ["dtype"] + [t.torch_dtype for t in ts],
            ["shape"] + ["x".join(map(str, t.shape)) or "()" for t in ts],
            ["storage"] + ["-" if (k := t.storage_key) is None else str(k) for t in ts],
            ["offset"] + [str(t.storage_offset) for t in ts],
            ["size"] + [human(t.nbytes) for t in ts],
            ["location"] + [t.location for t in ts],
        ]
        if any(t.quant is not None or t.nnz is not None for t in ts):  # quantizers, sparse layouts
            cols[3] = ["storage"] + [",".join(str(p.storage_key) for p in t.parts) if t.nnz is not None
                                     else cols[3][i + 1] for i, t in enumerate(ts)]
            cols.append(["quantizer / layout"] + [_rare(t) for t in ts])
        widths = [max(map(len, c)) for c in cols]
        fmt = "  ".join(f"{{:{'<' if j in (0, 1, 3, 6, 7) else '>'}{w}}}" for j, w in enumerate(widths)).format
        rows = [fmt(*r).rstrip() for r in zip(*cols)]
        rows.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"<CheckpointInfo {self._header()}>"

    def _repr_html_(self) -> str:
        import html  # imported here: html.entities alone costs ~4 ms at import

        e = html.escape
        totals = self.dtype_totals
        whole = max(sum(totals.values()), 1)
        colors = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7"]
        bar = "".join(
            f'<div title="{e(k)}: {e(_human(v))}" style="width:{100 * v / whole:.2f}%;background:{colors[i % 8]}">'
            "</div>" for i, (k, v) in enumerate(totals.items()))
        legend = " ".join(
            f'<span><span style="display:inline-block;width:.8em;height:.8em;background:{colors[i % 8]}">'
            f"</span> {e(k)} {e(_human(v))}</span>" for i, (k, v) in enumerate(totals.items()))
        biggest = sorted(self.tensors, key=lambda t: -t.nbytes)[:10]
        top = max((t.nbytes for t in biggest), default=1) or 1
        big_rows = "".join(
            f"<tr><td>{e(t.name)}</td><td>{e(_human(t.nbytes))}</td>"
            f'<td><div style="width:{200 * t.nbytes / top:.0f}px;height:.7em;background:#4e79a7"></div></td></tr>'
            for t in biggest)
        def row(t):
            return (f"<tr><td>{e(t.name)}</td><td>{e(t.torch_dtype)}</td><td>{e(str(tuple(t.shape)))}</td>"
                    f"<td>{e(str(t.storage_key))}</td><td>{t.storage_offset}</td><td>{e(_human(t.nbytes))}</td>"
                    f"<td>{e(t.location)}</td></tr>")

        ts = self.tensors
        if len(ts) > _HTML_ROWS:  # the first and the last rows, as print() shows them
            tail = _HTML_ROWS // 10
            head = _HTML_ROWS - tail
            rows = ("".join(map(row, ts[:head])) + f'<tr><td colspan="7">… {len(ts) - _HTML_ROWS:,} more tensors'
                    "</td></tr>" + "".join(map(row, ts[len(ts) - tail:])))
        else:
            rows = "".join(map(row, ts))
        return (
            f'<div class="torchfree-info"><p><b>{e(self._header())}</b></p>'
            f'<div style="display:flex;height:1em;width:100%;border:1px solid #ccc">{bar}</div>'
            f"<p>{legend}</p><p><b>largest tensors</b></p><table>{big_rows}</table>"
            "<table><thead><tr><th>name</th><th>dtype</th><th>shape</th><th>storage</th><th>offset</th>"
            f"<th>size</th><th>location</th></tr></thead><tbody>{rows}</tbody></table></div>")


def _is_torch_global(g: str) -> bool:
    return g.startswith(("torch.", "collections.OrderedDict", "_codecs.", "builtins."))


def _info_from(archive, obj, path, storages, max_depth=None, children=None) -> CheckpointInfo:
    tensors = _tensor_infos(obj, max_depth, children)
    recs = _Later(_core.record_infos, archive.record_table(), RecordInfo)
    sinfo = _Later(_core.storage_infos, storages, archive.prefix + "/data/", StorageInfo)
    fmt = "torchscript" if archive.torchscript else "zip"
    return CheckpointInfo(path, fmt, archive.byteorder, recs, sinfo, tensors, archive.globals())


#: rebuilds of tensors whose listing needs the values of their parts
_VALUED_REBUILDS = frozenset(f"torch._utils._rebuild_{k}" for k in ("qtensor", "sparse_tensor", "sparse_csr_tensor"))


def _legacy_scan(src, opts, children=None):
    """scan() of a legacy stream or tar: the pickles run, no storage byte is copied."""
    obj, storages, globs, fmt = _core.load_legacy(*src.args(), **src.kwargs(), **opts, lazy=True,
                                                  collect_globals=True)
    if _VALUED_REBUILDS.intersection(globs):
        # quantized and sparse tensors are listed with values of their parts (scales, indices),
        # and a legacy stream's bytes follow its pickle: such a file is read whole
        obj, storages, globs, fmt = _core.load_legacy(*src.args(), **src.kwargs(), **opts, collect_globals=True)
    tensors = _tensor_infos(obj, _max_depth(opts), children)
    sinfo = _Later(_core.storage_infos, list(storages), "storage ", StorageInfo)
    return CheckpointInfo(src.path, fmt, "little", [], sinfo, tensors, globs)


class _LoadedArchive:
    """What Checkpoint needs of an Archive, for a legacy stream or tar: read whole at open
    (its bytes follow its pickle), so every tensor is already an array."""

    torchscript = False
    prefix = ""
    byteorder = "little"

    def __init__(self, src, opts):
        self._src, self._opts = src, opts
        self.obj, self._storages, self._globals, self.format = _core.load_legacy(
            *src.args(), **src.kwargs(), **opts, collect_globals=True)
        self.closed = False

    def storages(self):
        return list(self._storages)

    def read_storage(self, storage):
        if not isinstance(storage, _core.Storage):
            raise TypeError("expected a torchfree.Storage")
        return storage  # read with the stream

    def globals(self):
        return list(self._globals)

    def info(self) -> CheckpointInfo:
        return _legacy_scan(self._src, self._opts)

    def close(self):
        self.closed = True
        self.obj = self._storages = None


def _state_dict_children(obj, found=None):
    """_children, with a pickled nn.Module's children its state_dict entries (module_state_dict);
    ``found`` (a list) gets each such module."""
    from .statedict import _module_state, module_state_dict

    if _module_state(obj) is not None:
        if found is not None:
            found.append(obj)
        return list(module_state_dict(obj).items())
    return _children(obj)


def scan_state_dict_names(f) -> CheckpointInfo:
    """scan(f), with the tensors of a whole pickled model (``torch.save(model)``) named as
    ``model.state_dict()`` names them (``torchfree.module_state_dict``): the names ``torchfree
    info`` shows. Non-persistent buffers and other module attributes are not listed, nor counted
    in the storages and totals."""
    if isinstance(f, (str, os.PathLike)) and (os.fspath(f).endswith(".index.json") or not os.path.isfile(f)):
        return scan(f)  # shards, folders: their own names
    found: list = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        info = _scan(f, None, None, lambda o: _state_dict_children(o, found))
    finally:
        if gc_was_enabled:
            gc.enable()
    if found:  # storages only what is left out views: not in the listing, not in the totals
        keys = {t.storage_key for t in info.tensors}
        v = info._storages
        if type(v) is _Later:
            v.args = ([s for s in v.args[0] if s.key in keys],) + v.args[1:]
        else:
            info._storages = [s for s in v if s.key in keys]
    return info


def scan(f, map_location=None, *, limits=None) -> CheckpointInfo:
    """Describe a checkpoint from its container index and pickle only: no tensor byte is read.

    Unknown globals never raise here: they are listed in ``.globals`` (the pickle is still never
    executed). ``map_location`` only changes the reported ``location`` of each storage (a callable
    is not called: it would need the bytes).
    """
    if isinstance(f, (str, os.PathLike)) and os.fspath(f).endswith(".index.json"):
        return _ShardIndex(f).scan(map_location=map_location, limits=limits)
    st = safetensors_input(f)
    if st is not None:  # told by its header, whatever the name
        return _scan_safetensors(*st)
    if callable(map_location) and not isinstance(map_location, (str, dict)):
        map_location = None
    # the pickle's containers come and go within this call: no collection pass over them
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _scan(f, map_location, limits)
    finally:
        if gc_was_enabled:
            gc.enable()


def _scan_safetensors(kind, src) -> CheckpointInfo:
    from . import safetensors as st

    if kind == "path":
        return st.scan(src)
    return st._info(None, *safetensors_entries(src))


def _scan(f, map_location, limits, children=None) -> CheckpointInfo:
    src = Source(f, False, lazy=True)
    try:
        opts = options(map_location, weights_only=False, limits=limits)
        if src.format != "zip":
            return _legacy_scan(src, opts, children)
        archive = _core.Archive(*src.args(), **src.kwargs(), **opts)
        try:
            obj = archive.unpickle(lazy=True, collect_globals=True)
            return _info_from(archive, obj, src.path, archive.storages(), _max_depth(opts), children)
        finally:
            archive.close()
    finally:
        src.close()


def weights_only_check(f, safe_globals=None, encoding="utf-8", limits=None) -> None:
    """Raise what ``load(f)`` (weights_only=True) raises for the globals it refuses, reading no
    tensor byte (``open`` reads tensors past them; the CLI's diff and convert keep load's rules)."""
    src = Source(f, False, lazy=True)
    try:
        opts = options(None, True, safe_globals, encoding, limits)
        if src.format != "zip":
            _core.load_legacy(*src.args(), **src.kwargs(), **opts, lazy=True)
            return
        archive = _core.Archive(*src.args(), **src.kwargs(), **opts)
        try:
            archive.unpickle(lazy=True)
        finally:
            archive.close()
    finally:
        src.close()


# ---- open --------------------------------------------------------------------------------


class Checkpoint:
    """A checkpoint opened lazily (``torchfree.open``): tensors are read one storage at a time.

    ``ckpt[name]`` reads (or maps) only the storage record that tensor views, once; ``keys()``
    are the dotted names of ``flatten``; ``.info`` is what ``scan`` reports; ``.storages`` the
    ``torchfree.Storage`` objects with their target locations; ``.load()`` the whole object.
    """

    def __init__(self, f, map_location=None, *, mmap=None, weights_only=True, safe_globals=None,
                 encoding="utf-8", limits=None):
        self._f = f
        self._load_args = dict(map_location=map_location, mmap=mmap, weights_only=weights_only,
                               safe_globals=safe_globals, encoding=encoding, limits=limits)
        self._src = Source(f, mmap, lazy=True)
        try:
            # tensors are read past unknown globals, as scan lists them: those stay inert Opaques
            # (nothing is run); .load() applies weights_only's rules to the whole object
            opts = options(map_location, False, safe_globals, encoding, limits)
            if self._src.format != "zip":
                self._archive = _LoadedArchive(self._src, opts)
                self._obj = self._archive.obj
            else:
                self._archive = _core.Archive(*self._src.args(), **self._src.kwargs(), **opts)
                self._obj = self._archive.unpickle(lazy=True, collect_globals=True)
        except BaseException:
            self._src.close()
            raise
        self._max_depth = _max_depth(opts)
        # name -> leaf (TensorRef, or an array pickled inline), made in C when first needed: one
        # tensor asked for by name is found by a walk that builds no name
        self._names = None
        self._finds = 0
        # arrays already handed out, while the caller keeps them: asking twice gives the same
        # array (and reads nothing), yet memory is not held once the caller drops them
        self._cache = weakref.WeakValueDictionary()
        self._info = None

    @property
    def _index(self) -> dict:
        if self._names is None:
            self._names = _core.walk(self._obj, _INDEX, ".", _children, True, max_depth=self._max_depth)
        return self._names

    def _leaf(self, name):
        """The TensorRef (or array) named name; KeyError when none is."""
        if self._names is None and type(name) is str and self._finds < 8:
            self._finds += 1  # past a few look-ups, the whole index is cheaper
            return _core.walk(self._obj, _FIND, ".", _children, True, max_depth=self._max_depth, target=name)
        return self._index[name]

    # mapping protocol
    def keys(self):
        return self._index.keys()

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name) -> bool:
        try:
            self._leaf(name)
        except KeyError:
            return False
        return True

    def __getitem__(self, name):
        self._check_open()
        arr = self._cache.get(name)
        if arr is not None:
            return arr
        leaf = self._leaf(name)
        if isinstance(leaf, _core.TensorRef):
            arr = self._archive.materialize(leaf)
        else:
            arr = leaf
        if isinstance(arr, np.ndarray):
            self._cache[name] = arr
        return arr

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def items(self):
        for k in self._index:
            yield k, self[k]

    @property
    def info(self) -> CheckpointInfo:
        if self._info is None:
            self._check_open()
            path = self._src.path
            if isinstance(self._archive, _LoadedArchive):
                self._info = self._archive.info()
            else:
                self._info = _info_from(self._archive, self._obj, path, self._archive.storages(), self._max_depth)
        return self._info

    @property
    def storages(self) -> list:
        """The ``torchfree.Storage`` of each storage record, with its target location. A record
        is read when a tensor over it is, or by ``read_storage``; before that its bytes (buffer,
        ``.numpy()``) raise."""
        self._check_open()
        return self._archive.storages()

    def read_storage(self, storage):
        """Read (or map) one storage of ``.storages`` and return it, its bytes now available."""
        self._check_open()
        return self._archive.read_storage(storage)

    def load(self):
        """The whole object, as ``torchfree.load`` returns it."""
        from ._load import load

        if self._src.path is None and hasattr(self._f, "seek"):
            self._f.seek(self._src.src[1] if self._src.mode == 3 else 0)
        return load(self._f, **self._load_args)

    def _check_open(self):
        if self._archive is None or self._archive.closed:
            raise ValueError("the checkpoint is closed")

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None
        self._src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._archive is None else f"{len(self._index)} tensors"
        return f"<torchfree.Checkpoint {self._src.path or type(self._f).__name__} ({state})>"


def open(f, map_location=None, *, mmap=None, weights_only=True, safe_globals=None, encoding="utf-8",
         limits=None):
    """Open a checkpoint lazily: ``with torchfree.open(path) as ckpt: w = ckpt["fc1.weight"]``.

    A Hugging Face ``*.bin.index.json`` opens its shards as one checkpoint; each shard is read only
    when one of its tensors is asked for. Unknown globals never raise here (they stay inert, as
    ``scan`` lists them): every tensor can be read; ``.load()`` keeps ``weights_only``'s rules. A
    safetensors file (told by its header) opens too, one tensor read per ``ckpt[name]``.
    """
    kw = dict(mmap=mmap, weights_only=weights_only, safe_globals=safe_globals, encoding=encoding, limits=limits)
    if isinstance(f, (str, os.PathLike)) and os.fspath(f).endswith(".index.json"):
        return ShardedCheckpoint(f, map_location, **kw)
    st = safetensors_input(f)
    if st is not None:  # told by its header, whatever the name
        return _SafetensorsCheckpoint(f, st, map_location, **kw)
    return Checkpoint(f, map_location, **kw)


class _SafetensorsCheckpoint(Checkpoint):
    """open() of a safetensors file: the header is read and checked at open, ``ckpt[name]`` reads
    that tensor alone (``torchfree.safetensors.safe_open`` for a path, a view of the bytes
    otherwise). There are no torch storages: ``.storages`` is empty."""

    def __init__(self, f, st, map_location=None, *, mmap=None, weights_only=True, safe_globals=None,
                 encoding="utf-8", limits=None):
        from . import safetensors as sf

        self._f, self._kind = f, st[0]
        self._load_args = dict(map_location=map_location, mmap=mmap)
        self._meta = safetensors_meta(map_location)
        self._info = None
        self._cache = weakref.WeakValueDictionary()
        if self._kind == "path":
            self._path, self._buf = st[1], None
            if self._meta:  # the header alone
                entries, self._file = sf.read_header(self._path)[0], None
            else:
                self._file = sf.safe_open(self._path, mmap=mmap is not False)
                entries = list(self._file.entries.values())
        else:
            if mmap:
                raise ValueError("f must be a file path in order to use the mmap argument")
            self._path, self._file = None, None
            self._buf = st[1] if isinstance(st[1], bytearray) else bytearray(st[1])  # arrays the caller may write
            entries, self._start = safetensors_entries(self._buf)
        self._names = collections.OrderedDict((e.name, e) for e in entries)
        self._closed = False

    def _leaf(self, name):
        return self._names[name]

    def __getitem__(self, name):
        self._check_open()
        arr = self._cache.get(name)
        if arr is not None:
            return arr
        e = self._names[name]
        if self._meta:
            return MetaArray(e.array_shape, e.dtype)
        if self._file is not None:
            arr = self._file.get_tensor(name)
        else:
            from . import safetensors as sf

            arr = sf._array(self._buf, e, self._start, "<bytes>")
        self._cache[name] = arr
        return arr

    @property
    def info(self) -> CheckpointInfo:
        if self._info is None:
            self._check_open()
            if self._path is not None:
                from . import safetensors as sf

                self._info = sf.scan(self._path)
            else:
                self._info = _scan_safetensors("buffer", self._buf)
        return self._info

    @property
    def storages(self) -> list:
        self._check_open()
        return []

    def read_storage(self, storage):
        raise TypeError("a safetensors file has no torch storages")

    def load(self):
        """The whole file, as ``torchfree.load`` returns it."""
        self._check_open()
        # a buffer's arrays are copies: the arrays handed out by ckpt[name] view self._buf
        src = ("path", self._path) if self._path is not None else ("buffer", memoryview(self._buf))
        return load_safetensors(*src, **self._load_args)

    def _check_open(self):
        if self._closed:
            raise ValueError("the checkpoint is closed")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._closed = True

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._names)} tensors"
        return f"<torchfree.Checkpoint {self._path or type(self._f).__name__} (safetensors, {state})>"


# ---- sharded checkpoints (Hugging Face *.bin.index.json) ------------------------------------


def _builtin_open(path):
    return builtins.open(path, "rb")


class _ShardIndex:
    def __init__(self, path):
        self.path = os.fspath(path)
        with _builtin_open(self.path) as fh:
            import json

            data = json.load(fh)
        wm = data.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            from . import FormatError

            raise FormatError(f"{self.path}: not a sharded checkpoint index (no 'weight_map' of names to files)")
        self.weight_map = wm
        base = os.path.dirname(self.path)
        self.shards = list(dict.fromkeys(wm.values()))
        for s in self.shards:
            if os.path.isabs(s) or ".." in s.replace("\\", "/").split("/"):
                from . import FormatError

                raise FormatError(f"{self.path}: shard path {s!r} leaves the index's folder")
        self.files = {s: os.path.join(base, s) for s in self.shards}

    def scan(self, map_location=None, limits=None) -> CheckpointInfo:
        parts = [scan(self.files[s], map_location, limits=limits) for s in self.shards]
        info = CheckpointInfo(self.path, "sharded zip", parts[0].byteorder if parts else "little")
        for shard, p in zip(self.shards, parts):
            info.records += p.records
            info.storages += [StorageInfo(f"{shard}:{s.key}", s.dtype, s.nbytes, s.location, f"{shard}:{s.record}")
                              for s in p.storages]
            info.tensors += [TensorInfo(t.name, t.dtype, t.shape, t.strides, t.stride,
                                        None if t.storage_key is None else f"{shard}:{t.storage_key}",
                                        t.storage_offset, t.nbytes, t.location, t.torch_dtype, t.conj, t.neg,
                                        t.layout, t.quant, t.nnz, t.parts)
                             for t in p.tensors]
            info.globals = sorted(set(info.globals) | set(p.globals))
        return info


class ShardedCheckpoint:
    """Shards of a ``*.bin.index.json`` as one lazy checkpoint: a shard opens on first use."""

    def __init__(self, path, map_location=None, **kw):
        self._index = _ShardIndex(path)
        self._map_location = map_location
        self._kw = kw
        self._open: dict = {}

    def _shard(self, shard) -> Checkpoint:
        if shard not in self._open:
            self._open[shard] = Checkpoint(self._index.files[shard], self._map_location, **self._kw)
        return self._open[shard]

    def keys(self):
        return self._index.weight_map.keys()

    def __iter__(self):
        return iter(self._index.weight_map)

    def __len__(self) -> int:
        return len(self._index.weight_map)

    def __contains__(self, name) -> bool:
        # the index names every tensor, as Checkpoint's names do: no shard is opened to answer
        return name in self._index.weight_map

    def __getitem__(self, name):
        return self._shard(self._index.weight_map[name])[name]

    def items(self):
        for k in self._index.weight_map:
            yield k, self[k]

    @property
    def info(self) -> CheckpointInfo:
        return self._index.scan(self._map_location, self._kw.get("limits"))

    @property
    def storages(self) -> list:
        return [s for shard in self._index.shards for s in self._shard(shard).storages]

    def load(self):
        out = collections.OrderedDict()
        for shard in self._index.shards:
            part = self._shard(shard).load()
            out.update(part)
        return out

    def close(self) -> None:
        for c in self._open.values():
            c.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_sharded(path, mmap=None, **opts):
    """load() of a ``*.bin.index.json``: the shards' state_dicts merged into one OrderedDict."""
    idx = _ShardIndex(path)
    out = collections.OrderedDict()
    for shard in idx.shards:
        src = Source(idx.files[shard], mmap)
        try:  # a shard may be a legacy stream (torch.save(..., _use_new_zipfile_serialization=False))
            loader = _core.load_zip if src.format == "zip" else _core.load_legacy
            part = loader(*src.args(), **src.kwargs(), **opts)
        finally:
            src.close()
        if not isinstance(part, dict):
            from . import FormatError

            raise FormatError(f"shard {shard} holds a {type(part).__name__}, not a state_dict")
        out.update(part)
    return out
