"""Build the attack corpus of tests/hostile/ and its README table (no torch needed).

    python tests/hostile/make_hostile.py            # rewrite the corpus and README.md
    python tests/hostile/make_hostile.py --check    # exit 1 if a file or README row is missing

Every attack is one file and one row: what it tries, and what torchfree must answer for
``load`` (``weights_only=True``, the default), ``load(weights_only=False)`` and ``scan``
(``open`` answers as ``load`` unless the row says otherwise). The expected answers are the
exception class (a ``CheckpointError`` subclass), ``ok`` (an inert result: ``Opaque``
placeholders, never a call), or ``xfail:`` for a known bug outside the reader core that a
reproducer documents. Every code-execution payload tries to create the file
``torchfree-canary`` in the current directory; tests/test_hostile.py runs each file from an
empty directory and checks that it never appears. Pickles are built from raw opcodes with
the helpers of tests/test_core.py, zips with tests/test_zipread_c.py's ``build_zip``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import struct
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
# an in-place build only when no torchfree is installed (CI tests the installed one, and
# subprocesses inherit this sys.path)
if importlib.util.find_spec("torchfree") is None and str(REPO / "pyext") not in sys.path:
    sys.path.insert(0, str(REPO / "pyext"))
if importlib.util.find_spec("torchfree") is None:  # pragma: no cover
    raise SystemExit("build torchfree first (setup.py build_ext --inplace)")

from test_core import F32, P, PROTO2, binint, glob, storage_pid, tensor_v2, unicode  # noqa: E402
from test_zipread_c import build_zip, deflate_raw  # noqa: E402

CANARY = "torchfree-canary"
SHELL = f"touch {CANARY}"
PYCODE = f"open({CANARY!r}, 'w').close()"

# ---- building blocks ----------------------------------------------------------------------


def zipped(pickle_bytes: bytes, records: dict | None = None, *, deflate=(), prefix="archive", extra=()) -> bytes:
    """A torch-style archive, deterministic (fixed timestamps). deflate: record names to deflate."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        items = [("data.pkl", pickle_bytes), ("byteorder", b"little")]
        items += [(f"data/{k}", v) for k, v in (records or {}).items()]
        items += list(extra) + [("version", b"3\n")]
        for name, data in items:
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            z.writestr(info, data)
    return buf.getvalue()


def ckpt(body: bytes, records=None, **kw) -> bytes:
    return zipped(P(PROTO2, body, b"."), records, **kw)


def call(module: str, name: str, *args: bytes) -> bytes:
    """GLOBAL module.name, then REDUCE with the given (already pickled) arguments."""
    return P(glob(module, name), b"(", *args, b"tR")


def tup(xs) -> bytes:
    return P(b"(", *[binint(x) for x in xs], b"t")


def tensor_meta(key: str, numel: int, offset: int, size, stride, metadata: bytes, storage="FloatStorage") -> bytes:
    """_rebuild_tensor_v2 with a 7th argument (the torch 2.x metadata dict)."""
    return P(glob("torch._utils", "_rebuild_tensor_v2"), b"(", storage_pid(key, numel, storage), binint(offset),
             tup(size), tup(stride), b"\x89", glob("collections", "OrderedDict"), b")R", metadata, b"tR")


def sd(name: str, value: bytes) -> bytes:
    """{name: value}"""
    return P(b"}", unicode(name), value, b"s")


W = F32.tobytes()  # 48 bytes: 12 float32
GOOD_TENSOR = tensor_v2("0", 12, 0, (3, 4), (4, 1))


def legacy(main_pickle: bytes, keys: list[str], blobs: list[bytes]) -> bytes:
    """The pre-1.6 stream: magic, protocol 1001, sys_info, main pickle, key list, blobs."""
    import pickle

    magic = bytes.fromhex("80028a0a6cfc9c46f9206aa850192e")
    proto = b"\x80\x02M\xe9\x03."
    sys_info = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                             "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    out = magic + proto + sys_info + main_pickle + pickle.dumps(keys, protocol=2)
    for b in blobs:
        out += b
    return out


def legacy_pid(key: str, numel: int) -> bytes:
    return P(b"(", unicode("storage"), glob("torch", "FloatStorage"), unicode(key), unicode("cpu"), binint(numel),
             b"N", b"tQ")


def tar_ckpt(members: dict[str, bytes]) -> bytes:
    """The 0.1.x tar layout: sys_info, pickle, tensors, storages (deterministic)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_500_000_000
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_sys_info() -> bytes:
    import pickle

    return pickle.dumps({"protocol_version": 1000, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 8}}, protocol=2)


def deflated_pickle(body: bytes) -> bytes:
    """A huge data.pkl kept small on disk by deflating it."""
    return zipped(body, deflate=("data.pkl",))


# ---- the attacks ----------------------------------------------------------------------------


@dataclass
class Attack:
    file: str
    attack: str
    load: str  # load(): the exception class expected, or "ok"
    unsafe: str  # load(weights_only=False)
    scan: str  # scan(): exception class or "ok"
    build: Callable[[], bytes]
    open: str = ""  # open() + reading every tensor; "" = as load(weights_only=False)
    peak_mib: int = 32  # tracemalloc peak allowed for one load/scan/open of the file
    live: bool = False  # the payload really runs under pickle.loads (the tests check it, as a control)
    scan_global: str = ""  # scan().globals must list this name
    xfail: str = ""  # known bug outside the reader core: the reproducer's reason
    isolate: bool = False  # run in a subprocess (it may crash the process)
    xfail_api: str = "load"  # the call that shows the bug: load or scan
    load_kwargs: dict = field(default_factory=dict)
    pickle_only: bytes = b""  # the data.pkl, for the fuzz seeds


def _os_system_reduce():
    return call("os", "system", unicode(SHELL))


ATTACKS: list[Attack] = []


def attack(file, what, load, unsafe, scan, **kw):
    def deco(fn):
        ATTACKS.append(Attack(file, what, load, unsafe, scan, fn, **kw))
        return fn
    return deco


UG, UP, FE, LE = "UnsafeGlobalError", "UnpicklingError", "FormatError", "LimitError"

# code execution: every way to name and call a global

attack("global_os_system.pt", "`GLOBAL os system` + `REDUCE('touch canary')` (the classic payload)",
       UG, "ok", "ok", live=True, scan_global="os.system")(lambda: ckpt(_os_system_reduce()))
attack("stack_global_os_system.pt", "`STACK_GLOBAL` of `os.system` (protocol 4 spelling), then `REDUCE`",
       UG, "ok", "ok", live=True, scan_global="os.system")(
    lambda: zipped(P(b"\x80\x04", unicode("os"), unicode("system"), b"\x93", b"(", unicode(SHELL), b"tR.")))
attack("inst_os_system.pt", "`INST os system` (protocol 0 call in one opcode)", UG, "ok", "ok", live=True,
       scan_global="os.system")(lambda: zipped(P(b"(", unicode(SHELL), b"ios\nsystem\n.")))
attack("obj_os_system.pt", "`OBJ` with class `os.system` and its argument", UG, "ok", "ok", live=True,
       scan_global="os.system")(lambda: zipped(P(PROTO2, b"(", glob("os", "system"), unicode(SHELL), b"o.")))
attack("newobj_subprocess_popen.pt", "`NEWOBJ` of `subprocess.Popen(['touch', canary])`", UG, "ok", "ok",
       scan_global="subprocess.Popen")(
    lambda: ckpt(P(glob("subprocess", "Popen"), b"(", b"]", b"(", unicode("touch"), unicode(CANARY), b"e", b"t",
                   b"\x81")))
attack("subprocess_check_call.pt", "`subprocess.check_call(['touch', canary])` by `REDUCE`", UG, "ok", "ok",
       live=True, scan_global="subprocess.check_call")(
    lambda: ckpt(call("subprocess", "check_call", P(b"]", b"(", unicode("touch"), unicode(CANARY), b"e"))))
attack("posix_system.pt", "`posix.system` (the module behind `os`)", UG, "ok", "ok", live=True,
       scan_global="posix.system")(lambda: ckpt(call("posix", "system", unicode(SHELL))))
attack("builtins_eval.pt", "`builtins.eval(\"open('canary','w')\")`", UG, "ok", "ok", live=True,
       scan_global="builtins.eval")(lambda: ckpt(call("builtins", "eval", unicode(PYCODE))))
attack("builtins_exec.pt", "`builtins.exec(...)` through the Python 2 name `__builtin__.exec`", UG, "ok", "ok",
       live=True, scan_global="builtins.exec")(lambda: ckpt(call("__builtin__", "exec", unicode(PYCODE))))
attack("builtins_getattr_import_chain.pt",
       "nested `REDUCE` chain `getattr(__import__('os'), 'system')('touch canary')`", UG, "ok", "ok", live=True,
       scan_global="builtins.getattr")(
    lambda: ckpt(P(glob("builtins", "getattr"), b"(", call("builtins", "__import__", unicode("os")),
                   unicode("system"), b"tR", b"(", unicode(SHELL), b"tR")))
attack("builtins_import.pt", "`builtins.__import__('os')`, its `system` read by a second `STACK_GLOBAL`", UG, "ok",
       "ok", scan_global="builtins.__import__")(
    lambda: zipped(P(b"\x80\x04", unicode("builtins"), unicode("__import__"), b"\x93", unicode("os"), b"\x85R",
                     b"0", unicode("os"), unicode("system"), b"\x93", unicode(SHELL), b"\x85R.")))
attack("torch_load_itself.pt", "`torch.load('other.pt', weights_only=False)` called from inside the pickle", UG,
       "ok", "ok", scan_global="torch.load")(
    lambda: ckpt(P(glob("torch", "load"), b"(", unicode("other.pt"), b"t", b"}", unicode("weights_only"), b"\x89",
                   b"s", b"\x92")))
attack("torch_jit_load.pt", "`torch.jit.load` (runs TorchScript code)", UG, "ok", "ok",
       scan_global="torch.jit.load")(lambda: ckpt(call("torch.jit", "load", unicode("model.pt"))))
attack("nested_reduce_chain_1000.pt",
       "1000 nested allowlisted `REDUCE`s (`OrderedDict([('k', OrderedDict([...]))])`) around `os.system`", UG,
       "ok", "ok", scan_global="os.system")(
    lambda: ckpt(P(*[P(glob("collections", "OrderedDict"), b"(", b"]", b"(", b"(", unicode("k"))
                     for _ in range(1000)], _os_system_reduce(), *[b"t", b"e", b"tR"] * 1000)))
attack("dynamic_stack_global.pt",
       "`STACK_GLOBAL` whose module and name are results of `_get_layout('os')` / `('system')`: no literal to scan",
       UG, "ok", "ok", scan_global="os.system")(
    lambda: zipped(P(b"\x80\x04", call("torch.serialization", "_get_layout", unicode("os")),
                     call("torch.serialization", "_get_layout", unicode("system")), b"\x93",
                     b"(", unicode(SHELL), b"tR.")))
attack("ext_registry.pt", "`EXT4` (a copyreg extension code instead of a name)", UG, UG, UG)(
    lambda: ckpt(P(b"\x84" + struct.pack("<i", 0x7fffffff), b"(", unicode(SHELL), b"tR")))

# globals hidden in places

attack("global_in_persistent_id_type.pt", "persistent id `('storage', os.system, ...)`: global as storage type", UG,
       UP, UP, scan_global="os.system")(
    lambda: ckpt(sd("w", P(b"(", unicode("storage"), glob("os", "system"), unicode("0"), unicode("cpu"),
                           binint(12), b"tQ")), {"0": W}))
attack("global_in_persistent_id_key.pt", "persistent id whose key is `os.system('touch canary')`", UG, UP, UP,
       scan_global="os.system")(
    lambda: ckpt(sd("w", P(b"(", unicode("storage"), glob("torch", "FloatStorage"), _os_system_reduce(),
                           unicode("cpu"), binint(12), b"tQ")), {"0": W}))
attack("global_in_build_state.pt", "`OrderedDict` `BUILD` state `{'_metadata': os.system(...)}`", UG, "ok", "ok",
       scan_global="os.system")(
    lambda: ckpt(P(glob("collections", "OrderedDict"), b")R", b"}", unicode("_metadata"), _os_system_reduce(),
                   b"s", b"b")))
attack("build_on_tensor_setstate.pt",
       "`BUILD` on a rebuilt tensor with a `set_`-style state (torch's `Tensor.__setstate__` path) of 1e6 elements "
       "over a 12-byte storage", FE, FE, FE)(
    lambda: ckpt(sd("w", P(GOOD_TENSOR, b"(", storage_pid("0", 12), binint(0), tup((1000000,)), tup((1,)), b"t",
                           b"b")), {"0": W}))
attack("rebuild_from_type_v2_os_system.pt", "`_rebuild_from_type_v2(_rebuild_tensor_v2, os.system, args, state)`",
       UG, "ok", "ok", scan_global="os.system")(
    lambda: ckpt(sd("w", P(glob("torch._tensor", "_rebuild_from_type_v2"), b"(",
                           glob("torch._utils", "_rebuild_tensor_v2"), glob("os", "system"),
                           b"(", storage_pid("0", 12), binint(0), tup((12,)), tup((1,)), b"\x89",
                           glob("collections", "OrderedDict"), b")R", b"t", b"}", b"tR")), {"0": W}))
attack("rebuild_from_type_v2_func_eval.pt", "`_rebuild_from_type_v2(builtins.eval, Tensor, (code,), {})`", UG, UP,
       UP, scan_global="builtins.eval")(
    lambda: ckpt(P(glob("torch._tensor", "_rebuild_from_type_v2"), b"(", glob("builtins", "eval"),
                   glob("torch", "Tensor"), b"(", unicode(PYCODE), b"t", b"}", b"tR")))
attack("rebuild_parameter_state_global.pt", "`_rebuild_parameter_with_state` whose state holds `os.system(...)`", UG,
       "ok", "ok", scan_global="os.system")(
    lambda: ckpt(sd("w", P(glob("torch._utils", "_rebuild_parameter_with_state"), b"(", GOOD_TENSOR, b"\x89",
                           glob("collections", "OrderedDict"), b")R", b"}", unicode("x"), _os_system_reduce(), b"s",
                           b"tR")), {"0": W}))
attack("torchscript_archive.pt",
       "TorchScript archive (`constants.pkl`, `code/`): torch < 2.6 ran it under `weights_only=True` "
       "(CVE-2025-32434 shape); torchfree never runs `code/`, its `__torch__` classes are inert Opaques",
       "ok", "ok", "ok", scan_global="__torch__.Evil")(
    lambda: zipped(P(PROTO2, glob("__torch__", "Evil"), b")\x81", b"}", b"b", b"."),
                   extra=[("constants.pkl", b"\x80\x02)."),
                          ("code/__torch__.py",
                           f"class Evil(Module):\n  def forward(self):\n    return ops.aten.save('{CANARY}')\n"
                           .encode())]))

_TS = [("constants.pkl", b"\x80\x02)."), ("code/__torch__.py", b"class M(Module):\n  pass\n")]
attack("torchscript_os_system.pt", "TorchScript archive whose `data.pkl` calls `os.system` next to a `__torch__` "
       "module", UG, "ok", "ok", live=True, scan_global="os.system")(
    lambda: zipped(P(PROTO2, b"}(", unicode("x"), _os_system_reduce(), unicode("m"), glob("__torch__", "M"),
                     b")\x81", b"}", b"bu."), extra=_TS))
attack("torchscript_constants_os_system.pt", "TorchScript archive whose `constants.pkl` calls `os.system` "
       "(scan and open read only `data.pkl`)", UG, "ok", "ok", open="ok")(
    lambda: zipped(P(PROTO2, glob("__torch__", "M"), b")\x81", b"}", b"b."),
                   extra=[("constants.pkl", P(PROTO2, _os_system_reduce(), b"\x85.")), _TS[1]]))
attack("torchscript_torch_os_system.pt", "TorchScript archive calling `__torch__.os.system`: a TorchScript class "
       "name, so an inert Opaque, never a lookup of `os`", "ok", "ok", "ok", scan_global="__torch__.os.system")(
    lambda: zipped(P(PROTO2, call("__torch__.os", "system", unicode(SHELL)), b"."), extra=_TS))
attack("torch_class_plain_zip.pt", "a `__torch__` class in a `torch.save` zip (no `constants.pkl`): refused under "
       "`weights_only=True` as any unknown class", UG, "ok", "ok", scan_global="__torch__.M")(
    lambda: zipped(P(PROTO2, glob("__torch__", "M"), b")\x81", b"}", b"b.")))
attack("jit_pickle_plain_zip.pt", "`torch.jit._pickle.build_intlist` in a `torch.save` zip: allowed only inside a "
       "TorchScript archive under `weights_only=True`", UG, "ok", "ok", scan_global="torch.jit._pickle.build_intlist")(
    lambda: ckpt(call("torch.jit._pickle", "build_intlist", P(b"]", b"(", binint(1), b"e"))))
attack("jit_restore_type_tag_bad_args.pt", "`restore_type_tag` with one argument in a TorchScript archive", UP, UP,
       UP, scan_global="torch.jit._pickle.restore_type_tag")(
    lambda: zipped(P(PROTO2, call("torch.jit._pickle", "restore_type_tag", b"}"), b"."), extra=_TS))
attack("jit_build_intlist_of_str.pt", "`build_intlist` of a `str` in a TorchScript archive", UP, UP, UP,
       scan_global="torch.jit._pickle.build_intlist")(
    lambda: zipped(P(PROTO2, call("torch.jit._pickle", "build_intlist", unicode("x")), b"."), extra=_TS))

# allowlisted functions called wrongly

attack("rebuild_tensor_v2_over_str.pt", "`_rebuild_tensor_v2` over a `str` instead of a storage", UP, UP, UP)(
    lambda: ckpt(sd("w", P(glob("torch._utils", "_rebuild_tensor_v2"), b"(", unicode("storage"), binint(0),
                           tup((3,)), tup((1,)), b"\x89", b"N", b"tR"))))
attack("rebuild_tensor_v2_two_args.pt", "`_rebuild_tensor_v2` with 2 arguments instead of 6", UP, UP, UP)(
    lambda: ckpt(sd("w", P(glob("torch._utils", "_rebuild_tensor_v2"), b"(", storage_pid("0", 12), binint(0),
                           b"tR")), {"0": W}))
attack("rebuild_tensor_v2_float_sizes.pt", "`_rebuild_tensor_v2` with float sizes and a `None` stride", UP, UP, UP)(
    lambda: ckpt(sd("w", P(glob("torch._utils", "_rebuild_tensor_v2"), b"(", storage_pid("0", 12), binint(0),
                           b"(G" + struct.pack(">d", 3.0) + b"t", b"(Nt", b"\x89", b"N", b"tR")), {"0": W}))
attack("ordered_dict_int_arg.pt", "`OrderedDict(5)`", UP, UP, UP)(
    lambda: ckpt(call("collections", "OrderedDict", binint(5))))
attack("torch_size_of_str.pt", "`torch.Size(('a',))`", UP, UP, UP)(
    lambda: ckpt(call("torch", "Size", P(b"(", unicode("a"), b"t"))))
attack("codecs_encode_rot13.pt", "`_codecs.encode('x', 'rot13')` (only text-to-bytes codecs are allowed)", UP, UP, UP)(
    lambda: ckpt(call("_codecs", "encode", unicode("x"), unicode("rot13"))))
attack("torch_device_int.pt", "`torch.device(5)`", UP, UP, UP)(lambda: ckpt(call("torch", "device", binint(5))))
attack("setitem_on_list.pt", "`SETITEM` on a list (CVE-2026-24747: `SETITEM` on non-dicts corrupted memory)", UP,
       UP, UP)(lambda: ckpt(P(b"]", binint(2**40), unicode("x"), b"s")))
attack("setitems_on_tensor.pt", "`SETITEMS` on a rebuilt tensor (CVE-2026-24747 shape)", UP, UP, UP)(
    lambda: ckpt(sd("w", P(GOOD_TENSOR, b"(", binint(-(2**40)), binint(7), b"u")), {"0": W}))
attack("append_on_dict.pt", "`APPENDS` on a dict", UP, UP, UP)(lambda: ckpt(P(b"}", b"(", binint(1), b"e")))

# storages and tensor geometry

attack("pid_numel_mismatch.pt", "persistent id claims 1000 floats, the record holds 12 (CVE-2026-24747 shape)", FE,
       FE, FE)(lambda: ckpt(sd("w", tensor_v2("0", 1000, 0, (3,), (1,))), {"0": W}))
attack("pid_numel_1e18.pt", "persistent id claiming 10^18 elements", FE, FE, FE)(
    lambda: ckpt(sd("w", tensor_v2("0", 10**18, 0, (3,), (1,))), {"0": W}))
attack("pid_numel_overflow.pt", "persistent id numel 2^62 of 8-byte elements (bytes overflow 64 bits)", FE, FE, FE)(
    lambda: ckpt(sd("w", tensor_v2("0", 2**62, 0, (3,), (1,), "DoubleStorage")), {"0": b""}))
attack("view_past_storage.pt", "view (offset 1, 3x4) one element past its 12-element storage", FE, FE, FE)(
    lambda: ckpt(sd("w", tensor_v2("0", 12, 1, (3, 4), (4, 1))), {"0": W}))
attack("shape_stride_overflow.pt", "size x stride overflows 64 bits (sizes 2^62, strides 2^62)", FE, FE, FE)(
    lambda: ckpt(sd("w", tensor_v2("0", 12, 0, (2**62, 4), (2**62, 1))), {"0": W}))
attack("negative_stride.pt", "negative stride", FE, FE, FE)(
    lambda: ckpt(sd("w", tensor_v2("0", 12, 11, (3,), (-1,))), {"0": W}))
attack("negative_offset.pt", "negative storage offset", FE, FE, FE)(
    lambda: ckpt(sd("w", tensor_v2("0", 12, -4, (3,), (1,))), {"0": W}))
attack("offset_out_of_bounds.pt", "storage offset 2^40 with an empty shape: nothing is read, so, as torch "
       "(whose `torch.zeros(4, 0, 4)[1:]` has offset 4 in a 0-byte storage), an empty array", "ok", "ok", "ok")(
    lambda: ckpt(sd("w", tensor_v2("0", 12, 2**40, (0,), (1,))), {"0": W}))
attack("huge_ndim.pt", "tensor of 1000 dimensions", LE, LE, LE)(
    lambda: ckpt(sd("w", tensor_v2("0", 12, 0, (1,) * 1000, (1,) * 1000)), {"0": W}))
attack("shared_storage_conflicting_sizes.pt", "one record named with 12 and with 6 elements", FE, FE, FE)(
    lambda: ckpt(P(b"(", tensor_v2("0", 12, 0, (3,), (1,)), tensor_v2("0", 6, 0, (3,), (1,)), b"l"), {"0": W}))
attack("storage_record_missing.pt", "persistent id names a record that is not in the archive", FE, FE, FE)(
    lambda: ckpt(sd("w", tensor_v2("7", 12, 0, (3,), (1,))), {"0": W}))
attack("neg_bit_stride0_bomb.pt",
       "4-byte storage viewed as 2^26 elements with stride 0 and the neg bit set (found here: `load` copied the "
       "whole view, 256 MiB from 621 bytes; fixed: the bits are applied to a copy of the storage span it covers, "
       "one element)", "ok|LimitError", "ok|LimitError", "ok", peak_mib=64, isolate=True)(
    lambda: ckpt(sd("w", tensor_meta("0", 1, 0, (2**26,), (0,), P(b"}", unicode("neg"), b"\x88", b"s"))),
                 {"0": b"\0" * 4}))
attack("storage_key_5000_bytes.pt",
       "storage key of 5000 bytes, loaded with `limits={'name': 10**5}` (found here: a 4104-byte stack buffer in "
       "storage_locate overflowed, a segfault; fixed in storage.c; run in a subprocess)", "ok|CheckpointError", "ok|CheckpointError", "ok", isolate=True,
       load_kwargs={"limits": {"name": 10**5}})(
    lambda: ckpt(sd("w", P(b"(", unicode("storage"), glob("torch", "FloatStorage"), unicode("k" * 5000),
                           unicode("cpu"), binint(1), b"tQ")), {"k" * 5000: b"\0" * 4}))

# memo abuse

attack("memo_long_binput_2e31.pt", "`LONG_BINPUT 2^31` on an empty memo (sparse memo: would be a 16 GiB table)", UP,
       UP, UP)(lambda: ckpt(P(b"N", b"r" + struct.pack("<I", 2**31))))
attack("memo_long_binput_max.pt", "`LONG_BINPUT 0xffffffff`", UP, UP, UP)(
    lambda: ckpt(P(b"N", b"r\xff\xff\xff\xff")))
attack("memo_binput_skips.pt", "`BINPUT 0`, `BINPUT 40`: a gap in the memo (a gap of up to 16 slots is "
       "allowed: Python 2's cPickle numbers from 1)", UP, UP, UP)(
    lambda: ckpt(P(b"Nq\x00", b"Nq\x28")))
attack("memo_binget_unset.pt", "`BINGET 0` before any `PUT`", UP, UP, UP)(lambda: ckpt(b"h\x00"))
attack("memo_long_binget_huge.pt", "`LONG_BINGET 0xfffffff0`", UP, UP, UP)(lambda: ckpt(b"j\xf0\xff\xff\xff"))
attack("memo_text_get_huge.pt", "protocol 0 `GET 999999999999999999`", UP, UP, UP)(
    lambda: zipped(b"N(g999999999999999999\n."))

# depth and size

attack("marks_1e6.pt", "a million nested `MARK`s (data.pkl deflated)", LE, LE, LE)(
    lambda: deflated_pickle(P(PROTO2, b"(" * 10**6, b"N.")))
attack("mark_empty_list_1e6.pt", "a million `MARK EMPTY_LIST` pairs", LE, LE, LE)(
    lambda: deflated_pickle(P(PROTO2, b"(]" * 10**6, b".")))
attack("empty_list_nested_3e5.pt", "a list nested 300000 deep (`EMPTY_LIST` and `APPEND` x 3*10^5), then a bad "
       "`BINPUT`: freeing it must not recurse", UP, UP, UP, peak_mib=64)(
    lambda: deflated_pickle(P(PROTO2, b"]" * 300000, b"a" * (300000 - 1), b"q\x40.")))
attack("stack_5e6_values.pt", "5 million `NONE`s on the stack (limit 2^22)", LE, LE, LE, peak_mib=64)(
    lambda: deflated_pickle(P(PROTO2, b"N" * 5 * 10**6, b".")))
attack("binunicode_past_end.pt", "`BINUNICODE` length 2^31 in a 20-byte pickle", UP, UP, UP)(
    lambda: ckpt(b"X" + struct.pack("<I", 2**31) + b"abc"))
attack("binunicode8_2e62.pt", "`BINUNICODE8` length 2^62", UP, UP, UP)(lambda: ckpt(b"\x8d" + struct.pack("<Q", 2**62)))
attack("binbytes8_2e63.pt", "`BINBYTES8` length 2^63", UP, UP, UP)(lambda: ckpt(b"\x8e" + struct.pack("<Q", 2**63)))
attack("bytearray8_max.pt", "`BYTEARRAY8` length 2^64-1", UP, UP, UP)(lambda: ckpt(b"\x96" + b"\xff" * 8))
attack("binstring_negative.pt", "`BINSTRING` with a negative length", UP, UP, UP)(
    lambda: ckpt(b"T" + struct.pack("<i", -5)))
attack("long4_past_end.pt", "`LONG4` of 2^31-1 bytes", UP, UP, UP)(lambda: ckpt(b"\x8b\xff\xff\xff\x7f"))
attack("frame_past_end.pt", "`FRAME` of 2^40 bytes", UP, UP, UP)(
    lambda: zipped(b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"N."))
attack("global_name_5000.pt", "`GLOBAL` with a 5000-byte module name", LE, LE, LE)(
    lambda: ckpt(call("m" * 5000, "f")))
attack("global_name_control_chars.pt", "`GLOBAL` name with a newline-free control byte", UP, UP, UP)(
    lambda: ckpt(call("o\x01s", "system", unicode(SHELL))))
attack("int_literal_200k_digits.pt", "protocol 0 `INT` of 200000 digits (quadratic to parse)", UP, UP, UP)(
    lambda: zipped(b"I" + b"9" * 200000 + b"\n.", deflate=("data.pkl",)))
attack("no_stop.pt", "pickle without `STOP`", UP, UP, UP)(lambda: zipped(P(PROTO2, b"N")))
attack("bytes_after_stop.pt", "bytes after `STOP`", UP, UP, UP)(lambda: zipped(P(PROTO2, b"N.", _os_system_reduce())))

# the container

_BASIC = [("archive/data.pkl", b"\x80\x02}q\x00.", 0), ("archive/data/0", bytes(range(24)), 0),
          ("archive/version", b"3\n", 0)]


def _patched(blob: bytes, off: int, fmt: str, value) -> bytes:
    b = bytearray(blob)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def _basic_layout():
    return build_zip(_BASIC)


attack("zip_cd_offset_outside.pt", "end record puts the central directory at 0xffffff00", FE, FE, FE)(
    lambda: _patched(_basic_layout()[0], _basic_layout()[1]["eocd"] + 16, "<I", 0xFFFFFF00))
attack("zip_cd_size_too_big.pt", "central directory size larger than the file", FE, FE, FE)(
    lambda: _patched(_basic_layout()[0], _basic_layout()[1]["eocd"] + 12, "<I", 0x7FFFFFFF))
attack("zip_entry_count_lies.pt", "end record claims 65535 entries in a 3-entry directory", FE, FE, FE)(
    lambda: build_zip(_BASIC, count=65535)[0])
attack("zip_local_header_outside.pt", "central directory entry points its local header past the end", FE, FE, FE)(
    lambda: _patched(_basic_layout()[0], _basic_layout()[1]["cd"][1] + 42, "<I", 0xFFFFFF00))
attack("zip_overlapping_records.pt", "two entries share one local header and its data", FE, FE, FE)(
    lambda: build_zip(_BASIC + [{"name": "archive/data/1", "data": bytes(range(24)), "hoff": 0}])[0])
attack("zip_overlap_quadratic.pt",
       "64 stored entries whose data all cover one 64 KiB kernel (overlapping-files bomb: 4 MiB copied from 64 KiB "
       "with mmap=False)", FE, FE, FE, load_kwargs={"mmap": False})(lambda: _overlap_bomb())
attack("zip_duplicate_names.pt", "two entries named archive/data/0", FE, FE, FE)(
    lambda: build_zip(_BASIC + [("archive/data/0", b"x" * 24, 0)])[0])
attack("zip_name_5000.pt", "entry name of 5000 bytes", LE, LE, LE)(
    lambda: build_zip(_BASIC + [("archive/" + "n" * 5000, b"x", 0)])[0])
attack("zip64_extra_short.pt", "zip64 extra field lacking the sizes its saturated fields promise", FE, FE, FE)(
    lambda: build_zip(_BASIC, z64_extra_override={1: (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF,
                                                       struct.pack("<HHQ", 1, 8, 24))})[0])
attack("zip64_extra_huge_offset.pt", "zip64 extra field with a local header offset of 2^63", FE, FE, FE)(
    lambda: build_zip(_BASIC, z64_entries=(), z64_extra_override={
        1: (24, 24, 0xFFFFFFFF, struct.pack("<HHQ", 1, 8, 2**63))})[0])
attack("zip64_locator_dangling.pt", "zip64 locator present, zip64 end record destroyed", FE, FE, FE)(
    lambda: _zip64_dangling())
attack("zip64_disk_counts.pt", "zip64 end record with per-disk and total counts that disagree", FE, FE, FE)(
    lambda: _zip64_counts())
attack("zip_method_bzip2.pt", "data record compressed with bzip2 (method 12)", FE, FE, FE)(
    lambda: build_zip([_BASIC[0], {"name": "archive/data/0", "data": b"abc", "method": 12, "comp": b"abc"},
                       _BASIC[2]])[0])
attack("numpy_dtype_too_large.pt",
       "`numpy.dtype('(2147483647,2147483647)f8')`: numpy raises ValueError, not TypeError", UP, UP, UP, isolate=True)(
    lambda: ckpt(P(glob("numpy", "dtype"), b"(", unicode("(2147483647,2147483647)f8"), b"\x89\x88tR")))
attack("numpy_dtype_syntax_error.pt",
       "`numpy.dtype('(2,')`: numpy parses the repeat count with ast.literal_eval and raises SyntaxError", UP, UP, UP,
       isolate=True)(
    lambda: ckpt(P(glob("numpy", "dtype"), b"(", unicode("(2,f8"), b"\x89\x88tR")))
attack("numpy_array_itemsize_zero.pt", "numpy array of 3 elements of dtype `S0` (no bytes): numpy raises ValueError",
       UP, UP, UP, isolate=True)(
    lambda: ckpt(_np_array((3,), "S0", b"")))
attack("numpy_scalar_itemsize_zero.pt", "numpy scalar of dtype `V0` with empty data", UP, UP, UP, isolate=True)(
    lambda: ckpt(P(glob("numpy._core.multiarray", "scalar"), b"(", _np_dtype("V0"), b"C\x00", b"tR")))
attack("numpy_array_shape_2e62.pt", "numpy array of shape (2^62, 0): numpy raises ValueError", UP, UP, UP,
       isolate=True)(
    lambda: ckpt(_np_array((2**62, 0), "f4", b"")))
attack("fuzz_zipread_names_overflow.pt",
       "found by fuzz_zipread (fixed): zip64 end record claims 7 entries, its directory holds 4 long-named ones; the "
       "name block was sized for 7 short ones (heap overflow)", FE, FE, FE)(lambda: _names_overflow())
attack("fuzz_zipread_crash_f2aff250.pt",
       "the input fuzz_zipread found (fixed), verbatim: a mutated skip_data checkpoint whose zip64 record shrinks "
       "the directory", FE, FE, FE)(lambda: zlib.decompress(__import__("base64").b64decode(_CRASH_F2AFF250)))
attack("zip_name_not_utf8.pt", "entry name `archive/data/\\xff\\xfe` that is not UTF-8 (found here: a "
       "UnicodeDecodeError escaped scan; fixed: record names are reported with replacement characters)",
       "ok", "ok", "ok", isolate=True)(
    lambda: build_zip(_BASIC + [("archive/data/\xff\xfe".encode("latin-1"), b"x", 0)])[0])
attack("zip_encrypted_record.pt", "data record flagged encrypted", FE, FE, "ok", open=FE)(
    lambda: _encrypted())
attack("zip_no_data_pkl.pt", "archive without data.pkl", FE, FE, FE)(
    lambda: build_zip([_BASIC[1], _BASIC[2]])[0])
attack("zip_bomb_declared_small.pt", "deflated record declares 48 bytes, inflates to 64 MiB: stops at 48", FE, FE,
       "ok", open=FE)(lambda: _bomb_declared_small())
attack("zip_bomb_ratio.pt", "deflated record declaring 4 GiB from 100 compressed bytes (deflate cannot exceed 1032:1)", FE, FE, FE)(
    lambda: _bomb_ratio())
attack("zip_bomb_honest_16mib.pt",
       "16 MiB of zeros deflated to 16 KiB, named by a matching persistent id, viewed past its end: inflated once, "
       "bounded by the declared size and limits['total_bytes']", FE, FE, FE, peak_mib=48)(lambda: _bomb_honest())
attack("not_a_zip.pt", "random bytes", FE, FE, FE)(lambda: bytes((i * 131 + 7) % 256 for i in range(4096)))
attack("empty.pt", "empty file", FE, FE, FE)(lambda: b"")
attack("zip_truncated_half.pt", "a real checkpoint cut in half", FE, FE, FE)(
    lambda: ckpt(sd("w", GOOD_TENSOR), {"0": W})[: len(ckpt(sd("w", GOOD_TENSOR), {"0": W})) // 2])

# legacy stream and tar

attack("legacy_os_system.pt", "legacy (pre-1.6) stream whose main pickle calls `os.system`", UG, "ok", "ok",
       scan_global="os.system")(
    lambda: legacy(P(PROTO2, _os_system_reduce(), b"."), [], []))
attack("legacy_pid_1e18.pt", "legacy stream: persistent id and blob header claim 10^18 elements (scan allocates "
       "nothing: the blob is past the end)", LE, LE, FE)(
    lambda: legacy(P(PROTO2, sd("w", legacy_pid("1", 10**18)), b"."), ["1"],
                   [struct.pack("<q", 10**18) + W]))
attack("legacy_blob_short.pt", "legacy stream: blob of 12 elements, file ends after 3", FE, FE, FE)(
    lambda: legacy(P(PROTO2, sd("w", legacy_pid("1", 12)), b"."), ["1"], [struct.pack("<q", 12) + W[:12]]))
attack("legacy_truncated_magic.pt", "legacy stream cut inside the magic number", FE, FE, FE)(
    lambda: bytes.fromhex("80028a0a6cfc9c46f920"))
attack("tar_storages_reduce.pt",
       "0.1.x tar whose `storages` member calls `os.system` (CVE-2025-32434 shape: torch < 2.6 unpickled it under "
       "`weights_only=True`; torchfree reads every pickle but the main one with weights_only rules)", UG, UG, UG)(
    lambda: tar_ckpt({"sys_info": tar_sys_info(), "pickle": P(PROTO2, unicode("1"), b"."),
                      "tensors": P(PROTO2, binint(0), b"."),
                      "storages": P(PROTO2, binint(1), b".", PROTO2, _os_system_reduce(), b".")}))
attack("tar_pickle_os_system.pt", "0.1.x tar whose main `pickle` member calls `os.system`", UG, "ok", "ok",
       scan_global="os.system")(
    lambda: tar_ckpt({"sys_info": tar_sys_info(), "pickle": P(PROTO2, _os_system_reduce(), b"."),
                      "tensors": P(PROTO2, binint(0), b"."), "storages": P(PROTO2, binint(0), b".")}))
attack("tar_numel_1e18.pt", "0.1.x tar: storage blob header claims 10^18 elements", FE, FE, FE)(
    lambda: tar_ckpt({"sys_info": tar_sys_info(), "pickle": P(PROTO2, unicode("1"), b"."),
                      "tensors": P(PROTO2, binint(0), b"."),
                      "storages": P(PROTO2, binint(1), b".", PROTO2, b"(", binint(1), unicode("cpu"),
                                    glob("torch", "FloatStorage"), b"t.", struct.pack("<q", 10**18), W)}))


def _overlap_bomb():
    kernel = bytes(range(256)) * 256  # 64 KiB
    n = 64
    names = [f"archive/data/{i}".encode() for i in range(n)]
    pkl_name = b"archive/data.pkl"
    ver = b"archive/version"
    # local headers of the n overlapping entries, back to back, then the shared kernel
    heads, offs = bytearray(), []
    for i, nm in enumerate(names):
        offs.append(len(heads))
        heads += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0x800, 0, 0, 0, 0, 0, 0, len(nm), 0) + nm
    kernel_off = len(heads)
    sizes = [kernel_off + len(kernel) - (offs[i] + 30 + len(nm)) for i, nm in enumerate(names)]
    body = P(PROTO2, b"(", *[tensor_v2(str(i), sizes[i], 0, (sizes[i],), (1,), "ByteStorage") for i in range(n)],
             b"l", b".")
    out = bytearray(heads) + kernel
    extra = []
    for rec_name, data in ((pkl_name, body), (ver, b"3\n")):
        extra.append((rec_name, len(out), data))
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0x800, 0, 0, 0, zlib.crc32(data), len(data), len(data),
                           len(rec_name), 0) + rec_name + data
    cd = bytearray()
    for i, nm in enumerate(names):
        size = sizes[i]  # from its data start to the kernel's end
        cd += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0x800, 0, 0, 0, 0, size, size, len(nm), 0, 0, 0,
                          0, 0, offs[i]) + nm
    for rec_name, off, data in extra:
        cd += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0x800, 0, 0, 0, zlib.crc32(data), len(data),
                          len(data), len(rec_name), 0, 0, 0, 0, 0, off) + rec_name
    cd_off = len(out)
    out += cd
    total = n + len(extra)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, total, total, len(cd), cd_off, 0)
    return bytes(out)


_CRASH_F2AFF250 = (
    "eNqdVEtv00AQXseJE8xD0DYSqFIP5RJe8StxUhBCspAvPpAGgSIurutsglU3ztqbViAhIaEc+AXcOPATuPAXuMIRcUDqCXFA4tRj"
    "d+PEsjcktIxkjWzPfPPN7Dfbsvg8AKUSmLM1cAlEe96w62CnpqoS9dXhnm8aIniW2OvcKwQ6HIl3EOfiIHSfV+0R9vxItEO4O/L8"
    "ro3hIApC+0AVUa5S6RRJcEQinT5EfJwimn7g4MfxRxHlJ4AyKnR44t3hCAlWHqPitgWs/BiVLG6Mzr113cD3oYu9YBCJj8IuDGH3"
    "oediEYk32ug8Rhfa6GJUbVnF0sfm5+sfCBR9Wgs7XgflpGNVUaRqLwj3HWwfwDAiRUzjSqrxqSkU/tPv728oY24p/AbQwGEafjoE"
    "2/G9/mAfDrBpSPMVlpteowQeHKKfOVIit5RAGdzL9Lf7AsOAzs00GmetOzPfw9iHlMP4/tE1gVQRlnJYAXczHKiXZNPQ/5MAi0+Z"
    "UH95+ixmsgqkFBNZSk75FqHCgaunI6SJtOKX9/0n/57/Jqhm9TVpPoKhRxTw0qFCtr2uadw8wyyUekNtKltbdUVp1mt6TZNVXdZ0"
    "Xa83NbXRrMm63tBUdSLTb713vQrhUZmw5CjZhGd6Q9bmmLMnRu8BFiG9BOuZ7D8MArNXLFBazBsZoG2OAZrbIBYrLcpyBusrg5Us"
    "AwuRVtNKBuJpDvxFy2x+WhurmfwfTP6CeaSPbTMD0ObBKQTVsgTh9uwO4u8k2UXG73CxP+ZnqyRMfh0V4vf4disIcU4R/OJmsScB"
    "IVPV"
)


def _np_dtype(s: str) -> bytes:
    """numpy.dtype(s, False, True) + BUILD (version 3, byteorder '|', no fields), as numpy pickles it."""
    return P(glob("numpy", "dtype"), b"(", unicode(s), b"\x89\x88tR", b"(K\x03", unicode("|"),
             b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")


def _np_array(shape, dtype: str, raw: bytes) -> bytes:
    """numpy's own pickle of an ndarray: _reconstruct(ndarray, (0,), b'b') + BUILD (1, shape, dtype, F, raw)."""
    return P(glob("numpy._core.multiarray", "_reconstruct"), b"(", glob("numpy", "ndarray"), b"(K\x00t", b"C\x01b",
             b"tR", b"(K\x01", tup(shape), _np_dtype(dtype), b"\x89", b"C" + bytes([len(raw)]) + raw, b"tb")


def _names_overflow():
    members = [(f"archive/{c}", b"x", 0) for c in "abc"] + [("archive/" + c * 60, b"y", 0) for c in "defg"]
    blob, lay = build_zip(members, zip64=True)
    suffix = lay["cd"][3]  # the directory as claimed: the last 4 (long-named) entries only
    blob = _patched(blob, lay["z64"] + 40, "<Q", lay["z64"] - suffix)  # its size
    return blob


def _zip64_dangling():
    blob, lay = build_zip(_BASIC, zip64=True)
    return _patched(_patched(blob, lay["loc"] + 8, "<Q", 5), lay["z64"], "<I", 0x06064B51)


def _zip64_counts():
    blob, lay = build_zip(_BASIC, zip64=True)
    return _patched(blob, lay["z64"] + 24, "<Q", 2)


def _encrypted():
    body = P(PROTO2, sd("w", GOOD_TENSOR), b".")
    return build_zip([("archive/data.pkl", body, 0), {"name": "archive/data/0", "data": W, "flags": 0x801},
                      ("archive/version", b"3\n", 0)])[0]


def _bomb_declared_small():
    body = P(PROTO2, sd("w", GOOD_TENSOR), b".")
    comp = deflate_raw(b"\0" * (64 << 20), 9)
    return build_zip([("archive/data.pkl", body, 0),
                      {"name": "archive/data/0", "data": b"", "method": 8, "comp": comp, "usize": 48},
                      ("archive/version", b"3\n", 0)])[0]


def _bomb_ratio():
    body = P(PROTO2, sd("w", tensor_v2("0", 0x3FFFFFFC, 0, (1,), (1,))), b".")
    return build_zip([("archive/data.pkl", body, 0),
                      {"name": "archive/data/0", "data": b"", "method": 8, "comp": b"\x03\x00" * 50,
                       "usize": 0xFFFFFFF0},
                      ("archive/version", b"3\n", 0)])[0]


def _bomb_honest():
    n = 4 << 20  # float32 elements: 16 MiB
    body = P(PROTO2, sd("w", tensor_v2("0", n, 1, (n,), (1,))), b".")
    comp = deflate_raw(b"\0" * (n * 4), 9)
    return build_zip([("archive/data.pkl", body, 0),
                      {"name": "archive/data/0", "data": b"", "method": 8, "comp": comp, "usize": n * 4},
                      ("archive/version", b"3\n", 0)])[0]


# ---- output -----------------------------------------------------------------------------------

README_HEAD = """# tests/hostile: the attack corpus

One file per attack, built by `make_hostile.py` (run it to regenerate; `--check` verifies that
the files and this table agree). `tests/test_hostile.py` runs every file through `torchfree.load`
(`weights_only=True`, the default), `load(weights_only=False)`, `scan` and `open` (reading every
tensor), from an empty directory, under tracemalloc, and checks:

* the answer is the one in the table: a `CheckpointError` subclass (`FormatError`,
  `UnpicklingError`, `UnsafeGlobalError`, `LimitError`) or `ok` (an inert result: unknown
  globals become `torchfree.Opaque` placeholders, never calls; `scan` lists them in `.globals`);
* no code ran: every payload tries to create `torchfree-canary` in the current directory, and
  it never appears (as a control, payloads marked *live* do create it under `pickle.loads`);
* memory stayed bounded: the tracemalloc peak of each call stays under the *peak* column.

Rows marked **xfail** (none at present) are reproducers of open bugs outside the reader core;
their tests are strict xfails run in a subprocess, so they fail, loudly, once the bug is fixed
and the mark is left. Rows saying "found here" or "found by fuzz_*" were bugs, now fixed.
`open` answers as `load(weights_only=False)` unless the row says otherwise: it reads tensors past
unknown globals (inert, as `scan` lists them); its `.load()` answers as `load`.

Also generated by the tests rather than stored: every truncation (each prefix and each suffix)
of real checkpoints (`tests/data/proto4.pt`, `tests/data/sd_views_deflated.pt`), of a legacy
stream and of a tar. "a or b" in a cell: either answer is right.

| file | attack | load | weights_only=False | scan | peak MiB |
|---|---|---|---|---|---|
"""


def attack_pickles():
    """The data.pkl of every attack (seeds of the pickle fuzz target)."""
    out = []
    for a in ATTACKS:
        data = a.build()
        if data[:4] == b"PK\x03\x04":
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    for n in z.namelist():
                        if n.endswith("data.pkl"):
                            out.append(z.read(n))
            except Exception:  # hostile containers
                pass
    return out


def readme() -> str:
    rows = []
    for a in ATTACKS:
        load = a.load if not a.xfail else f"{a.load} (**xfail**: {a.xfail})"
        if a.open:
            load += f"; open: {a.open}"
        if a.load_kwargs:
            load += f"; with `{', '.join(f'{k}={v!r}' for k, v in a.load_kwargs.items())}`"
        if a.live:
            load += " (*live*)"
        cells = [a.attack, load, a.unsafe, a.scan]
        cells = [c.replace("|", " or ") for c in cells]  # "ok|LimitError": either is right
        rows.append(f"| `{a.file}` | {' | '.join(cells)} | {a.peak_mib} |")
    return README_HEAD + "\n".join(rows) + f"\n\n{len(ATTACKS)} attacks.\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that files and README agree")
    args = ap.parse_args(argv)
    names = [a.file for a in ATTACKS]
    assert len(set(names)) == len(names), "duplicate file names"
    if args.check:
        missing = [n for n in names if not (HERE / n).is_file()]
        stale = (HERE / "README.md").read_text() != readme()
        if missing or stale:
            print(f"missing: {missing}; README stale: {stale}")
            return 1
        return 0
    for a in ATTACKS:
        (HERE / a.file).write_bytes(a.build())
    (HERE / "README.md").write_text(readme())
    print(f"wrote {len(ATTACKS)} attacks to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
