"""The C walk behind flatten(), scan() and open() (_core.walk) and the info objects scan makes:
the same names, order and sharing as the Python walk they replace, depth and size limits
instead of crashes, and TensorInfo fields against torch."""

from __future__ import annotations

import collections
import copy
import io
import pickle
import random
import zipfile

import numpy as np
import pytest

import torchfree
from torchfree import _core, _scan
from torchfree._scan import RecordInfo, StorageInfo, TensorInfo


def ref_walk(obj, sep=".", leaves=(np.ndarray, torchfree.MetaArray)):
    """The walk as flatten() did it in Python: depth first, a container once, leaves each time."""
    stack, seen, out = [("", obj)], set(), []
    while stack:
        name, o = stack.pop()
        if isinstance(o, leaves):
            out.append((name, o))
            continue
        kids = _scan._children(o)
        if not kids or id(o) in seen:
            continue
        seen.add(id(o))
        for k, v in reversed(kids):
            stack.append((f"{name}{sep}{k}" if name else k, v))
    return out


def same(got, want):
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(a is b for (_, a), (_, b) in zip(got, want))


def random_tree(rng: random.Random, n_nodes=60):
    """Nested dicts, OrderedDicts, lists, tuples and Opaques over arrays, MetaArrays and scalars,
    with shared containers and cycles."""
    made = []

    def leaf():
        r = rng.random()
        if r < 0.4:
            return np.arange(rng.randrange(4), dtype=rng.choice(["f4", "i8", "u1"]))
        if r < 0.5:
            return torchfree.MetaArray((rng.randrange(3),), np.dtype("f2"))
        return rng.choice([1, 2.5, "s", None, True, b"x", 10**30])

    def key(i):
        return rng.choice([f"k{i}", i, -i, (i, "t"), 1.5, True, f"é{i}", ""])

    def node(depth):
        if depth > 6 or rng.random() < 0.35:
            if made and rng.random() < 0.25:
                return rng.choice(made)  # shared (and, when it is an ancestor, a cycle)
            return leaf()
        kind = rng.choice(["dict", "odict", "list", "tuple", "opaque"])
        n = rng.randrange(5)
        if kind in ("dict", "odict"):
            c = {} if kind == "dict" else collections.OrderedDict()
            made.append(c)
            for i in range(n):
                c[key(i)] = node(depth + 1)
            if kind == "odict" and len(c) > 1 and rng.random() < 0.5:
                c.move_to_end(next(iter(c)))  # its own order, not the underlying dict's
            return c
        if kind == "list":
            c = []
            made.append(c)
            c.extend(node(depth + 1) for _ in range(n))
            return c
        if kind == "tuple":
            return tuple(node(depth + 1) for _ in range(n))
        o = torchfree.Opaque("m", "C", args=tuple(node(depth + 1) for _ in range(rng.randrange(2))))
        made.append(o)
        shape = rng.randrange(4)
        if shape == 1:
            o.state = {f"a{i}": node(depth + 1) for i in range(n)}
        elif shape == 2:
            o.state = ({"x": node(depth + 1)}, None if rng.random() < 0.5 else {"y": node(depth + 1)})
        elif shape == 3:
            o.state = [node(depth + 1) for _ in range(n)]
        o.items.update({f"i{i}": node(depth + 1) for i in range(rng.randrange(2))})
        o.list.extend(node(depth + 1) for _ in range(rng.randrange(2)))
        return o

    return node(0)


@pytest.mark.parametrize("seed", range(60))
def test_walk_matches_python_semantics(seed):
    rng = random.Random(seed)
    obj = random_tree(rng)
    for sep in (".", "/"):
        same(_scan._walk(obj, sep), ref_walk(obj, sep))
    flat = torchfree.flatten(obj)
    want = collections.OrderedDict(ref_walk(obj))
    assert isinstance(flat, collections.OrderedDict) and list(flat) == list(want)
    assert all(flat[k] is want[k] for k in want)


@pytest.mark.parametrize("seed", range(40))
def test_find_matches_index(seed):
    """open()[name] finds one tensor without building names: the same leaf the index has (the last
    of duplicate names), KeyError for names the index lacks, prefixes included."""
    rng = random.Random(1000 + seed)
    obj = random_tree(rng)
    if isinstance(obj, dict):
        obj[1] = np.zeros(1)  # "1" twice when the tree has a "1" key too
        obj["1"] = {"x": np.ones(1)}
    idx = _core.walk(obj, _scan._INDEX, ".", _scan._children, False)
    probes = list(idx) + [n + "." for n in idx] + [n[:-1] for n in idx if n] + ["", ".", "nope", "1.x.y", "1"]
    for name in probes:
        try:
            got = _core.walk(obj, _scan._FIND, ".", _scan._children, False, target=name)
        except KeyError:
            assert name not in idx, name
        else:
            assert got is idx[name], name
    idx2 = _core.walk(obj, _scan._INDEX, "/", _scan._children, False)
    for name in idx2:
        assert _core.walk(obj, _scan._FIND, "/", _scan._children, False, target=name) is idx2[name]


def test_find_key_kinds():
    a, b, c, d, e = (np.full(1, float(i)) for i in range(5))
    obj = {10**30: {"w": a}, -5: b, "é": {"x": c}, True: d, (1, 2): [e], 7: {"y": a}}
    idx = _core.walk(obj, _scan._INDEX, ".", _scan._children, False)
    assert list(idx) == [f"{10**30}.w", "-5", "é.x", "True", "(1, 2).0", "7.y"]
    for name, leaf in idx.items():
        assert _core.walk(obj, _scan._FIND, ".", _scan._children, False, target=name) is leaf
    for miss in ("7", "7.", "7.y.", "-", "é", "True.x", "(1, 2)"):
        with pytest.raises(KeyError):
            _core.walk(obj, _scan._FIND, ".", _scan._children, False, target=miss)


def test_walk_cases():
    a = np.zeros(2)
    shared = {"w": a}
    cyc = []
    cyc.append(cyc)
    cyc.append(a)
    od = collections.OrderedDict([("x", a), ("y", a)])
    od.move_to_end("x")
    obj = {"s1": shared, "s2": shared, 3: [a, (a,)], ("t", 1): a, "cyc": cyc, "od": od, "e": {}, "n": None,
           "": {"": a}}
    got = _scan._walk(obj)
    same(got, ref_walk(obj))
    assert [n for n, _ in got] == ["s1.w", "3.0", "3.1.0", "('t', 1)", "cyc.1", "od.y", "od.x", ""]
    assert _scan._walk(a) == [("", a)]
    assert _scan._walk(5) == [] and _scan._walk({}) == []


class _FreshItems(dict):
    """A mapping whose items() makes new containers at each call."""

    def items(self):
        return [("a", {"w": self["arr"]}), ("b", [self["arr"]])]


def test_walk_fresh_children_are_not_taken_for_seen_ones():
    arr = np.zeros(1)
    obj = {f"k{i}": _FreshItems(arr=arr) for i in range(200)}
    names = list(torchfree.flatten(obj))
    assert names == [n for i in range(200) for n in (f"k{i}.a.w", f"k{i}.b.0")]


def test_walk_opaque_children():
    a, b, c = np.zeros(1), np.ones(1), np.full(1, 2.0)
    o = torchfree.Opaque("m", "C", args=(a,), state=({"d": b}, {"s": c}))
    o.items["i"] = a
    o.list.append(b)
    obj = {"o": o, "o2": o}
    got = _scan._walk(obj)
    same(got, ref_walk(obj))
    assert [n for n, _ in got] == ["o.d", "o.s", "o.i", "o.0", "o.args.0"]


def test_walk_opaque_state_chains_and_cycles():
    """An Opaque whose state is an Opaque (BUILD of BUILD ...) lists the innermost state's
    children first, then each Opaque's own items from the inside out; chains deeper than Python's
    stack and an Opaque that is its own state are walked without recursion."""
    a, b, c = np.zeros(1), np.ones(1), np.full(1, 2.0)
    inner = torchfree.Opaque("m", "C", state={"s": a})
    inner.items["i"] = b
    outer = torchfree.Opaque("m", "C", state=inner)
    outer.list.append(c)
    assert [n for n, _ in _scan._walk({"o": outer})] == ["o.s", "o.i", "o.0"]
    chain = last = torchfree.Opaque("m", "C", state={"w": a})
    for _ in range(20_000):
        chain = torchfree.Opaque("m", "C", state=chain)
    assert list(torchfree.flatten({"c": chain})) == ["c.w"]
    selfish = torchfree.Opaque("m", "C")
    selfish.state = selfish
    selfish.items["x"] = b
    last.state = chain  # a cycle through the whole chain
    assert list(torchfree.flatten({"s": selfish})) == ["s.x"]
    assert list(torchfree.flatten({"c": chain})) == []
    # the same chain from a pickle: GLOBAL, (), REDUCE 5,000 times, then 4,999 BUILDs
    pk = b"\x80\x02" + b"cm\nC\n)R" * 5000 + b"b" * 4999 + b"."
    info = torchfree.scan(_zip({"archive/data.pkl": pk, "archive/version": b"3\n"}))
    assert info.tensors == [] and info.globals == ["m.C"]


def nested(depth):
    obj = inner = []
    for _ in range(depth):
        nxt = []
        inner.append(nxt)
        inner = nxt
    inner.append(np.zeros(1))
    return obj


def test_deep_nesting_raises_limit_error():
    limit = _core.LIMITS["marks"]
    ok = nested(limit - 1)
    assert list(torchfree.flatten(ok)) == [".".join(["0"] * limit)]
    with pytest.raises(torchfree.LimitError, match="nested deeper"):
        torchfree.flatten(nested(limit + 5))
    with pytest.raises(torchfree.LimitError):
        _scan._walk(nested(50), max_depth=10)


def test_long_names_raise_limit_error():
    # names grow with depth: 300 levels of 10,000-character keys would build 450 M characters
    k = "k" * 10_000
    obj = inner = {}
    for _ in range(300):
        inner[k] = {}
        inner = inner[k]
    inner["w"] = np.zeros(1)
    with pytest.raises(torchfree.LimitError, match="characters"):
        torchfree.flatten(obj)
    for _ in range(250):  # the last 50 levels are fine
        obj = obj[k]
    (name,) = torchfree.flatten(obj)
    assert name == ".".join([k] * 50 + ["w"])


def deep_pickle(depth):
    """A pickle of lists nested `depth` deep around an int, built through the memo: each list is
    made, filled and popped, so the VM stack and its MARKs never grow."""
    out = bytearray(b"\x80\x02]r" + (0).to_bytes(4, "little") + b"K\x01a0")
    for i in range(1, depth):
        out += b"]r" + i.to_bytes(4, "little") + b"j" + (i - 1).to_bytes(4, "little") + b"a0"
    out += b"j" + (depth - 1).to_bytes(4, "little") + b"."
    return bytes(out)


def test_deep_pickle_scan_raises_limit_error():
    # the VM builds it (no MARK is ever open); the walk refuses it
    data = _zip({"archive/data.pkl": deep_pickle(30_000), "archive/version": b"3\n"})
    obj = torchfree.load(data, weights_only=False)
    assert isinstance(obj, list)
    with pytest.raises(torchfree.LimitError):
        torchfree.scan(data)
    # open() walks on first use: a look-up or the names
    with torchfree.open(data) as ck:
        with pytest.raises(torchfree.LimitError):
            ck["0"]
        with pytest.raises(torchfree.LimitError):
            list(ck.keys())
    with pytest.raises(torchfree.LimitError):
        torchfree.flatten(obj)
    # a lower marks limit lowers the depth the walk accepts
    shallow = _zip({"archive/data.pkl": deep_pickle(40), "archive/version": b"3\n"})
    assert torchfree.scan(shallow).tensors == []
    with pytest.raises(torchfree.LimitError):
        torchfree.scan(shallow, limits={"marks": 20})


def _zip(records):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in records.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


def test_walk_index_and_infos_modes():
    a = np.arange(6, dtype="f4").reshape(2, 3)
    m = torchfree.MetaArray((4,), np.dtype("f2"))
    at = a.T
    obj = {"a": a, "b": [at, m], "c": a}
    idx = _core.walk(obj, _scan._INDEX, ".", _scan._children, True)
    assert list(idx) == ["a", "b.0", "b.1", "c"] and idx["b.0"] is at and idx["c"] is a
    infos = _scan._tensor_infos(obj)
    assert [t.name for t in infos] == ["a", "b.0", "b.1", "c"]
    t = infos[1]
    assert (t.shape, t.strides, t.stride, t.nbytes, t.location, t.storage_key) == ((3, 2), (4, 12), (1, 3), 24,
                                                                                   "pickle", None)
    assert infos[2].location == "meta" and infos[2].nbytes == 8 and infos[2].stride == (1,)


def test_tensor_info_api():
    t = TensorInfo("w", np.dtype("f4"), (2, 3), (12, 4), (3, 1), "0", 0, 24, "cpu", "float32")
    assert (t.conj, t.neg, t.numel) == (False, False, 6)
    t2 = TensorInfo(name="w", dtype=np.dtype("f4"), shape=(2, 3), strides=(12, 4), stride=(3, 1), storage_key="0",
                    storage_offset=0, nbytes=24, location="cpu", torch_dtype="float32", conj=False, neg=False)
    assert t == t2 and hash(t) == hash(t2) and t != TensorInfo(*t._astuple()[:-1], True)
    assert repr(t).startswith("TensorInfo(name='w', dtype=dtype('float32'), shape=(2, 3)")
    assert pickle.loads(pickle.dumps(t)) == t and copy.deepcopy(t) == t
    assert t._asdict()["stride"] == (3, 1)
    with pytest.raises(AttributeError):
        t.name = "x"
    with pytest.raises(TypeError):
        TensorInfo("w")
    r = RecordInfo("data.pkl", False, 3, 3, 0)
    s = StorageInfo("0", np.dtype("f4"), 4, "cpu", "a/data/0")
    assert r.size == 3 and s.record == "a/data/0" and repr(s).startswith("StorageInfo(key='0'")


def test_scan_info_objects_from_c(tmp_path):
    arr = {"x": np.arange(12, dtype="f4").reshape(3, 4), "y": np.arange(5, dtype="i8")}
    p = tmp_path / "a.pt"
    torchfree.save(arr, p)
    info = torchfree.scan(p)
    x, y = info.tensors
    assert type(x) is TensorInfo
    assert (x.name, x.shape, x.stride, x.strides, x.nbytes, x.numel, x.torch_dtype) == (
        "x", (3, 4), (4, 1), (16, 4), 48, 12, "float32")
    assert x.shape is x.shape  # made once
    assert x == TensorInfo(*x._astuple()) and hash(x) == hash(TensorInfo(*x._astuple()))
    assert pickle.loads(pickle.dumps(x)) == x
    assert "data.pkl" in [r.name for r in info.records]
    with zipfile.ZipFile(p) as z:
        zi = {i.filename.split("/", 1)[1]: i for i in z.infolist()}
    for r in info.records:
        assert (r.size, r.compressed_size, r.offset) == (zi[r.name].file_size, zi[r.name].compress_size,
                                                         zi[r.name].header_offset)
    assert [s.key for s in info.storages] == [x.storage_key, y.storage_key]
    assert info.storages[0].record.endswith("/data/" + x.storage_key)
    d = info.to_dict()
    assert d["records"][0]["name"] == info.records[0].name and d["storages"][1]["dtype"] == "int64"
    fresh = torchfree.scan(p)  # records and storages not listed yet
    assert pickle.loads(pickle.dumps(fresh)) == fresh == copy.deepcopy(torchfree.scan(p))
    info.records = info.records + [RecordInfo("extra", False, 0, 0, 0)]
    assert info.records[-1].name == "extra"


def test_scan_against_torch(torch, tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    c64 = torch.randn(3, 2, dtype=torch.complex64)
    obj = {
        "model": {"w": base, "wt": base.t(), "row": base[2], "col": base[:, 3], "empty": base[:0], "scalar": base[1, 1]},
        "other": [torch.arange(5, dtype=torch.int16), torch.ones(2, 2, dtype=torch.bfloat16),
                  torch.zeros(3, dtype=torch.bool), c64.conj(), torch.randn(3, dtype=torch.float64).neg()._neg_view()],
        "half": torch.randn(2, 6, dtype=torch.float16).view(torch.complex32),
        "expanded": torch.ones(1, 3).expand(4, 3),
    }
    p = tmp_path / "t.pt"
    torch.save(obj, p)
    info = torchfree.scan(p)
    flat = {}

    def walk(o, name):
        if isinstance(o, torch.Tensor):
            flat[name] = o
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(obj, "")
    assert [t.name for t in info.tensors] == list(flat)
    keys = {}
    for t in info.tensors:
        ref = flat[t.name]
        np_item = 8 if ref.dtype == torch.complex32 else ref.element_size()
        assert t.shape == tuple(ref.shape)
        assert t.stride == ref.stride()
        assert t.strides == tuple(s * np_item for s in ref.stride())
        assert t.storage_offset == ref.storage_offset()
        assert t.torch_dtype == str(ref.dtype).removeprefix("torch.")
        assert t.numel == ref.numel() and t.nbytes == ref.numel() * np_item
        assert (t.conj, t.neg) == (ref.is_conj(), ref.is_neg())
        assert t.location == "cpu"
        keys.setdefault(t.storage_key, set()).add(ref.untyped_storage().data_ptr())
    # tensors share a storage key exactly when torch shares their storage
    assert all(len(v) == 1 for v in keys.values())
    assert len(keys) == len({r.untyped_storage().data_ptr() for r in flat.values()})
    by_key = {s.key: s for s in info.storages}
    for t in info.tensors:
        assert by_key[t.storage_key].nbytes == flat[t.name].untyped_storage().nbytes()
    with torchfree.open(p) as ck:
        assert list(ck.keys()) == list(flat)
        np.testing.assert_array_equal(ck["model.wt"], flat["model.wt"].numpy())


def test_path_sources_close_their_descriptor(tmp_path):
    import gc
    import os

    # this process's open descriptors: /proc/self/fd on Linux, /dev/fd (fdescfs) on macOS and
    # the BSDs (it lists the one os.listdir opens too, both times alike)
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    if not os.path.isdir(fd_dir):
        pytest.skip("no /proc/self/fd or /dev/fd to count open descriptors")
    p = tmp_path / "a.pt"
    torchfree.save({"w": np.arange(3, dtype="f4")}, p)
    fds = len(os.listdir(fd_dir))
    for _ in range(20):
        torchfree.scan(p)
        with torchfree.open(p, mmap=False) as ck:
            ck["w"]
        ck = torchfree.open(p, mmap=False)  # never closed: the descriptor goes with the object
        np.testing.assert_array_equal(ck["w"], np.arange(3, dtype="f4"))
        del ck
    gc.collect()
    assert len(os.listdir(fd_dir)) == fds
    with pytest.raises(IsADirectoryError):
        torchfree.scan(tmp_path)
    with pytest.raises(IsADirectoryError):
        torchfree.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        torchfree.open(tmp_path / "missing.pt")
