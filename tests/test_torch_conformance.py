"""torchfree.torch as torch.load / torch.save, behaviour by behaviour (issue 18).

Each test writes the same call both ways, torch 2.13's own function and torchfree's (directly,
and through ``install()``), and compares what comes back bit for bit: results (tensor bytes,
dtypes, strides, storage sharing), file bytes, file positions, exception types and messages,
warnings. The behaviours are those PyTorch's own test/test_serialization.py showed apart:
storages next to the tensors that view them, the stream position after a legacy checkpoint,
the default load endianness, MAP_SHARED mappings, torch's weights_only rules, pickle_module,
non-seekable files, torch.save to file objects (by torchfree's writer), Hugging Face shard
indexes and map_location strings torch rejects.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import mmap
import os
import pickle
import sys
import time
import warnings
import zipfile
from collections import OrderedDict

import pytest

import torchfree
from test_torch_interop import _cases, _random, assert_torch_equal

@contextlib.contextmanager
def installed():
    import torchfree.torch as tft

    tft.install()
    try:
        yield tft
    finally:
        tft.uninstall()


def _outcome(fn):
    """("ok", result) or ("raise", exception type, message)."""
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the outcome is what is compared
        return ("raise", type(e), str(e))


def _same_outcome(torch, got, exp):
    assert got[0] == exp[0], (got, exp)
    if exp[0] == "ok":
        assert_torch_equal(torch, got[1], exp[1])
    else:
        assert got[1:] == exp[1:]


def _recorded(fn):
    """(result, [warning texts]) of fn(), every warning recorded."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = fn()
    return r, [str(x.message) for x in w]


def _no_fallback(fn):
    """fn() under install(), asserting it ran on torchfree (no fallback to torch's load or save)."""
    import torchfree.torch as tft

    before = dict(tft._fallbacks)
    with installed():
        r = fn()
    assert dict(tft._fallbacks) == before, {k: v for k, v in tft._fallbacks.items() if before.get(k) != v}
    return r


class _Cls:
    """A class of this module: torch imports it under weights_only=False."""

    def __init__(self, v):
        self.v = v


# ---------------------------------------------------------------------------------------------
# storages next to tensors that view them
# ---------------------------------------------------------------------------------------------


def _storage_cases(torch):
    a = torch.arange(6.0)
    e = torch.tensor([], dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        return {
            "tensor_then_storage": [a, a.storage()],
            "storage_then_tensor": [a.storage(), a[2:]],
            "storage_twice": [a.storage(), a.storage(), a],
            "empty_other_dtype": [e, torch.TypedStorage(wrap_storage=e.untyped_storage(), dtype=torch.int64)],
            "empty_storages": [e.storage(), torch.TypedStorage(wrap_storage=e.untyped_storage(), dtype=torch.bool)],
            "nested": {"x": (a, [a.storage()]), "y": OrderedDict(s=a.storage())},
        }


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("name", ["tensor_then_storage", "storage_then_tensor", "storage_twice",
                                  "empty_other_dtype", "empty_storages", "nested"])
def test_storage_next_to_its_tensor_is_a_typed_storage(torch, legacy, name):
    import torchfree.torch as tft

    obj = _storage_cases(torch)[name]
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, f, _use_new_zipfile_serialization=not legacy)
        exp = torch.load(io.BytesIO(f.getvalue()))
        got = tft.load(io.BytesIO(f.getvalue()))
        assert_torch_equal(torch, got, exp)

        def storages(o):
            return [x for x in (o if isinstance(o, list) else [o["x"][1][0], o["y"]["s"]])
                    if isinstance(x, torch.storage.TypedStorage)]

        ge, gg = storages(exp), storages(got)
        assert [type(x) for x in gg] == [type(x) for x in ge]
        assert [x.dtype for x in gg] == [x.dtype for x in ge]
        # one object per storage, as torch's; tensors over it share its bytes
        assert [[x is y for y in gg] for x in gg] == [[x is y for y in ge] for x in ge]
        for x, t in ((x, t) for x in gg for t in (got if isinstance(got, list) else [])):
            if isinstance(t, torch.Tensor) and x.nbytes():
                assert x.data_ptr() == t.untyped_storage().data_ptr()


def test_storage_search_walks_each_container_once(torch):
    """A pickle's memo makes a DAG of 2**60 paths from 60 lists: the search for storages (C) and
    their replacement (Python) look at each container once."""
    import torchfree.torch as tft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = [torch.arange(3.0).storage()]
        for _ in range(60):
            x = [x, x]
        f = io.BytesIO()
        torch.save(x, f)
        t0 = time.perf_counter()
        got = tft.load(io.BytesIO(f.getvalue()))
    assert time.perf_counter() - t0 < 5
    leaf = got
    for _ in range(60):
        assert leaf[0] is leaf[1]
        leaf = leaf[0]
    assert isinstance(leaf[0], torch.storage.TypedStorage) and leaf[0].tolist() == [0.0, 1.0, 2.0]


# ---------------------------------------------------------------------------------------------
# the stream position after a checkpoint
# ---------------------------------------------------------------------------------------------


def _stream(torch, legacy=True):
    f = io.BytesIO()
    pickle.dump(41, f)
    torch.save({"a": torch.arange(5.0), "b": torch.ones(2, 3)[:, 1]}, f, _use_new_zipfile_serialization=not legacy)
    pickle.dump(43, f)
    torch.save(torch.arange(3), f, _use_new_zipfile_serialization=not legacy)
    pickle.dump("end", f)
    return f.getvalue()


def _read_sequence(torch, load, f):
    out = [pickle.load(f), load(f), f.tell(), pickle.load(f), load(f), f.tell(), pickle.load(f)]
    return out


@pytest.mark.parametrize("how", ["direct", "installed"])
@pytest.mark.parametrize("opener", ["bytesio", "file", "gzip"])
def test_legacy_checkpoint_leaves_the_stream_after_itself(torch, tmp_path, how, opener):
    import torchfree.torch as tft

    data = _stream(torch)
    path = tmp_path / "s.bin"
    if opener == "gzip":
        with gzip.open(path, "wb") as g:
            g.write(data)
    else:
        path.write_bytes(data)

    def open_():
        if opener == "bytesio":
            return contextlib.nullcontext(io.BytesIO(data))
        return gzip.open(path, "rb") if opener == "gzip" else open(path, "rb")

    with open_() as f:
        exp = _read_sequence(torch, torch.load, f)
    with open_() as f:
        if how == "direct":
            got = _read_sequence(torch, tft.load, f)
        else:
            got = _no_fallback(lambda: _read_sequence(torch, torch.load, f))
    assert got[2] == exp[2] and got[5] == exp[5]  # the positions
    assert got[0] == 41 and got[3] == 43 and got[6] == "end"
    assert_torch_equal(torch, got, exp)


# ---------------------------------------------------------------------------------------------
# set_default_load_endianness
# ---------------------------------------------------------------------------------------------

ENDIAN_DTYPES = ["float64", "float32", "float16", "bfloat16", "complex128", "complex64", "int64", "int32", "int16",
                 "int8", "uint8", "bool"]


def _without_record(data, name):
    """The zip without one record (as a file of torch < 1.12, which wrote no byteorder)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename != name:
                zout.writestr(info.filename, zin.read(info.filename))
    assert name not in zipfile.ZipFile(io.BytesIO(out.getvalue())).namelist()
    return out


@pytest.mark.parametrize("endianness", [None, "LITTLE", "BIG", "NATIVE"])
@pytest.mark.parametrize("record", [False, True])
def test_default_load_endianness(torch, endianness, record):
    """Without a byteorder record the setting decides the byte order (None and LITTLE: little);
    with one, the record does."""
    import torchfree.torch as tft
    from torch.serialization import LoadEndianness, get_default_load_endianness, set_default_load_endianness

    obj = {n: _random(torch, n, (3, 5), seed=i) for i, n in enumerate(ENDIAN_DTYPES)}
    obj["view"] = obj["float32"][1:, ::2]
    f = io.BytesIO()
    torch.save(obj, f)  # (torch 2.13 writes the byteorder record even with _disable_byteorder_record)
    if not record:
        f = _without_record(f.getvalue(), "archive/byteorder")
    old = get_default_load_endianness()
    set_default_load_endianness(None if endianness is None else getattr(LoadEndianness, endianness))
    try:
        exp = torch.load(io.BytesIO(f.getvalue()))
        got = tft.load(io.BytesIO(f.getvalue()))
        with installed():
            got2 = torch.load(io.BytesIO(f.getvalue()))
    finally:
        set_default_load_endianness(old)
    assert_torch_equal(torch, got, exp)
    assert_torch_equal(torch, got2, exp)
    if endianness == "BIG" and not record:  # the values are swapped then
        assert not torch.equal(got["int32"], obj["int32"])


# ---------------------------------------------------------------------------------------------
# set_default_mmap_options(MAP_SHARED)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["direct", "installed"])
def test_mmap_shared_writes_reach_the_file(torch, tmp_path, how):
    import torchfree.torch as tft

    load = tft.load if how == "direct" else torch.load
    results = {}
    for who in ("torch", "torchfree"):
        path = tmp_path / f"{who}.pt"
        torch.save({"w": torch.arange(12.0).reshape(3, 4)}, path)
        ctx = installed() if who == "torchfree" and how == "installed" else contextlib.nullcontext()
        loader = torch.load if who == "torch" else load
        with ctx:
            private = loader(path, mmap=True)
            private["w"][0, 0] = -1.0
            unchanged = torch.load(path, mmap=True)["w"].clone()
            torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
            try:
                shared = loader(path, mmap=True)
                shared["w"][0, 1] = -2.0
                again = loader(path, mmap=True)
            finally:
                torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
            results[who] = (unchanged, again["w"].clone(), torch.load(path)["w"])
            del private, shared, again
    for a, b in zip(results["torchfree"], results["torch"]):
        assert torch.equal(a, b)
    assert results["torch"][0][0, 0] == 0.0 and results["torch"][2][0, 1] == -2.0


# ---------------------------------------------------------------------------------------------
# weights_only: torch 2.13's rules
# ---------------------------------------------------------------------------------------------


ENVS = {"none": {}, "force": {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"},
        "force_no": {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "true"},
        "both": {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "yes", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "y"}}


def _summary(torch, outcome):
    """What a load gave, comparable across torch (real class) and torchfree direct (Opaque)."""
    if outcome[0] != "ok":
        if issubclass(outcome[1], pickle.UnpicklingError):  # torchfree's UnsafeGlobalError is one
            return ("raise", pickle.UnpicklingError)
        return outcome
    c = outcome[1]["c"]
    v = c.state["v"] if isinstance(c, torchfree.Opaque) else c.v
    return ("ok", type(c).__name__ if not isinstance(c, torchfree.Opaque) else c.name, v.tolist())


@pytest.mark.parametrize("env", list(ENVS))
@pytest.mark.parametrize("weights_only", [None, True, False])
@pytest.mark.parametrize("pickle_module", [None, "pickle"])
@pytest.mark.parametrize("encoding", [None, "utf-8"])
def test_weights_only_rules(torch, tmp_path, monkeypatch, env, weights_only, pickle_module, encoding):
    import torchfree.torch as tft

    path = tmp_path / "c.pt"
    torch.save({"c": _Cls(torch.arange(3)), "t": torch.ones(2)}, path)
    for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        monkeypatch.delenv(k, raising=False)
    for k, v in ENVS[env].items():
        monkeypatch.setenv(k, v)
    kw = {} if weights_only is None else {"weights_only": weights_only}
    if pickle_module:
        kw["pickle_module"] = pickle
    if encoding:
        kw["encoding"] = encoding
    exp, exp_w = _recorded(lambda: _outcome(lambda: torch.load(path, **kw)))
    got, got_w = _recorded(lambda: _outcome(lambda: tft.load(path, **kw)))
    tft._warned.clear()
    with installed():
        inst, inst_w = _recorded(lambda: _outcome(lambda: torch.load(path, **kw)))
    assert _summary(torch, got) == _summary(torch, exp)
    assert _summary(torch, inst) == _summary(torch, exp)
    if exp[0] == "ok":
        assert type(inst[1]["c"]) is _Cls  # installed: weights_only=False gets the real class (torch's load)
    # torch's own warnings, once (the fallback's is torchfree's)
    assert got_w == exp_w
    assert [w for w in inst_w if not w.startswith("torchfree")] == exp_w


def test_force_no_weights_only_warning_points_at_the_caller(torch, tmp_path, monkeypatch):
    import torchfree.torch as tft

    torch.save({"t": torch.ones(2)}, tmp_path / "t.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for load in (tft.load, lambda p: _no_fallback(lambda: torch.load(p))):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            load(tmp_path / "t.pt")
        assert [os.path.basename(x.filename) for x in w] == [os.path.basename(__file__)]


# ---------------------------------------------------------------------------------------------
# pickle_module
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["pickle", "torch.serialization.pickle", "weights_only_unpickler"])
@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_module_stand_ins(torch, tmp_path, module, legacy):
    """Modules whose unpickler torchfree's stands in for load natively (no fallback)."""
    import torchfree.torch as tft

    pm = {"pickle": pickle, "torch.serialization.pickle": torch.serialization.pickle,
          "weights_only_unpickler": torch._weights_only_unpickler}[module]
    obj = _cases(torch)["train_adam"]
    path = tmp_path / "t.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    for kw in ({}, {"weights_only": False}, {"encoding": "latin1"}):
        exp = torch.load(path, pickle_module=pm, **kw)
        assert_torch_equal(torch, tft.load(path, pickle_module=pm, **kw), exp)
        assert_torch_equal(torch, _no_fallback(lambda: torch.load(path, pickle_module=pm, **kw)), exp)
    # weights_only=True with a pickle_module: torch's RuntimeError
    exp = _outcome(lambda: torch.load(path, pickle_module=pm, weights_only=True))
    assert exp[0] == "raise"
    assert _outcome(lambda: tft.load(path, pickle_module=pm, weights_only=True)) == exp
    assert _no_fallback(lambda: _outcome(lambda: torch.load(path, pickle_module=pm, weights_only=True))) == exp


def test_pickle_module_weights_only_unpickler_refuses_as_torch(torch, tmp_path):
    import torchfree.torch as tft

    path = tmp_path / "c.pt"
    torch.save({"c": _Cls(1)}, path)
    pm = torch._weights_only_unpickler
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, pickle_module=pm)
    with pytest.raises(pickle.UnpicklingError):
        tft.load(path, pickle_module=pm)
    with installed(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, pickle_module=pm)


def test_pickle_module_of_its_own_goes_to_torch(torch, tmp_path):
    """A module with an Unpickler of its own runs its code: patched() hands the call to torch;
    torchfree.torch.load refuses it."""
    import torchfree.torch as tft

    class Throwing(pickle.Unpickler):
        def load(self, *args, **kwargs):
            raise RuntimeError("rumpelstiltskin")

    class Module:
        Unpickler = Throwing
        load = Throwing.load

    torch.save(torch.eye(3), tmp_path / "e.pt")
    tft._warned.clear()
    with installed(), pytest.warns(UserWarning, match="unpickler of its own"):
        with pytest.raises(RuntimeError, match="rumpelstiltskin"):
            torch.load(tmp_path / "e.pt", pickle_module=Module)
    with pytest.raises(TypeError, match="unpickler of its own"):
        tft.load(tmp_path / "e.pt", pickle_module=Module)


# ---------------------------------------------------------------------------------------------
# inputs torch.load refuses: non-seekable file objects, bytes
# ---------------------------------------------------------------------------------------------


class _Stream:
    """A file object that can only be read (a pipe, a socket)."""

    def __init__(self, data):
        self._b = io.BytesIO(data)

    def read(self, n=-1):
        return self._b.read(n)


class _NoTell(_Stream):
    def seek(self, *a):
        raise io.UnsupportedOperation("seek")

    def tell(self):
        raise io.UnsupportedOperation("tell")


@pytest.mark.parametrize("kind", ["no_attrs", "unsupported", "bytes"])
@pytest.mark.parametrize("legacy", [False, True])
def test_non_seekable_inputs(torch, kind, legacy):
    import torchfree.torch as tft

    f = io.BytesIO()
    torch.save({"a": torch.arange(4)}, f, _use_new_zipfile_serialization=not legacy)
    data = f.getvalue()
    make = {"no_attrs": _Stream, "unsupported": _NoTell, "bytes": bytes}[kind]
    exp = _outcome(lambda: torch.load(make(data)))
    assert exp[0] == "raise" and "You can only torch.load from a file that is seekable" in exp[2]
    assert _no_fallback(lambda: _outcome(lambda: torch.load(make(data)))) == exp
    # torchfree.torch.load itself reads them (as torchfree.load)
    assert torch.equal(tft.load(make(data))["a"], torch.arange(4))


def test_file_object_calls_only_what_torch_calls(torch):
    """torch.load reads with read/readline/seek/tell (readinto when there is one); torch.save
    writes with write and flush."""

    class Mock:
        def __init__(self, data=b"", readinto=False):
            self.calls = set()
            self._b = io.BytesIO(data)
            for name in ("read", "readline", "seek", "tell", "write", "flush") + (("readinto",) if readinto else ()):
                setattr(self, name, self._trace(name))

        def _trace(self, name):
            fn = getattr(self._b, name)

            def call(*a, **k):
                self.calls.add(name)
                return fn(*a, **k)

            return call

    for legacy in (False, True):
        m = Mock()
        _no_fallback(lambda: torch.save(torch.randn(3, 5), m, _use_new_zipfile_serialization=not legacy))
        assert m.calls <= {"write", "flush"} and "flush" in m.calls
        for readinto in (False, True):
            r = Mock(m._b.getvalue(), readinto)
            got = _no_fallback(lambda: torch.load(r))
            assert got.shape == (3, 5)
            assert r.calls <= {"read", "readline", "seek", "tell", "readinto"}
            assert ("readinto" in r.calls) == readinto


# ---------------------------------------------------------------------------------------------
# torch.save by torchfree's writer
# ---------------------------------------------------------------------------------------------


def _save_cases(torch):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    p = torch.nn.Parameter(torch.ones(2, 3))
    lin = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storages = [t.storage(), t, torch.FloatStorage([1, 2]), torch.arange(3).storage()]
    cases = {
        "tensor": t,
        "views": {"w": t, "v": t[1:, :2], "t": t.t(), "col": t[:, 2], "e": t[:0], "x": torch.ones(1, 3).expand(4, 3)},
        "view_alone": {"v": t[1:, :2]},
        "same_twice": [t, t, t.t(), t[0]],
        "state_dict": lin.state_dict(),
        "objects": {"size": torch.Size([2, 3]), "dtype": torch.float16, "bdtype": torch.bfloat16,
                    "dev": torch.device("cpu"), "cuda": torch.device("cuda", 1), "none": None, "f": 1.5,
                    "nan": float("nan"), "big": 2 ** 70, "neg": -(2 ** 40), "s": "ü", "b": b"ab",
                    "ba": bytearray(b"xy"), "c": 1 + 2j, "set": {1, 2, "a"}, "tuple": (1, (2, 3)),
                    "od": OrderedDict(a=1), "empty": {}, "el": [], "et": ()},
        "parameters": {"p": p, "again": p, "frozen": torch.nn.Parameter(torch.zeros(3), requires_grad=False)},
        "storages": storages,
        "scalar": torch.tensor(3.5),
        "nested": {"a": [{"b": (t, 1)}], "c": OrderedDict(x=t), "k": {1: t, 2.5: "v", None: 0, b"k": 1}},
        "shared_key_strings": [{"weight": t}, {"weight": t[0]}],
    }
    e = torch.tensor([], dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = [torch.TypedStorage(wrap_storage=e.untyped_storage(), dtype=d) for d in (torch.int64, torch.bool)]
    # an empty storage used as three dtypes: one record, three storage class names (torch's
    # test_save_different_dtype_unallocated)
    cases["empty_three_dtypes"] = [e, ts[0], e.storage(), ts[1], torch.tensor([], dtype=torch.int64)]
    for name in ("float64", "float32", "float16", "bfloat16", "complex128", "complex64", "int64", "int32", "int16",
                 "int8", "uint8", "bool", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
                 "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
        cases[f"dtype_{name}"] = {"x": _random(torch, name, (4, 6)), "even": None}
        cases[f"dtype_{name}"]["even"] = cases[f"dtype_{name}"]["x"][:, ::2]
    sd = {}
    for mname, m in (("conv", torch.nn.Conv2d(3, 4, 3)), ("bn", torch.nn.BatchNorm2d(4)),
                     ("lstm", torch.nn.LSTM(4, 5, num_layers=2))):
        sd[mname] = m.state_dict()
    cases["modules"] = sd
    objs = _cases(torch)
    cases["train_adam"] = objs["train_adam"]
    cases["train_sgd"] = objs["train_sgd"]
    return cases


SAVE_CASES = ["tensor", "views", "view_alone", "same_twice", "state_dict", "objects", "parameters", "storages",
              "scalar", "nested", "shared_key_strings", "empty_three_dtypes", "modules", "train_adam",
              "train_sgd"] + \
    [f"dtype_{n}" for n in ("float64", "float32", "float16", "bfloat16", "complex128", "complex64", "int64",
                            "int32", "int16", "int8", "uint8", "bool", "uint16", "uint32", "uint64",
                            "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                            "float8_e8m0fnu")]
LEGACY_ONLY_TORCH = {"dtype_uint16", "dtype_uint32", "dtype_uint64", "dtype_float8_e4m3fn", "dtype_float8_e5m2",
                     "dtype_float8_e4m3fnuz", "dtype_float8_e5m2fnuz", "dtype_float8_e8m0fnu"}


@pytest.fixture(scope="module")
def save_cases():
    from conftest import require_torch

    return _save_cases(require_torch())


def _torch_save(torch, obj, f, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, f, **kw)


@pytest.mark.parametrize("name", SAVE_CASES)
def test_save_to_file_object_is_torch_save_bytes(torch, save_cases, name):
    """A zip to a file object: byte for byte what torch.save writes, by torchfree's writer."""
    import torchfree.torch as tft

    obj = save_cases[name]
    exp, got, direct = io.BytesIO(), io.BytesIO(), io.BytesIO()
    _torch_save(torch, obj, exp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _no_fallback(lambda: torch.save(obj, got))
    assert got.getvalue() == exp.getvalue()
    n = sum(tft._fallbacks.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tft.save(obj, direct)
    assert sum(tft._fallbacks.values()) == n and direct.getvalue() == exp.getvalue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_torch_equal(torch, torch.load(io.BytesIO(got.getvalue()), weights_only=False),
                           torch.load(io.BytesIO(exp.getvalue()), weights_only=False))


@pytest.mark.parametrize("name", [n for n in SAVE_CASES if n not in LEGACY_ONLY_TORCH])
def test_save_legacy_format_loads_as_torch_save(torch, save_cases, name):
    """_use_new_zipfile_serialization=False: torch's keys are addresses, so the bytes differ;
    what torch.load makes of them does not."""
    obj = save_cases[name]
    exp, got = io.BytesIO(), io.BytesIO()
    _torch_save(torch, obj, exp, _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _no_fallback(lambda: torch.save(obj, got, _use_new_zipfile_serialization=False))
        exp.seek(0)
        got.seek(0)
        assert_torch_equal(torch, torch.load(got, weights_only=False), torch.load(exp, weights_only=False))


@pytest.mark.parametrize("name", ["views", "state_dict", "objects", "storages", "train_adam"])
def test_save_to_path_is_torch_save_bytes(torch, tmp_path, save_cases, name):
    obj = save_cases[name]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _torch_save(torch, obj, tmp_path / "a" / "model.ckpt.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _no_fallback(lambda: torch.save(obj, tmp_path / "b" / "model.ckpt.pt"))
    assert (tmp_path / "b" / "model.ckpt.pt").read_bytes() == (tmp_path / "a" / "model.ckpt.pt").read_bytes()
    assert os.listdir(tmp_path / "b") == ["model.ckpt.pt"]


def test_save_falls_back_to_torch_for_what_only_torch_writes(torch, tmp_path):
    """Modules, requires_grad, attributes, conj bits, meta, complex32, other pickle settings:
    torch's writer writes them (its bytes), silently, counted in _fallbacks."""
    import torchfree.torch as tft

    t = torch.randn(3)
    t.attr = 1
    cases = [
        (torch.nn.Linear(2, 3), {}),
        ({"rg": torch.randn(2, requires_grad=True)}, {}),
        ({"attr": t}, {}),
        ({"c": torch.randn(2, dtype=torch.complex64).conj()}, {}),
        ({"m": torch.empty(2, device="meta")}, {}),
        ({"h": torch.zeros(2, dtype=torch.complex32)}, {}),
        ({"q": torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.quint8)}, {}),
        ({"z": torch.zeros(4, 0, 4)[1:]}, {}),
        ({"e": b""}, {}),
        ({"c": _Cls(1)}, {}),
        ({"t": torch.ones(2)}, {"pickle_protocol": 4}),
        ({"t": torch.ones(2)}, {"_disable_byteorder_record": True}),
    ]
    for obj, kw in cases:
        exp, got = io.BytesIO(), io.BytesIO()
        _torch_save(torch, obj, exp, **kw)
        n = sum(v for (what, _), v in tft._fallbacks.items() if what == "save")
        with installed(), warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.save(obj, got, **kw)
        assert not [x for x in w if "torchfree" in str(x.message)]  # torch.save(module) warns nothing
        assert sum(v for (what, _), v in tft._fallbacks.items() if what == "save") == n + 1, obj
        assert got.getvalue() == exp.getvalue()


def test_save_refuses_as_torch_does(torch):
    import torchfree.torch as tft

    x = torch.rand(10)
    cases = [("foo", x), ("foo", torch.CharStorage([1, 2]))]
    for obj, f in cases:
        exp = _outcome(lambda: torch.save(obj, f))
        assert exp[0] == "raise"
        assert _outcome(lambda: tft.save(obj, f))[:2] == exp[:2]
    x.write, x.flush = "bar", "baz"
    for legacy in (False, True):
        exp = _outcome(lambda: torch.save("foo", x, _use_new_zipfile_serialization=not legacy))
        assert _outcome(lambda: tft.save("foo", x, _use_new_zipfile_serialization=not legacy))[:2] == exp[:2]
    x.write, x.flush = str.__add__, str.__mul__
    exp = _outcome(lambda: torch.save("foo", x))
    assert exp[0] == "raise" and _outcome(lambda: tft.save("foo", x))[:2] == exp[:2]
    # the same bytes as two dtypes: torch's RuntimeError, nothing written
    a = torch.randn(4, dtype=torch.complex64)
    for obj in ([a, a.imag], [a.real, a.imag.view(torch.int32)]):
        f1, f2 = io.BytesIO(), io.BytesIO()
        exp = _outcome(lambda: torch.save(obj, f1))
        assert exp[0] == "raise" and exp[1] is RuntimeError
        assert _outcome(lambda: tft.save(obj, f2)) == exp and f2.getvalue() == b""


# ---------------------------------------------------------------------------------------------
# Hugging Face shard indexes and map_location
# ---------------------------------------------------------------------------------------------


def _sharded(torch, tmp_path, legacy=False):
    torch.manual_seed(0)
    sd = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).state_dict()
    names = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[:2], "pytorch_model-00002-of-00002.bin": names[2:]}
    wm = {}
    for fname, keys in shards.items():
        torch.save(OrderedDict((k, sd[k]) for k in keys), tmp_path / fname,
                   _use_new_zipfile_serialization=not legacy)
        wm.update({k: fname for k in keys})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return tmp_path / "pytorch_model.bin.index.json", shards


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("map_location", [None, "cpu", "meta", {"cpu": "cpu"}])
def test_index_json_loads_the_shards(torch, tmp_path, legacy, map_location):
    import torchfree.torch as tft

    index, shards = _sharded(torch, tmp_path, legacy)
    exp = OrderedDict()
    for fname in shards:
        exp.update(torch.load(tmp_path / fname, map_location=map_location))
    got = tft.load(index, map_location=map_location)
    assert type(got) is OrderedDict
    assert_torch_equal(torch, got, exp)
    assert_torch_equal(torch, _no_fallback(lambda: torch.load(str(index), map_location=map_location)), exp)
    # numpy's torchfree.load gives the same names and values
    flat = torchfree.load(index)
    assert list(flat) == list(got)


@pytest.mark.parametrize("map_location", ["gpu", "cpu:0", "CPU", "foo", "cuda:x", b"cpu"])
@pytest.mark.parametrize("fmt", ["zip", "legacy", "index"])
@pytest.mark.parametrize("mmap_", [None, False, True])
def test_map_location_strings_torch_rejects(torch, tmp_path, map_location, fmt, mmap_):
    import torchfree.torch as tft

    if fmt == "index":
        index, shards = _sharded(torch, tmp_path)
        path = index
        exp = _outcome(lambda: torch.load(tmp_path / next(iter(shards)), map_location=map_location, mmap=mmap_))
    else:
        path = tmp_path / "x.pt"
        torch.save({"a": torch.ones(2)}, path, _use_new_zipfile_serialization=fmt == "zip")
        exp = _outcome(lambda: torch.load(path, map_location=map_location, mmap=mmap_))
    assert exp[0] == "raise"
    if fmt == "legacy" and mmap_:
        got = _outcome(lambda: tft.load(path, map_location=map_location, mmap=mmap_))
        assert got[0] == "raise"  # torch: RuntimeError; torchfree: CheckpointError (the mmap refusal)
        return
    assert _outcome(lambda: tft.load(path, map_location=map_location, mmap=mmap_)) == exp


# ---------------------------------------------------------------------------------------------
# the core's parts of these (no torch): storage_over, load_legacy(with_end), default_byteorder
# ---------------------------------------------------------------------------------------------


def test_core_storage_over_is_written_whole():
    """_core.storage_over: a Storage over a buffer (held exported), which save writes whole,
    as torch writes a storage that a tensor views only part of."""
    import numpy as np

    from torchfree import _core

    buf = bytearray(np.arange(6, dtype=np.float32).tobytes())
    s = _core.storage_over(buf, _core.DTYPE_NAMES.index("float32"))
    assert (s.key, s.location, s.nbytes, s.dtype) == ("", "cpu", 24, np.dtype(np.float32))
    with pytest.raises(BufferError):
        buf.append(0)  # exported while the Storage lives
    part = np.ndarray((2,), np.float32, buffer=s, offset=8)
    f = io.BytesIO()
    torchfree.save({"part": part}, f)
    assert torchfree.load(f.getvalue())["part"].tolist() == [2.0, 3.0]
    with zipfile.ZipFile(io.BytesIO(f.getvalue())) as z:
        assert z.read("archive/data/0") == bytes(buf)  # the whole storage, not the 8 bytes viewed
    del s, part
    buf.append(0)  # released
    for bad in (-1, len(_core.DTYPE_NAMES), _core.DTYPE_NAMES.index("qint8"), _core.DTYPE_NAMES.index("uint4")):
        with pytest.raises(ValueError):
            _core.storage_over(b"1234", bad)
    with pytest.raises(ValueError, match="whole number"):
        _core.storage_over(b"123", _core.DTYPE_NAMES.index("int16"))
    with pytest.raises(TypeError):
        _core.storage_over(object(), 0)


def test_core_save_empty_storage_as_several_dtypes_is_one_record():
    """An empty torchfree.Storage used as several dtypes is one record whose uses name their
    own dtypes (as torch writes, and as torchfree.load gives such a file back)."""
    import numpy as np

    from torchfree import _core

    ids = {n: _core.DTYPE_NAMES.index(n) for n in ("float32", "int64", "bool")}
    s = _core.storage_over(np.empty(0, np.uint8), ids["float32"])
    as_int = _core.storage_over(s, ids["int64"])
    obj = [np.ndarray((0,), np.float32, buffer=s), as_int, s, _core.storage_over(s, ids["bool"])]
    f = io.BytesIO()
    torchfree.save(obj, f)
    with zipfile.ZipFile(io.BytesIO(f.getvalue())) as z:
        assert [n for n in z.namelist() if n.startswith("archive/data/")] == ["archive/data/0"]
        pkl = z.read("archive/data.pkl")
    assert b"FloatStorage" in pkl and b"LongStorage" in pkl and b"BoolStorage" in pkl
    got = torchfree.load(f.getvalue())
    assert [type(x).__name__ for x in got] == ["ndarray", "Storage", "Storage", "Storage"]
    assert [x.dtype for x in got[1:]] == [np.dtype(np.int64), np.dtype(np.float32), np.dtype(bool)]
    assert {x.key for x in got[1:]} == {"0"}
    g = io.BytesIO()
    torchfree.save(got, g)  # a load -> save round trip writes the same file
    assert g.getvalue() == f.getvalue()


@pytest.mark.parametrize("trailer", [b"", b"\x80\x02K+.more bytes"])
def test_core_legacy_end_offset(trailer):
    import numpy as np

    from torchfree import _core
    from torchfree._load import Source, options

    f = io.BytesIO()
    torchfree.save({"a": np.arange(5, dtype=np.int64), "b": np.ones((2, 3), np.float32)[:, 1]}, f, format="legacy")
    ckpt = f.getvalue()
    src = Source(ckpt + trailer)
    obj, end = _core.load_legacy(*src.args(), **src.kwargs(), **options(), with_end=True)
    assert end == len(ckpt) and obj["a"].tolist() == [0, 1, 2, 3, 4]
    assert isinstance(_core.load_legacy(*src.args(), **src.kwargs(), **options()), dict)  # without: the object


def test_core_default_byteorder_applies_without_a_record():
    import numpy as np

    from torchfree import _core
    from torchfree._load import Source, options

    a = np.arange(4, dtype=np.int32)
    f = io.BytesIO()
    torchfree.save({"a": a, "h": np.arange(3, dtype=np.float16), "c": np.array([1 + 2j], np.complex64),
                    "u": np.arange(3, dtype=np.uint8)}, f)
    with_record = f.getvalue()
    without = _without_record(with_record, "archive/byteorder").getvalue()

    def load(data, order):
        src = Source(data)
        kw = {} if order == "omitted" else {"default_byteorder": order}
        return _core.load_zip(*src.args(), **src.kwargs(), **options(), **kw)

    for order in ("omitted", None, "little", "big", "native"):
        got = load(with_record, order)
        assert got["a"].tolist() == [0, 1, 2, 3]  # the record decides
        got = load(without, order)
        swapped = order == "big" or order == "native" and sys.byteorder == "big"
        assert got["a"].tolist() == (a.byteswap().tolist() if swapped else [0, 1, 2, 3])
        assert got["u"].tolist() == [0, 1, 2]
        c = np.array([1 + 2j], np.complex64)
        assert got["c"].tobytes() == (c.view(np.float32).byteswap().tobytes() if swapped else c.tobytes())
    for bad in ("BIG", 1):
        with pytest.raises(ValueError, match="default_byteorder"):
            load(without, bad)
