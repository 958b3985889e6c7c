"""What scan reports: RecordInfo, StorageInfo, QuantInfo, TensorInfo and CheckpointInfo (with its
text, JSON and HTML views), and the TensorInfos of a walked object."""

from __future__ import annotations

import collections
import operator
from collections import namedtuple

from ._np import np

from . import _core
from ._types import MetaArray, QuantizedArray, SparseArray
from ._walk import _INFOS, _children

__all__ = ["CheckpointInfo", "QuantInfo", "RecordInfo", "StorageInfo", "TensorInfo"]


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
