"""torchfree.torch: ``torch.load`` / ``torch.save`` with torch objects, on torchfree's core.

``load`` returns exactly what ``torch.load`` returns (tensors, ``nn.Parameter``, ``torch.Size``,
``torch.device``, torch dtypes) built by torchfree's own unpickler: nothing in the file is ever
imported or run. Tensors are made zero-copy over the mapped (or read) storage records, one
``torch.UntypedStorage`` per record, so views share storage exactly as torch's do.

``patched()`` (or ``install()`` / ``uninstall()``) routes ``torch.load`` / ``torch.save`` to this
module, for libraries that call them internally.

torch is imported on first use: ``import torchfree`` never imports it.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import secrets
import threading
import warnings
from collections import OrderedDict

from . import _core
from ._core import CheckpointError, UnsafeGlobalError
from ._files import _fsync_dir
from ._load import Source, options

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
    """The dict of torch-mode helpers for one load (see L->torch in src/module.h).

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

    def subclass(type_, data, state):
        if isinstance(type_, type) and issubclass(type_, torch.Tensor) and isinstance(data, torch.Tensor):
            _state_ok(state)
            return torch._tensor._rebuild_from_type_v2(lambda: data, type_, (), state)
        if strict:
            raise _NeedsTorch("a tensor subclass that needs its real class")
        from ._rebuild import subclass as np_subclass

        return np_subclass(type_, data, state)

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

    def finish(obj, nstorages):
        """Storages the file holds outside tensors (torch gives them as TypedStorage)."""
        if nstorages <= len(storages):
            return obj
        return _replace_storages(obj, lambda s: typed(s))

    def typed(s):
        entry = storages.get(s)
        if entry is None:
            entry = storages[s] = untyped(s)
        elif type(entry) is not tuple:
            entry = storages[s] = (entry.untyped_storage(), True)
        return torch.storage.TypedStorage(wrap_storage=entry[0], dtype=_storage_dtype(torch, s), _internal=True)

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


def _replace_storages(obj, convert, depth=0):
    """obj with every torchfree.Storage in dicts, lists and tuples replaced by convert(storage)."""
    if isinstance(obj, torchfree_Storage()):
        return convert(obj)
    if depth > 200:
        return obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            r = _replace_storages(v, convert, depth + 1)
            if r is not v:
                obj[k] = r
        return obj
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            r = _replace_storages(v, convert, depth + 1)
            if r is not v:
                obj[i] = r
        return obj
    if type(obj) is tuple:
        items = [_replace_storages(v, convert, depth + 1) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else tuple(items)
    return obj


def torchfree_Storage():
    return _core.Storage


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
        f: a path, a bytes-like object or a binary file object (as ``torchfree.load``).
        map_location: as ``torch.load``: ``None``, a device string or ``torch.device``
            (``"cuda:1"``: storages are copied through pinned staging buffers), a dict
            ``{saved: target}``, or a callable ``fn(storage, location)`` given each torch
            ``UntypedStorage`` (on the CPU) and its saved location tag.
        pickle_module: must be ``None`` (torchfree runs its own unpickler).
        weights_only: ``None`` or ``True``: torch's weights-only allowlist (torchfree's);
            ``False``: unknown classes become inert ``torchfree.Opaque`` placeholders (never
            imported or called; use ``torch.load`` for real classes).
        mmap: ``None`` maps a path copy-on-write (zero-copy); ``True`` requires mapping;
            ``False`` reads every storage into memory the tensors own.
        pickle_load_args: ``encoding`` (Python 2 pickles), as ``torch.load``.

    Raises:
        What ``torch.load`` raises for devices (e.g. ``RuntimeError`` for a CUDA checkpoint on a
        machine without CUDA), torchfree's ``CheckpointError`` family for bad or unsafe files.
    """
    return _load(f, map_location, pickle_module, weights_only, mmap, pickle_load_args, strict=False)


def _load(f, map_location, pickle_module, weights_only, mmap, pickle_load_args, strict):
    torch = _torch()
    if pickle_module is not None:
        raise TypeError("torchfree.torch.load runs its own unpickler: pickle_module must be None")
    extra = set(pickle_load_args) - {"encoding"}
    if extra:
        raise TypeError(f"unsupported arguments: {sorted(extra)}")
    if weights_only is None:
        weights_only = True
    cuda = _cuda_target(torch, map_location)
    restore = _restorer(torch, map_location)
    helpers, staged = _helpers(torch, map_location, restore, weights_only, strict, cuda)
    meta = isinstance(map_location, (str, torch.device)) and str(map_location) == "meta"
    opts = options("meta" if meta else None, weights_only, None, pickle_load_args.get("encoding", "utf-8"), None)
    src = Source(f, mmap)
    try:
        loader = _core.load_zip if src.format == "zip" else _core.load_legacy
        opts["torch"] = helpers
        obj = loader(*src.args(), **src.kwargs(), **opts)
    finally:
        src.close()
    if staged:
        _stage(torch, staged, cuda)
    torch._utils._validate_loaded_sparse_tensors()
    return obj


# ---- save --------------------------------------------------------------------------------


def save(obj, f, pickle_module=pickle, pickle_protocol=2, _use_new_zipfile_serialization=True,
         _disable_byteorder_record=False):
    """``torch.save``, crash-safe for paths: the bytes are torch.save's own (written by torch's
    pickler and zip writer), into a temporary file with the target's name in a fresh folder next
    to it, fsynced, then renamed over the target (and the folder fsynced), so a crash leaves
    the old file or the new one. File objects are written as ``torch.save`` writes them."""
    torch = _torch()
    args = (pickle_module, pickle_protocol, _use_new_zipfile_serialization, _disable_byteorder_record)
    real_save = _originals.get("save", torch.save)
    if not isinstance(f, (str, bytes, os.PathLike)):
        return real_save(obj, f, *args)
    path = os.fsdecode(os.fspath(f))
    target = os.path.realpath(path) if os.path.islink(path) else path
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
        real_save(obj, tmp, *args)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
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
    _fsync_dir(directory)


# ---- patching torch.load / torch.save --------------------------------------------------------

_originals: dict = {}
_lock = threading.RLock()
_depth = 0
_warned: set = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"torchfree.torch: falling back to torch's own load ({reason})", stacklevel=3)


def _patched_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **pickle_load_args):
    real = _originals["load"]

    def fallback(reason):
        _warn_once(reason)
        return real(f, map_location, pickle_module, weights_only=weights_only, mmap=mmap, **pickle_load_args)

    if pickle_module is not None:
        return fallback("pickle_module is given")
    if set(pickle_load_args) - {"encoding"}:
        return fallback(f"unsupported arguments {sorted(pickle_load_args)}")
    pos = None
    if not isinstance(f, (str, os.PathLike, bytes, bytearray, memoryview)):
        try:
            pos = f.tell()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return fallback("an unseekable file object")
    try:
        return _load(f, map_location, None, weights_only, mmap, pickle_load_args, strict=True)
    except (_NeedsTorch, UnsafeGlobalError) as e:
        if pos is not None:
            f.seek(pos)
        return fallback(f"{type(e).__name__}: {e}")


def _patched_save(obj, f, *args, **kwargs):
    return save(obj, f, *args, **kwargs)


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
    (also inside libraries) run on torchfree, falling back to torch's own function, with a
    one-time warning, for what torchfree does not handle (``pickle_module``, classes that
    need their real code under ``weights_only=False``, globals outside torchfree's
    allowlist, TorchScript archives)."""
    install()
    try:
        yield
    finally:
        uninstall()
