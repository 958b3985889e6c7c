"""torchfree.torch: ``torch.load`` / ``torch.save`` with torch objects, on torchfree's core.

``load`` returns exactly what ``torch.load`` returns (tensors, ``nn.Parameter``, ``torch.Size``,
``torch.device``, torch dtypes) built by torchfree's own unpickler: nothing in the file is ever
imported or run. Tensors are made zero-copy over the read (or, with ``mmap=True``, mapped)
storage records, one ``torch.UntypedStorage`` per record, so views share storage exactly as
torch's do. ``mmap`` defaults as torch's: a file is mapped only when asked.

``patched()`` (or ``install()`` / ``uninstall()``) routes ``torch.load`` / ``torch.save`` to this
module, for libraries that call them internally.

torch is imported on first use: ``import torchfree`` never imports it.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import secrets
import sys
import threading
import warnings
from collections import OrderedDict

from . import _core
from ._core import CheckpointError, FormatError, UnsafeGlobalError
from ._files import _fsync_dir, check_file_object, open_rewrite
from ._source import is_index_json, options, run_load

__all__ = ["load", "save", "patched", "install", "uninstall"]

_QUANTIZED_REPR = {"qint8": "int8", "quint8": "uint8", "qint32": "int32", "quint4x2": "uint8", "quint2x4": "uint8"}
_LAYOUTS = ("sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "strided")
_QSCHEMES = ("per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams",
             "per_tensor_symmetric", "per_channel_symmetric")


class _NeedsTorch(CheckpointError):
    """Raised inside a patched torch.load when the file needs what only torch can rebuild."""


_torch_mod = None
_tables = None


def _torch():
    global _torch_mod
    if _torch_mod is None:
        import torch

        _torch_mod = torch
    return _torch_mod


def _get_tables(torch):
    """Torch objects for the names of torchfree's fixed tables (our names, never the file's)."""
    global _tables
    if _tables is None:
        dtypes = tuple(getattr(torch, n, None) for n in _core.DTYPE_NAMES)
        views = tuple(getattr(torch, _QUANTIZED_REPR.get(n, n), None) for n in _core.DTYPE_NAMES)
        layouts = {"torch." + n: getattr(torch, n) for n in _LAYOUTS}
        qschemes = {"torch." + n: getattr(torch, n) for n in _QSCHEMES}
        _tables = (dtypes, views, layouts, qschemes)
    return _tables


# ---- map_location, as torch.serialization._get_restore_location ----------------------------


def _restorer(torch, map_location):
    """restore(untyped_storage, saved_location) -> storage, as torch.load's; "cpu" targets skip
    torch's registry (it returns the storage unchanged for them)."""
    drl = torch.serialization.default_restore_location
    if map_location is None:
        return lambda us, loc: us if loc == "cpu" else drl(us, loc)
    if isinstance(map_location, dict):
        def restore(us, loc):
            target = map_location.get(loc, loc)
            return us if isinstance(target, str) and target == "cpu" else drl(us, target)

        return restore
    if isinstance(map_location, (str, bytes, torch.device)):
        target = str(map_location) if isinstance(map_location, torch.device) else map_location
        if isinstance(target, str) and target == "cpu":
            return lambda us, loc: us
        return lambda us, loc: drl(us, target)
    if not callable(map_location):
        raise TypeError(f"map_location must be None, a str, a torch.device, a dict or a callable, "
                        f"not {type(map_location).__name__}")

    def restore(us, loc):
        result = map_location(us, loc)
        return drl(us, loc) if result is None else result

    return restore


def _metadata(conj, neg):
    return {"conj": True, "neg": True} if conj and neg else {"conj": True} if conj else {"neg": True}


def _cpu_fast(map_location):
    """saved location -> True when map_location leaves that storage on the CPU as it is
    (torch's restore returns the storage itself then)."""
    if map_location is None:
        return lambda loc: loc == "cpu"
    if isinstance(map_location, str) and map_location == "cpu" or type(map_location).__name__ == "device" and str(map_location) == "cpu":
        return lambda loc: True
    if isinstance(map_location, dict):
        return lambda loc: (lambda t: isinstance(t, str) and t == "cpu")(map_location.get(loc, loc))
    return lambda loc: False


def _cuda_target(torch, map_location):
    """The one CUDA device every storage goes to (str / torch.device map_location), or None."""
    if isinstance(map_location, (str, torch.device)):
        try:
            dev = torch.device(map_location)
        except (RuntimeError, ValueError, TypeError):
            return None
        if dev.type == "cuda":
            return dev
    return None


# ---- the helpers the C core calls in torch mode ------------------------------------------


def _helpers(torch, map_location, restore, weights_only, strict, cuda):
    """The dict of torch-mode helpers for one load (see L->torch in src/loader.h).

    ``cuda`` (a torch.device or None): storages go to that device through pinned staging
    buffers after unpickling (``_stage``), instead of one synchronous copy each."""
    dtypes, views, layouts, qschemes = _get_tables(torch)
    storages = {}  # torchfree.Storage -> torch UntypedStorage (after map_location)
    staged = []  # (torchfree.Storage, device UntypedStorage) to copy when cuda is set
    empty, frombuffer, uint8, set_ = torch.empty, torch.frombuffer, torch.uint8, torch.Tensor.set_
    UntypedStorage = torch.UntypedStorage
    set_metadata = torch._C._set_tensor_metadata
    cpu = torch.device("cpu")
    itemsizes = tuple(d.itemsize if d is not None else 1 for d in views)
    cpu_fast = _cpu_fast(map_location)

    def untyped(s):
        if s.is_meta:
            return UntypedStorage(s.nbytes, device="meta"), False
        nbytes = s.nbytes
        if cuda is not None:
            if not staged:
                # torch's own checks (and errors) for the device, on the first storage
                torch.serialization.default_restore_location(UntypedStorage(0), str(cuda))
            us = empty(nbytes, dtype=uint8, device=cuda).untyped_storage()
            if nbytes:
                staged.append((s, us))
            return us, False
        us = frombuffer(s, dtype=uint8).untyped_storage() if nbytes else UntypedStorage(0)
        us = restore(us, s.location)
        if not isinstance(us, UntypedStorage):
            if isinstance(us, torch.storage.TypedStorage):
                us = us._untyped_storage
            else:
                raise TypeError(f"map_location returned a {type(us).__name__}, not a storage")
        return us, us.device == cpu

    def tensor(s, dt, offset, size, stride, conj, neg):
        entry = storages.get(s)
        if entry is None:
            if cuda is None and cpu_fast(s.location) and s.nbytes and not s.nbytes % itemsizes[dt]:
                # the common first use: one call makes the storage and the tensor over it; the
                # storage is taken from the tensor if another tensor shares it
                t = frombuffer(s, dtype=views[dt]).as_strided_(size, stride, offset)
                storages[s] = t
                if conj or neg:
                    set_metadata(t, _metadata(conj, neg))
                return t
            entry = storages[s] = untyped(s)
        elif type(entry) is not tuple:
            entry = storages[s] = (entry.untyped_storage(), True)
        us, on_cpu = entry
        if on_cpu:
            t = set_(empty(0, dtype=views[dt]), us, offset, size, stride)
        else:
            t = set_(empty(0, dtype=views[dt], device=us.device), us, offset, size, stride)
        if conj or neg:
            set_metadata(t, _metadata(conj, neg))
        return t

    def requires_grad(t, flag):
        if not isinstance(flag, bool):
            raise TypeError(f"requires_grad is a {type(flag).__name__}, not a bool")
        t.requires_grad = flag
        return t

    def _state_ok(state):
        if state is None:
            return
        parts = state if isinstance(state, tuple) else (state,)
        for part in parts:
            if part is None:
                continue
            if not isinstance(part, dict):
                raise TypeError(f"tensor state is a {type(part).__name__}, not a dict")
            for k in part:
                if not isinstance(k, str) or k.startswith("__"):
                    raise TypeError(f"tensor state names attribute {k!r}")

    def parameter(data, requires_grad=True, hooks=None, *state):
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"Parameter data is a {type(data).__name__}, not a tensor")
        if not isinstance(requires_grad, bool):
            raise TypeError("Parameter requires_grad is not a bool")
        param = torch.nn.Parameter(data, requires_grad)
        param._backward_hooks = hooks
        if state:
            _state_ok(state[0])
            param = torch._utils._set_obj_state(param, state[0])
        return param

    def Parameter(data=None, requires_grad=True):
        if data is not None and not isinstance(data, torch.Tensor):
            raise TypeError(f"Parameter data is a {type(data).__name__}, not a tensor")
        return torch.nn.Parameter(data, bool(requires_grad))

    def from_type(is_param, inner, state):
        if not isinstance(inner, torch.Tensor):
            raise TypeError(f"tensor data is a {type(inner).__name__}")
        _state_ok(state)
        new_type = torch.nn.Parameter if is_param else torch.Tensor
        return torch._tensor._rebuild_from_type_v2(lambda: inner, new_type, (), state)

    def subclass(type_, data, state, wrapper=False):
        if isinstance(type_, type) and issubclass(type_, torch.Tensor) and isinstance(data, torch.Tensor):
            _state_ok(state)
            return torch._tensor._rebuild_from_type_v2(lambda: data, type_, (), state)
        if strict:
            raise _NeedsTorch("a tensor subclass that needs its real class")
        from ._rebuild import subclass as np_subclass

        return np_subclass(type_, data, state, wrapper)

    def meta_tensor(dt, size, stride, rg):
        return torch.empty_strided(size, stride, dtype=dtypes[dt], device="meta", requires_grad=bool(rg))

    def qtensor(int_repr, dtype, shape, params):
        if not isinstance(params, tuple) or not params or params[0] not in qschemes:
            raise TypeError("quantizer parameters do not start with a known qscheme")
        qdtype = getattr(torch, dtype) if dtype in _QUANTIZED_REPR else None
        if qdtype is None:
            raise TypeError(f"{dtype} is not a quantized dtype")
        params = (qschemes[params[0]],) + params[1:]
        typed = torch.storage.TypedStorage(wrap_storage=int_repr.untyped_storage(), dtype=qdtype, _internal=True)
        if dtype in ("quint4x2", "quint2x4"):
            stride, acc = [], 1
            for n in reversed(shape):
                stride.insert(0, acc)
                acc *= max(n, 1)
            stride = tuple(stride)
        else:
            stride = int_repr.stride()
        return torch._utils._rebuild_qtensor(typed, int_repr.storage_offset(), shape, stride, params, False,
                                             OrderedDict())

    def sparse(layout, data):
        if layout not in layouts or layout == "torch.strided":
            raise TypeError(f"sparse layout {layout!r}")
        return torch._utils._rebuild_sparse_tensor(layouts[layout], data)

    def sparse_csr(layout, data):
        # torch 1.x's _rebuild_sparse_csr_tensor: (crow, col, values, size), as torch 2.x's CSR
        if layout != "torch.sparse_csr":
            raise TypeError(f"_rebuild_sparse_csr_tensor with layout {layout!r}")
        return torch._utils._rebuild_sparse_tensor(layouts[layout], data)

    def nested(buffer, sizes, strides, offsets):
        for x in (buffer, sizes, strides, offsets):
            if not isinstance(x, torch.Tensor):
                raise TypeError("nested tensor parts are not tensors")
        return torch._utils._rebuild_nested_tensor(buffer, sizes, strides, offsets)

    def device_tensor(data, descr):
        import numpy as np

        t = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
        target = torch.from_numpy(np.empty(0, dtype=descr)).dtype
        return t.to(dtype=target)

    def finish(obj):
        """Storages the file holds outside tensors (torch gives them as TypedStorage): the core
        calls this only when obj holds one."""
        return _replace_storages(obj, typed, {})

    typed_made = {}  # torchfree.Storage -> its TypedStorage: one object per storage, as torch's

    def typed(s):
        ts = typed_made.get(s)
        if ts is not None:
            return ts
        entry = storages.get(s)
        if entry is None:
            entry = storages[s] = untyped(s)
        elif type(entry) is not tuple:
            entry = storages[s] = (entry.untyped_storage(), True)
        ts = typed_made[s] = torch.storage.TypedStorage(wrap_storage=entry[0], dtype=_storage_dtype(torch, s),
                                                        _internal=True)
        return ts

    def torchscript():
        if weights_only:
            raise RuntimeError(
                "Cannot use ``weights_only=True`` with TorchScript archives passed to ``torch.load``. "
                + torch.serialization.UNSAFE_MESSAGE)
        raise _NeedsTorch("TorchScript archives load with torch.jit.load")

    h = {
        "tensor": tensor,
        "dtypes": dtypes,
        "requires_grad": requires_grad,
        "parameter": parameter,
        "Parameter": Parameter,
        "from_type": from_type,
        "subclass": subclass,
        "meta_tensor": meta_tensor,
        "Size": torch.Size,
        "device": torch.device,
        "qtensor": qtensor,
        "sparse": sparse,
        "sparse_csr": sparse_csr,
        "nested": nested,
        "device_tensor": device_tensor,
        "torchscript": torchscript,
        "finish": finish,
        # copying from a file, a storage's bytes are read after unpickling, all at once, only
        # where map_location leaves it on the CPU (or cuda staging copies it afterwards): a
        # callable or a device restore gets it, bytes and all, while its tensor is made
        "defer": (lambda loc: True) if cuda is not None else cpu_fast,
    }
    if strict:
        def opaque_global(qualname):
            raise _NeedsTorch(f"{qualname} needs its real class")

        h["opaque_global"] = opaque_global
    return h, staged


def _storage_dtype(torch, s):
    """The torch dtype of a torchfree.Storage (its dtype attribute: a numpy dtype or "torch.x")."""
    d = s.dtype
    name = d[6:] if isinstance(d, str) else d.name
    dt = getattr(torch, name, None) if name in _core.DTYPE_NAMES else None
    if not isinstance(dt, torch.dtype):
        raise TypeError(f"storage of dtype {d!r}")
    return dt


def _replace_storages(obj, convert, done, depth=0):
    """obj with every torchfree.Storage in dicts, lists and tuples replaced by convert(storage).

    ``done`` maps id(container) -> what it became: each container is walked once (a pickle's
    memo can make a deep DAG of them), and a tuple met twice becomes one new tuple. As deep as
    the core's check (FINISH_MAX_DEPTH in src/archive.c)."""
    if type(obj) is _core.Storage:
        return convert(obj)
    if depth > 200 or not (isinstance(obj, (dict, list)) or type(obj) is tuple):
        return obj
    key = id(obj)
    if key in done:
        return done[key][1]
    done[key] = (obj, obj)  # (the original kept alive, so its id is not reused; the result)
    if isinstance(obj, dict):
        for k, v in obj.items():
            r = _replace_storages(v, convert, done, depth + 1)
            if r is not v:
                obj[k] = r
        return obj
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            r = _replace_storages(v, convert, done, depth + 1)
            if r is not v:
                obj[i] = r
        return obj
    items = [_replace_storages(v, convert, done, depth + 1) for v in obj]
    if any(a is not b for a, b in zip(items, obj)):
        done[key] = (obj, tuple(items))
    return done[key][1]


# ---- pinned staging to a GPU ---------------------------------------------------------------


def _stage(torch, staged, device, chunk=64 << 20, nbuf=3, pin=True):
    """Copy each (torchfree.Storage, device storage) pair's bytes to the device.

    Sources are packed into ``nbuf`` rotating (pinned) staging buffers of ``chunk`` bytes; a
    buffer's host-to-device copies run asynchronously on a side stream while the next buffer
    is filled from the mapped file, and a buffer is refilled only after its copies' event.
    With a CPU ``device`` (tests) the same packing runs with plain copies."""
    if not staged:
        return
    is_cuda = device.type == "cuda"
    total = sum(s.nbytes for s, _ in staged)
    size = min(chunk, max(total, 1))
    bufs = [torch.empty(size, dtype=torch.uint8, pin_memory=pin and is_cuda) for _ in range(min(nbuf, -(-total // size)))]
    stream = torch.cuda.Stream(device) if is_cuda else None
    events = [None] * len(bufs)
    state = {"bi": 0, "fill": 0, "batch": []}

    def flush():
        batch = state["batch"]
        if not batch:
            return
        buf = bufs[state["bi"]]
        if is_cuda:
            with torch.cuda.stream(stream):
                for dst, at, n in batch:
                    dst.copy_(buf[at:at + n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            events[state["bi"]] = ev
        else:
            for dst, at, n in batch:
                dst.copy_(buf[at:at + n])
        state["bi"] = (state["bi"] + 1) % len(bufs)
        state["fill"], state["batch"] = 0, []
        ev = events[state["bi"]]
        if ev is not None:
            ev.synchronize()  # its previous copies are done: the buffer may be refilled
            events[state["bi"]] = None

    if is_cuda:
        stream.wait_stream(torch.cuda.current_stream(device))  # the destinations were allocated there
    for s, us in staged:
        src = torch.frombuffer(s, dtype=torch.uint8)
        dst_all = torch.empty(0, dtype=torch.uint8, device=us.device).set_(us)
        n = s.nbytes
        for a in range(0, n, size):
            m = min(size, n - a)
            if state["fill"] + m > size:
                flush()
            at = state["fill"]
            bufs[state["bi"]][at:at + m].copy_(src[a:a + m])
            state["batch"].append((dst_all[a:a + m], at, m))
            state["fill"] = at + m
    flush()
    if is_cuda:
        stream.synchronize()
        torch.cuda.current_stream(device).wait_stream(stream)


# ---- load --------------------------------------------------------------------------------


def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **pickle_load_args):
    """``torch.load`` with torchfree's unpickler: the same torch objects, faster, with no way for
    the file to run code.

    Args:
        f: a path, a bytes-like object or a binary file object (as ``torchfree.load``; a file
            object is left just past a legacy checkpoint, as torch leaves it), or a Hugging Face
            ``*.bin.index.json`` (its shards' state_dicts as one OrderedDict).
        map_location: as ``torch.load``: ``None``, a device string or ``torch.device``
            (``"cuda:1"``: storages are copied through pinned staging buffers), a dict
            ``{saved: target}``, or a callable ``fn(storage, location)`` given each torch
            ``UntypedStorage`` (on the CPU) and its saved location tag.
        pickle_module: ``None``, or a module torchfree's unpickler stands in for: the standard
            ``pickle`` (``torch.serialization.pickle``), or ``torch._weights_only_unpickler``
            (weights-only rules); one with an ``Unpickler`` of its own raises ``TypeError``.
        weights_only: ``True``: torch's weights-only allowlist (torchfree's); ``False``: unknown
            classes become inert ``torchfree.Opaque`` placeholders (never imported or called;
            use ``torch.load`` for real classes); ``None``: as torch 2.13 decides it (``True``,
            ``False`` with a pickle_module, TORCH_FORCE_WEIGHTS_ONLY_LOAD /
            TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD), with torch's warnings and errors.
        mmap: as ``torch.load``: ``None`` follows torch's setting
            (``torch.utils.serialization.config.load.mmap``, ``False`` unless changed), so by
            default every storage is read (in parallel) into memory the tensors own and the
            file is closed on return; ``True`` maps the file copy-on-write (zero-copy; a
            legacy file or a non-path raises, as in torch). Tensors over a mapping need the
            file as it is: torchfree's writers replace such a file (a new file renamed over
            it), but a plain ``torch.save`` or ``open(f, "wb")`` of that path truncates it and
            the next read of a tensor kills the process (SIGBUS), as with ``torch.load(mmap=True)``.
        pickle_load_args: ``encoding`` (Python 2 pickles), as ``torch.load``.

    Raises:
        What ``torch.load`` raises for devices (e.g. ``RuntimeError`` for a CUDA checkpoint on a
        machine without CUDA), torchfree's ``CheckpointError`` family for bad or unsafe files.
    """
    weights_only = _resolve_weights_only(_torch(), weights_only, pickle_module, pickle_load_args)
    return _load(f, map_location, pickle_module, weights_only, mmap, pickle_load_args, strict=False)


_mmap_config = None


def _default_mmap(torch) -> bool:
    """torch.load's ``mmap=None``: torch 2.13's ``torch.utils.serialization.config.load.mmap``
    (False unless set: torch copies by default), read at each call as torch does."""
    global _mmap_config
    if _mmap_config is None:
        try:
            from torch.utils.serialization import config
        except ImportError:  # torch < 2.5 has no such setting and never maps by default
            return False
        _mmap_config = config
    return bool(_mmap_config.load.mmap)


_TRUE_VALUES = ("1", "y", "yes", "true")  # torch.load's for its environment variables


def _resolve_weights_only(torch, weights_only, pickle_module, pickle_load_args, pending=None) -> bool:
    """torch.load's weights_only, by torch 2.13's rules, with its warnings and errors: ``None``
    is True without a pickle_module (False with one); TORCH_FORCE_WEIGHTS_ONLY_LOAD makes it
    True, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD makes ``None`` False (with torch's warning); both set
    raise; True with a pickle_module raises. Called by the public entry points only (warnings
    point at their caller); with a ``pending`` list the warnings are put there instead, for the
    caller to give unless torch's own load, which gives them itself, takes the call."""

    def warn(msg, category):
        if pending is not None:
            pending.append((msg, category))
        else:
            warnings.warn(msg, category, stacklevel=4)

    not_set = weights_only is None
    if not_set:
        # torch's _default_to_weights_only: fbcode builds (no torch.version.git_version) say False
        weights_only = pickle_module is None and hasattr(torch.version, "git_version")
    force = os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in _TRUE_VALUES
    force_no = os.getenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in _TRUE_VALUES
    if force and force_no:
        raise RuntimeError("Only one of `TORCH_FORCE_WEIGHTS_ONLY_LOAD` or `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` "
                           "should be set, but both were set.")
    if force:
        weights_only = True
    elif force_no and not_set:
        warn("Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD detected, since the"
             "`weights_only` argument was not explicitly passed to `torch.load`, forcing weights_only=False.",
             UserWarning)
        weights_only = False
    if weights_only and pickle_module is not None:
        raise RuntimeError("Can not safely load weights when explicit pickle_module is specified")
    if pickle_load_args and weights_only:
        warn("pickle_load_args only works if `weights_only=False`.", UserWarning)
    return bool(weights_only)


def _stand_in(torch, pickle_module):
    """How torchfree's unpickler stands in for ``pickle_module`` (torch.load uses its
    ``Unpickler`` and, for legacy files, its ``load``): ``"pickle"`` for the standard library's
    (``pickle``, ``torch.serialization.pickle``), ``"weights_only"`` for torch's restricted
    ``torch._weights_only_unpickler``, None for any other (one with an Unpickler of its own,
    dill: torchfree cannot run its code)."""
    unpickler, load = getattr(pickle_module, "Unpickler", None), getattr(pickle_module, "load", None)
    if unpickler in (pickle.Unpickler, pickle._Unpickler) and load in (pickle.load, pickle._load):
        return "pickle"
    wou = getattr(torch, "_weights_only_unpickler", None)
    if wou is not None and unpickler is wou.Unpickler and load is wou.load:
        return "weights_only"
    return None


def _check_seekable(f) -> None:
    """torch.serialization._check_seekable: torch.load reads only objects it can seek in, and
    raises these errors for the others (torchfree's own readers take non-seekable streams)."""
    try:
        f.seek(f.tell())
    except (io.UnsupportedOperation, AttributeError) as e:
        for p in ("seek", "tell"):
            if p in str(e):
                raise type(e)(str(e) + ". You can only torch.load from a file that is seekable. Please pre-load "
                              "the data into a buffer like io.BytesIO and try to load from it instead.") from None
        raise


def _mmap_shared(torch) -> bool:
    """torch.serialization.set_default_mmap_options(mmap.MAP_SHARED) is in force."""
    get = getattr(torch.serialization, "get_default_mmap_options", None)
    shared = getattr(torch.serialization, "MAP_SHARED", None)
    return get is not None and shared is not None and get() == shared


def _default_byteorder(torch):
    """The byte order torch.load gives a zip without a byteorder record:
    torch.serialization.set_default_load_endianness (None and LITTLE: little)."""
    get = getattr(torch.serialization, "get_default_load_endianness", None)
    e = get() if get is not None else None
    if e is None:
        return "little"
    name = getattr(e, "name", None)
    if name not in ("LITTLE", "BIG", "NATIVE"):
        raise ValueError("Invalid load endianness type")
    return name.lower()


def _load(f, map_location, pickle_module, weights_only, mmap, pickle_load_args, strict):
    """torch.load once its weights_only is resolved (_resolve_weights_only). strict (patched):
    raise _NeedsTorch for what only torch can do, and follow torch where torchfree's own readers
    do more (non-seekable streams, bytes)."""
    torch = _torch()
    if pickle_module is not None:
        kind = _stand_in(torch, pickle_module)
        if kind is None:
            why = f"pickle_module {getattr(pickle_module, '__name__', type(pickle_module).__name__)} has an unpickler of its own"
            if strict:
                raise _NeedsTorch(why)
            raise TypeError(f"torchfree.torch.load runs its own unpickler, which cannot stand in for {why} "
                            "(use torch.load, or patched(), which hands such calls to it)")
        if kind == "weights_only":
            weights_only = True  # torch's restricted unpickler, asked for by name
    extra = set(pickle_load_args) - {"encoding"}
    if extra:
        raise TypeError(f"unsupported arguments: {sorted(extra)}")
    if is_index_json(f):
        return _load_sharded(torch, f, map_location, weights_only, mmap, pickle_load_args, strict)
    return _load_one(torch, f, map_location, weights_only, mmap, pickle_load_args, strict)


def _load_one(torch, f, map_location, weights_only, mmap, pickle_load_args, strict):
    pos = None
    if not isinstance(f, (str, os.PathLike)):
        if strict:
            _check_seekable(f)  # what torch.load does with a non-path (bytes included)
        if hasattr(f, "read"):
            try:
                pos = f.tell()
            except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
                pos = None  # a non-seekable stream (torchfree.torch.load reads it; torch does not)
    cuda = _cuda_target(torch, map_location)
    restore = _restorer(torch, map_location)
    helpers, staged = _helpers(torch, map_location, restore, weights_only, strict, cuda)
    meta = isinstance(map_location, (str, torch.device)) and str(map_location) == "meta"
    opts = options("meta" if meta else None, weights_only, None, pickle_load_args.get("encoding", "utf-8"), None)
    opts["torch"] = helpers
    mmap = _default_mmap(torch) if mmap is None else mmap

    def legacy_end(end):
        if pos is not None:
            f.seek(pos + end)  # where torch.load leaves it: just past the checkpoint

    obj = run_load(f, mmap, opts, shared=bool(mmap) and _mmap_shared(torch),
                   zip_byteorder=lambda: _default_byteorder(torch), legacy_end=legacy_end)
    if staged:
        _stage(torch, staged, cuda)
    torch._utils._validate_loaded_sparse_tensors()
    return obj


def _load_sharded(torch, path, map_location, weights_only, mmap, pickle_load_args, strict):
    """A Hugging Face ``*.bin.index.json``: the shards' state_dicts merged into one OrderedDict,
    in the index's shard order (as ``torchfree.load``), each shard loaded as one torch.load."""
    from ._shardindex import _ShardIndex

    idx = _ShardIndex(path)
    out = OrderedDict()
    for shard in idx.shards:
        part = _load_one(torch, idx.files[shard], map_location, weights_only, mmap, pickle_load_args, strict)
        if not isinstance(part, dict):
            raise FormatError(f"shard {shard} holds a {type(part).__name__}, not a state_dict")
        out.update(part)
    return out


# ---- save: torchfree's writer for torch objects ------------------------------------------
#
# torch.save's object goes to the C writer (torchfree.save's) as the objects it takes, made to
# pickle exactly as torch's pickler does: each torch storage becomes a torchfree.Storage over
# its bytes (the writer writes a Storage whole, as torch does), each plain tensor an ndarray
# view of it (offset, shape and strides of the tensor), a Parameter / torch.Size / torch.device
# / dtype the REDUCE or GLOBAL torch's __reduce_ex__ gives (SaveCall / SaveGlobal). Anything
# else (modules and other classes, tensors with requires_grad, Python attributes, hooks or
# conj/neg bits, quantized / sparse / nested / meta / non-CPU tensors, complex32 and bit
# dtypes, bare UntypedStorages, an empty view past its storage's end) goes to torch's writer.

_native_dtype_table = None


def _native_dtypes(torch):
    """torch dtype -> (torchfree dtype id, the numpy dtype the writer writes as that dtype): the
    dtypes of the core's table (_core.DTYPE_NAMES, src/dtypes.c) whose storages are arrays of a
    numpy (or ml_dtypes) dtype of the same name, as the core makes them (_core.storage_over)."""
    global _native_dtype_table
    if _native_dtype_table is None:
        table = {}
        for i, name in enumerate(_core.DTYPE_NAMES):
            dt = getattr(torch, name, None)
            if not isinstance(dt, torch.dtype):
                continue
            try:  # quantized and sub-byte dtypes have no storage of their own
                npd = _core.storage_over(bytearray(16), i).dtype
            except ValueError:
                continue
            if getattr(npd, "name", None) == name:  # not complex32 (float16 pairs), bits, float4 (bytes)
                table[dt] = (i, npd)
        _native_dtype_table = table
    return _native_dtype_table


class _Foreign(Exception):
    """The object holds something torchfree's writer does not write as torch.save does."""


_ATOMS = (type(None), bool, int, float, str)
_IN_PROGRESS = object()


_ndarray = None  # numpy.ndarray, once a _ToWriter is made (numpy is imported on first need)


class _ToWriter:
    """The objects torchfree's C writer takes for a torch object, pickled as torch pickles it.

    Each object is converted once (``done``: id -> (object, result); the object is kept so its
    id is not reused), so objects met twice stay one object and the pickle memo matches torch's.
    Raises _Foreign for what only torch's writer writes as torch does, and torch's RuntimeError
    for two views of the same bytes as different dtypes."""

    def __init__(self, torch, snapshot=False):
        global _ndarray
        from ._np import np
        from ._rebuild import SaveCall, SaveGlobal

        _ndarray = np.ndarray

        self.torch = torch
        self.snapshot = snapshot  # copy every storage's bytes now (a background save)
        self.dtypes = _native_dtypes(torch)
        self.SaveCall, self.SaveGlobal = SaveCall, SaveGlobal
        self.done = {}
        self.storages = {}  # untyped storage _cdata -> (torchfree.Storage over its bytes, {dtype: Storage})
        self.ptr_dtype = {}  # data_ptr -> torch dtype: torch.save's check
        self.spans = []  # (data_ptr, nbytes) of every storage with bytes

    def convert(self, o, depth=0):
        if type(o) in _ATOMS:
            return o
        hit = self.done.get(id(o))
        if hit is not None:
            if hit[1] is _IN_PROGRESS:
                raise _Foreign("a tuple that holds itself")
            return hit[1]
        if depth > 400:
            raise _Foreign("objects nested more than 400 deep")
        self.done[id(o)] = (o, _IN_PROGRESS)
        r = self._convert(o, depth + 1)
        self.done[id(o)] = (o, r)
        return r

    def _convert(self, o, depth):
        torch, t = self.torch, type(o)
        if t is torch.Tensor:
            return self._tensor(o)
        if t is list:
            new = []
            self.done[id(o)] = (o, new)  # a list that holds itself
            new.extend(self.convert(v, depth) for v in o)
            return new
        if t is dict or t is OrderedDict:
            new = t()
            self.done[id(o)] = (o, new)
            for k, v in o.items():
                if type(k) not in _ATOMS and type(k) is not bytes:
                    raise _Foreign(f"a dict key of type {type(k).__name__}")
                new[k] = self.convert(v, depth)
            if t is OrderedDict:
                for k, v in vars(o).items():  # state_dict()'s _metadata
                    setattr(new, k, self.convert(v, depth))
            return new
        if t is tuple:
            return tuple(self.convert(v, depth) for v in o)
        if t is bytes:
            if not o:
                raise _Foreign("b''")  # pickle's bytes(), which torchfree writes otherwise
            return o
        if t is bytearray or t is complex or t is set and all(type(v) in _ATOMS for v in o):
            return o  # the writer pickles these itself (a set only of atoms: its order is theirs)
        if t is torch.nn.Parameter:
            if torch._utils._get_obj_state(o) or o._backward_hooks:
                raise _Foreign("a Parameter with Python attributes or hooks")
            data = o.data
            return self.SaveCall(self.SaveGlobal("torch._utils", "_rebuild_parameter"),
                                 (self.convert(data, depth), o.requires_grad, OrderedDict()))
        if t is torch.Size:
            return self.SaveCall(self.SaveGlobal("torch", "Size"), (tuple(o),))
        if t is torch.dtype:
            name = str(o)
            if not name.startswith("torch."):
                raise _Foreign(f"dtype {name}")
            return self.SaveGlobal("torch", name[6:])
        if t is torch.device:
            return self.SaveCall(self.SaveGlobal("torch", "device"), o.__reduce__()[1])
        if isinstance(o, torch.storage.TypedStorage):  # torch.FloatStorage and the others too
            if o.device.type != "cpu":
                raise _Foreign(f"a {o.device.type} storage")
            return self._storage(o._untyped_storage, o.dtype)
        raise _Foreign(f"an object of type {t.__module__}.{t.__qualname__}")

    def _tensor(self, t):
        torch = self.torch
        if (t.device.type == "meta" or t.layout is not torch.strided or t.is_quantized or t.is_nested
                or t.requires_grad or t.__dict__ or t._backward_hooks or t.is_conj() or t.is_neg()
                or t._is_zerotensor()):
            raise _Foreign("a tensor that is not a plain dense tensor (meta, layout, requires_grad, attributes, "
                           "hooks, conj/neg bits)")
        entry = self.dtypes.get(t.dtype)
        if entry is None:
            raise _Foreign(f"a tensor of dtype {t.dtype}")
        storage = self._storage(t.untyped_storage(), t.dtype)
        item = entry[1].itemsize
        try:
            return _ndarray(tuple(t.shape), entry[1], buffer=storage, offset=t.storage_offset() * item,
                            strides=tuple(x * item for x in t.stride()))
        except (ValueError, TypeError) as e:  # e.g. an empty view past its storage's end
            raise _Foreign(f"a tensor numpy cannot view ({e})") from None

    def _storage(self, us, dtype):
        """The torchfree.Storage over an untyped storage's bytes (one per storage)."""
        ptr, n = us.data_ptr(), us.nbytes()
        if ptr != 0:
            if self.ptr_dtype.setdefault(ptr, dtype) != dtype:
                raise RuntimeError("Cannot save multiple tensors or storages that view the same data as different types")
        key = us._cdata
        hit = self.storages.get(key)
        entry = self.dtypes.get(dtype)
        if entry is None:
            raise _Foreign(f"a storage of dtype {dtype}")
        if hit is not None:
            s, variants = hit
            if dtype not in variants:
                if n:  # pragma: no cover - torch's check above raised (bytes at a non-zero address)
                    raise _Foreign("one storage with bytes viewed as two dtypes")
                # an empty storage used as another dtype: one record, each use naming its dtype,
                # as torch writes it (a Storage over the first one is the same storage to the writer)
                variants[dtype] = _core.storage_over(s, entry[0])
            return variants[dtype]
        try:
            if us.device.type == "cpu" and not self.snapshot:  # the bytes where they are
                s = _core.storage_at(us, ptr, n, entry[0])
            else:
                raw, location = _host_bytes(self.torch, us, n, self.snapshot)
                s = _core.storage_over(raw, entry[0], location)
        except ValueError as e:  # not a whole number of elements
            raise _Foreign(str(e)) from None
        self.storages[key] = (s, {dtype: s})
        if n:
            self.spans.append((ptr, n))
        return s

    def check_spans(self):
        """Two torch storages over overlapping bytes (slices of one storage) are two records in
        torch's file; the writer would make one."""
        self.spans.sort()
        for (a, n), (b, _) in zip(self.spans, self.spans[1:]):
            if b < a + n:
                raise _Foreign("storages that overlap")


def _host_bytes(torch, us, n, copy):
    """(uint8 ndarray of an untyped storage's n bytes in host memory, torch's location tag).

    A CPU storage is viewed in place (copied when ``copy``: a background save's snapshot); any
    other device's is copied to host memory (``.cpu()``), tagged as torch.save tags it
    (``"cuda:0"``: torch.serialization.location_tag)."""
    view = torch.empty(0, dtype=torch.uint8, device=us.device).set_(us, 0, (n,), (1,))
    if us.device.type == "cpu":
        return (view.numpy().copy() if copy else view.numpy()), "cpu"
    return view.cpu().numpy(), torch.serialization.location_tag(us)


def _native_refusal(torch, pickle_module, pickle_protocol, disable_byteorder):
    """Why torch.save's settings need torch's own writer, or None."""
    if getattr(pickle_module, "Pickler", None) is not pickle.Pickler:
        return "pickle_module is not the standard pickle"
    if pickle_protocol != 2:
        return f"pickle_protocol={pickle_protocol!r}"
    if disable_byteorder:
        return "_disable_byteorder_record=True"
    ser = torch.serialization
    tls = getattr(ser, "_serialization_tls", None)
    if tls is not None and getattr(tls, "skip_data", False):
        return "torch.serialization.skip_data"
    if getattr(ser, "get_crc32_options", lambda: True)() is not True:
        return "torch.serialization.set_crc32_options(False)"
    if getattr(ser, "_get_storage_alignment", lambda: 64)() != 64:
        return "a storage alignment other than 64"
    if sys.byteorder != "little":
        return "a big-endian host"
    return None


class _WriteWatch:
    """f's write, noting whether the writer has called it (a refusal before that leaves f as it
    was, so torch's writer may take over)."""

    __slots__ = ("write", "called")

    def __init__(self, f):
        real = f.write
        self.called = False

        def write(b):
            self.called = True
            return real(b)

        self.write = write


def _save_native(torch, obj, f, pickle_module, pickle_protocol, use_zip, disable_byteorder, tree=None, sync=False):
    """Write obj to f (a path, or a binary file object) with torchfree's writer as torch.save
    would; None when written, else why torch's writer must write it (nothing written then)."""
    if tree is None:
        why = _native_refusal(torch, pickle_module, pickle_protocol, disable_byteorder)
        if why is not None:
            return why
        conv = _ToWriter(torch)
        try:
            tree = conv.convert(obj)
            conv.check_spans()
        except _Foreign as e:
            return str(e)
    legacy = not use_zip
    if isinstance(f, str):
        from ._save import _archive_name

        # (save() gives a fresh file in a fresh folder: nothing maps it)
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            try:
                # sync: the caller fsyncs it next, so writeback starts as the bytes are written
                _core.save(tree, fd, _archive_name(f), legacy, sync=sync)
            except (TypeError, ValueError) as e:
                if os.lseek(fd, 0, os.SEEK_CUR) == 0:
                    return f"torchfree's writer refused it: {e}"
                raise
        finally:
            os.close(fd)
        return None
    watch = _WriteWatch(f)
    try:
        _core.save(tree, watch, "archive", legacy)
    except (TypeError, ValueError) as e:
        if not watch.called:
            return f"torchfree's writer refused it: {e}"
        raise
    f.flush()  # as torch.save's writer of a buffer
    return None


def _check_save_target(f, use_zip):
    """torch.save's checks of a file object, with its errors."""
    if not hasattr(f, "write"):
        raise AttributeError("expected 'f' to be string, path, or a file-like object with a 'write' attribute")
    if use_zip and not callable(f.write):
        raise TypeError(f"Buffer of {str(type(f)).strip('<>')} has no callable attribute 'write'")


def save(obj, f, pickle_module=pickle, pickle_protocol=2, _use_new_zipfile_serialization=True,
         _disable_byteorder_record=False, *, atomic=True, fsync=True, background=False):
    """``torch.save``: torch.save's bytes, written crash-safe and, on request, in the background.

    Who writes: torchfree's own writer (torchfree.save's) where torch's pickle of the object
    holds only what it writes as torch does (containers, Python scalars, dense tensors of any
    device, strides and storage offset, TypedStorages, Parameters, torch.Size, devices and
    dtypes, with pickle_module=pickle, protocol 2, the zip or the legacy format); torch's own
    writer for anything else (counted in ``_fallbacks``). Tensors of another device (CUDA, ...)
    are copied to host memory one storage at a time and written with their device's location
    tag, as torch writes them.

    Args:
        atomic: for a path, write a temporary file in a fresh folder next to it, then rename it
            over the target (the folder fsynced): a process killed at any moment leaves the old
            file or the new one, never a truncated one, and tensors or arrays that map the old
            file (a load with ``mmap=True``) keep its bytes. ``False`` writes the path in place,
            as ``torch.save`` does (a file this process maps is still replaced, not rewritten).
            File objects are written as ``torch.save`` writes them, except one whose file this
            process maps: that raises ``OSError`` (``errno.ETXTBSY``) before anything is written.
        fsync: with ``atomic``, fsync the new file before the rename and the folder after it, so
            the new file also survives a power loss or a kernel crash (``False``: the rename
            alone, which protects against the process being killed; ``bench/`` measures both).
        background: return a ``concurrent.futures.Future`` as soon as every tensor is copied
            to host memory (one memory copy of the state: the caller may go on training and
            change the tensors); the file is written by a background thread and appears
            atomically when the future completes; errors are raised by ``.result()``. Saves
            run one after another in the order they were asked (a second save to the same path
            comes after the first), and interpreter exit waits for the pending ones. Paths
            only. An object only torch's writer writes is saved before returning (the future is
            then already done).
    """
    args = (pickle_module, pickle_protocol, _use_new_zipfile_serialization, _disable_byteorder_record)
    if background:
        return _save_background(obj, f, args, bool(atomic), bool(fsync))
    _save(obj, f, args, bool(atomic), bool(fsync))
    return None


def _write(torch, real_save, obj, f, args, tree=None, sync=False):
    """obj to f (a path or a file object) by torchfree's writer, or by torch's where it must;
    ``tree``: what _ToWriter made of it already (a background save's snapshot).

    No warning when torch's writer writes it: its bytes are what torch.save writes, nothing is
    less safe, and code that saves a module expects torch.save to be silent (PyTorch's own
    test_serialization_save_warnings). The reasons are counted in ``_fallbacks``."""
    why = _save_native(torch, obj, f, *args, tree=tree, sync=sync)
    if why is not None and tree is not None:  # a snapshot has no object left for torch's writer
        raise RuntimeError(f"torchfree.torch.save: the background save could not be written: {why}")
    if why is not None:
        _fallbacks[("save", why)] += 1
        real_save(obj, f, *args)


def _check_parent(path, use_zip):
    """torch.save's error when the folder of ``path`` is not there (nothing else is checked): the
    zip writer's RuntimeError for an ASCII name, else the error of its open()."""
    parent = path[:path.rfind("/")] if "/" in path else ""
    if not parent or path.endswith("/") or os.path.isdir(parent):
        return
    if use_zip and path.isascii():
        raise RuntimeError(f"Parent directory {parent} does not exist.")
    with open(path, "wb"):  # fails (FileNotFoundError, NotADirectoryError) as torch's open does
        pass


def _save(obj, f, args, atomic=True, fsync=True, tree=None):
    torch = _torch()
    real_save = _originals.get("save", torch.save)
    if not isinstance(f, (str, bytes, os.PathLike)):
        _check_save_target(f, args[2])
        check_file_object(f)  # a file this process maps is never written in place
        return _write(torch, real_save, obj, f, args, tree)
    path = os.fsdecode(os.fspath(f))
    _check_parent(path, args[2])
    target = os.path.realpath(path) if os.path.islink(path) else path
    if not atomic:
        fd = open_rewrite(target)
        if fd is not None:  # None: this process maps the file: it is replaced below (no fsync)
            os.close(fd)
            return _write(torch, real_save, obj, target, args, tree)
        fsync = False
    directory = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(target)
    try:
        mode = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    tmpdir = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmpdir")
    os.mkdir(tmpdir, 0o700)
    tmp = os.path.join(tmpdir, base)  # the same file name: torch names the archive after it
    try:
        _write(torch, real_save, obj, tmp, args, tree, sync=fsync)
        if mode is not None or fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                if mode is not None:
                    os.fchmod(fd, mode)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)
    if fsync:
        _fsync_dir(directory)


# ---- background saves ----------------------------------------------------------------------

_background = None  # the one thread that writes background saves, in the order they were asked
_background_lock = threading.Lock()


def _background_executor():
    global _background
    with _background_lock:
        if _background is None:
            from concurrent.futures import ThreadPoolExecutor

            # its thread is joined at interpreter exit (concurrent.futures' own exit hook): pending
            # saves are written before the process ends
            _background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchfree-save")
        return _background


def _save_background(obj, f, args, atomic, fsync):
    """save(..., background=True): snapshot now, write on the background thread."""
    from concurrent.futures import Future

    if not isinstance(f, (str, bytes, os.PathLike)):
        raise TypeError("background saves write to a path (str or os.PathLike), not a file object")
    torch = _torch()
    why = _native_refusal(torch, *args[:2], args[3])
    tree = None
    if why is None:
        conv = _ToWriter(torch, snapshot=True)
        try:
            tree = conv.convert(obj)
            conv.check_spans()
        except _Foreign as e:
            why, tree = str(e), None
    if tree is None:  # only torch's writer writes it: now, with the object as it is
        done: Future = Future()
        try:
            _save(obj, f, args, atomic, fsync)
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            done.set_exception(e)
        else:
            done.set_result(None)
        return done
    path = os.fsdecode(os.fspath(f))
    return _background_executor().submit(_save, None, path, args, atomic, fsync, tree)


# ---- patching torch.load / torch.save --------------------------------------------------------

_originals: dict = {}
_lock = threading.RLock()
_depth = 0
_warned: set = set()
_fallbacks: collections.Counter = collections.Counter()  # ("load" / "save", reason) -> calls handed to torch


def _warn_once(reason: str) -> None:
    _fallbacks[("load", reason)] += 1
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"torchfree.torch: falling back to torch's own load ({reason})", stacklevel=3)


def _patched_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **pickle_load_args):
    real = _originals["load"]
    # torch's rules and errors now; its warnings are given below unless torch's own load takes
    # the call with the caller's arguments (it gives them itself then: they come once)
    pending = []
    resolved = _resolve_weights_only(_torch(), weights_only, pickle_module, pickle_load_args, pending)

    def fallback(reason):
        _warn_once(reason)
        return real(f, map_location, pickle_module, weights_only=weights_only, mmap=mmap, **pickle_load_args)

    if set(pickle_load_args) - {"encoding"}:
        return fallback(f"unsupported arguments {sorted(pickle_load_args)}")
    pos = None
    if not isinstance(f, (str, os.PathLike)):
        try:
            pos = f.tell()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            pos = None  # _load raises torch's error for it
    handed = False
    try:
        return _load(f, map_location, pickle_module, resolved, mmap, pickle_load_args, strict=True)
    except (_NeedsTorch, UnsafeGlobalError) as e:
        handed = True
        if pos is not None:
            f.seek(pos)
        return fallback(f"{type(e).__name__}: {e}")
    finally:
        if not handed:
            for msg, category in pending:
                warnings.warn(msg, category, stacklevel=2)  # the caller of torch.load, as torch's


def _patched_save(obj, f, pickle_module=pickle, pickle_protocol=2, _use_new_zipfile_serialization=True,
                  _disable_byteorder_record=False):
    _save(obj, f, (pickle_module, pickle_protocol, _use_new_zipfile_serialization, _disable_byteorder_record))


def install() -> None:
    """Route ``torch.load`` / ``torch.save`` to torchfree (until ``uninstall()``)."""
    global _depth
    torch = _torch()
    with _lock:
        if _depth == 0:
            _originals["load"], _originals["save"] = torch.load, torch.save
            torch.load, torch.save = _patched_load, _patched_save
        _depth += 1


def uninstall() -> None:
    """Undo one ``install()``; torch's own functions come back when every install is undone."""
    global _depth
    torch = _torch()
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth == 0:
            torch.load, torch.save = _originals.pop("load"), _originals.pop("save")


@contextlib.contextmanager
def patched():
    """``with torchfree.torch.patched():`` calls of ``torch.load`` / ``torch.save`` in the block
    (also inside libraries) run on torchfree. A load falls back to torch's own, with a one-time
    warning per reason, for what torchfree does not handle (a ``pickle_module`` with an
    unpickler of its own, classes that need their real code under ``weights_only=False``,
    globals outside torchfree's allowlist, TorchScript archives); a save, silently, to torch's
    writer for objects torchfree's does not write (see ``save``). Where torchfree's readers do
    more than torch.load (non-seekable streams, bytes), torch's errors are raised."""
    install()
    try:
        yield
    finally:
        uninstall()
