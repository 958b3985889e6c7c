"""The VM's whole-tensor fast path (fastpath.c, tensor_fused): torch's per-tensor opcode
sequence, with torch's memoization (globals and strings put once, then memo GETs), is read
straight from the bytes. These torch-free tests build such pickles by hand and check that the
fast path gives what the opcode-by-opcode VM gives: the same arrays, the same sharing, the same
errors, and a correct result when the pickle later GETs a memo slot the fast path left empty."""

from __future__ import annotations

import collections
import struct

import numpy as np
import pytest

import torchfree
from test_core import P, PROTO2, archive, binint, glob, tensor_v2, unicode


def intop(i: int) -> bytes:
    """An int as pickle writes it (BININT1, BININT2, BININT, LONG1)."""
    if 0 <= i < 256:
        return b"K" + bytes([i])
    if 0 <= i < 65536:
        return b"M" + struct.pack("<H", i)
    return binint(i)


class TorchLike:
    """Writes tensors the way torch.save's pickler does: every global and str is put in the
    memo on first use and fetched with BINGET / LONG_BINGET afterwards."""

    def __init__(self, first_slot=0):
        self.n = first_slot
        self.slots = {}

    def put(self) -> bytes:
        i = self.n
        self.n += 1
        return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)

    @staticmethod
    def get(i: int) -> bytes:
        return b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)

    def memo(self, key, emit: bytes) -> bytes:
        if key in self.slots:
            return self.get(self.slots[key])
        self.slots[key] = self.n
        return emit + self.put()

    def s(self, text: str) -> bytes:
        return self.memo(("s", text), unicode(text))

    def g(self, module: str, name: str) -> bytes:
        return self.memo(("g", module, name), glob(module, name))

    def tup(self, xs) -> tuple[bytes, int | None]:
        """(bytes, memo slot or None) of a tuple of ints."""
        if not xs:
            return b")", None
        body = b"".join(intop(x) for x in xs)
        body = body + bytes([0x84 + len(xs)]) if len(xs) <= 3 else b"(" + body + b"t"
        slot = self.n
        return body + self.put(), slot

    def tensor(self, key, numel, offset, size, stride, storage="FloatStorage", location="cpu", key_op=None):
        """Returns (bytes, {'size': slot, 'stride': slot, 'hooks': slot, 'args': slot})."""
        out = [self.g("torch._utils", "_rebuild_tensor_v2"), b"((", self.s("storage"), self.g("torch", storage)]
        out.append(key_op if key_op is not None else self.s(key))
        out += [self.s(location), intop(numel), b"t", self.put(), b"Q", intop(offset)]
        slots = {}
        b, slots["size"] = self.tup(size)
        out.append(b)
        b, slots["stride"] = self.tup(stride)
        out += [b, b"\x89", self.g("collections", "OrderedDict"), b")R"]
        slots["hooks"] = self.n
        out += [self.put(), b"t"]
        slots["args"] = self.n
        out += [self.put(), b"R", self.put()]
        return b"".join(out), slots


F32 = np.arange(4096, dtype=np.float32)


def expected(rec: bytes, offset, size, stride, dtype=np.float32):
    item = np.dtype(dtype).itemsize
    base = np.frombuffer(rec, dtype=dtype)
    return np.lib.stride_tricks.as_strided(base[offset:] if base.size else base, shape=size,
                                           strides=[s * item for s in stride])


def dict_pickle(pairs: list[tuple[str, object]], w: TorchLike) -> bytes:
    """{name: value, ...} with one SETITEMS (the dict takes memo slot 0); a value is bytes or a
    function that makes them (called after its key is written, so that memo slots stay in order)."""
    items = []
    for k, v in pairs:
        kb = w.s(k)
        items.append(kb + (v() if callable(v) else v))
    return P(PROTO2, b"}", b"q\x00", b"(", *items, b"u.")


CASES = [  # key, offset, size, stride
    ("w", 0, (16, 8), (8, 1)),
    ("t", 3, (4, 5), (1, 4)),          # transposed view
    ("s", 7, (), ()),                  # 0-d
    ("v", 0, (10,), (1,)),
    ("b", 0, (2, 3, 4), (12, 4, 1)),
    ("five", 1, (2, 2, 2, 2, 3), (48, 24, 12, 6, 2)),  # MARK ... TUPLE
    ("big", 300, (70000,), (0,)),       # BININT2 / BININT sizes, broadcast stride
    ("e", 2**40, (0,), (1,)),          # empty: LONG1 offset, never dereferenced
]


def build_cases(first_slot=1):
    w = TorchLike(first_slot)
    pairs, records, exp = [], {}, {}
    for i, (name, off, size, stride) in enumerate(CASES):
        rec = F32.tobytes()
        pairs.append((name, lambda i=i, off=off, size=size, stride=stride:
                      w.tensor(str(i), F32.size, off, size, stride)[0]))
        records[str(i)] = rec
        exp[name] = expected(rec, off, size, stride) if 0 not in size else np.zeros(size, np.float32)
    return dict_pickle(pairs, w), records, exp


@pytest.mark.parametrize("how", ["bytes", "path-mmap", "path-copy", "scan"])
def test_fused_tensors_match(tmp_path, how):
    pk, records, exp = build_cases()
    data = archive(pk, records)
    if how == "bytes":
        got = torchfree.load(data)
    else:
        p = tmp_path / "c.pt"
        p.write_bytes(data)
        if how == "scan":
            infos = torchfree.scan(str(p))
            for name, (off, size, stride) in ((c[0], c[1:]) for c in CASES):
                assert infos[name].shape == size and infos[name].stride == stride
                assert infos[name].storage_offset == off
            with torchfree.open(str(p)) as ck:
                got = {k: ck[k] for k in exp}
        else:
            got = torchfree.load(str(p), mmap=how == "path-mmap")
    assert set(got) == set(exp)
    for k, v in exp.items():
        assert got[k].dtype == np.float32 and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
        if v.size > 1:
            assert got[k].strides == v.strides, k


def test_fused_shared_storage_and_dtypes():
    """A storage named again (its key a memo GET) is the same memory; typed storages keep
    their dtype; an untyped storage (UntypedStorage, uint8) too."""
    w = TorchLike(1)
    pk = dict_pickle([("a", lambda: w.tensor("0", 64, 0, (8, 8), (8, 1))[0]),
                      ("b", lambda: w.tensor("0", 64, 8, (8,), (1,))[0]),  # row 1: the key is a memo GET
                      ("c0", lambda: w.tensor("1", 16, 0, (4,), (1,), storage="DoubleStorage")[0]),
                      ("c", lambda: w.tensor("1", 16, 0, (4, 4), (4, 1), storage="DoubleStorage")[0]),
                      ("d0", lambda: w.tensor("2", 16, 0, (16,), (1,), storage="IntStorage")[0]),
                      ("d", lambda: w.tensor("2", 16, 0, (16,), (1,), storage="IntStorage")[0]),
                      ("u0", lambda: w.tensor("3", 16, 0, (16,), (1,), storage="UntypedStorage")[0]),
                      ("u", lambda: w.tensor("3", 16, 1, (3, 5), (5, 1), storage="UntypedStorage")[0])], w)
    f64 = np.arange(16, dtype=np.float64)
    i32 = np.arange(16, dtype=np.int32)
    u8 = np.arange(16, dtype=np.uint8)
    got = torchfree.load(archive(pk, {"0": F32[:64].tobytes(), "1": f64.tobytes(), "2": i32.tobytes(),
                                      "3": u8.tobytes()}))
    np.testing.assert_array_equal(got["b"], F32[8:16])
    assert np.shares_memory(got["a"], got["b"])
    got["a"][1, 0] = -1
    assert got["b"][0] == -1
    assert got["c"].dtype == np.float64 and np.array_equal(got["c"].ravel(), f64)
    assert got["d"].dtype == np.int32 and np.array_equal(got["d"], i32)
    assert got["u"].dtype == np.uint8 and np.array_equal(got["u"], u8[1:].reshape(3, 5))
    assert got["u"].base is got["u0"].base


@pytest.mark.parametrize("slot", ["size", "stride", "hooks", "args"])
def test_empty_slot_get_reruns(slot):
    """A later memo GET of a slot the fast path left empty: the VM runs the pickle again with
    every object made, and the GET sees the real object."""
    w = TorchLike(1)
    slots = {}

    def make():
        body, s = w.tensor("0", 12, 0, (3, 4), (4, 1))
        slots.update(s)
        return body

    want = {"size": (3, 4), "stride": (4, 1), "hooks": collections.OrderedDict()}
    pk = dict_pickle([("first", lambda: w.tensor("0", 12, 0, (12,), (1,))[0]), ("t", make),
                      ("again", lambda: w.get(slots[slot]))], w)
    got = torchfree.load(archive(pk, {"0": F32[:12].tobytes()}))
    np.testing.assert_array_equal(got["t"], F32[:12].reshape(3, 4))
    if slot == "args":
        a = got["again"]
        assert isinstance(a, tuple) and len(a) == 6 and a[1:4] == (0, (3, 4), (4, 1))
        assert a[0].key == "0" and a[4] is False and a[5] == collections.OrderedDict()
    else:
        assert got["again"] == want[slot] and type(got["again"]) is type(want[slot])


def test_get_of_a_slot_put_in_the_sequence():
    """The location is a GET of the slot the key was just put in: left to the VM."""
    w = TorchLike(1)
    head = P(w.g("torch._utils", "_rebuild_tensor_v2"), b"0", w.s("storage"), b"0",
             w.g("torch", "FloatStorage"), b"0", w.g("collections", "OrderedDict"), b"0")
    key_slot = w.n
    body = P(w.g("torch._utils", "_rebuild_tensor_v2"), b"((", w.s("storage"), w.g("torch", "FloatStorage"),
             unicode("cpu"), w.put(), w.get(key_slot), intop(12), b"t", w.put(), b"Q", intop(0), intop(12),
             b"\x85", w.put(), intop(1), b"\x85", w.put(), b"\x89", w.g("collections", "OrderedDict"), b")R",
             w.put(), b"t", w.put(), b"R", w.put())
    pk = P(PROTO2, b"}", b"q\x00", head, b"(", unicode("t"), body, b"u.")
    got = torchfree.load(archive(pk, {"cpu": F32[:12].tobytes()}))
    np.testing.assert_array_equal(got["t"], F32[:12])


def one(size=(3, 4), stride=(4, 1), offset=0, numel=12, storage="FloatStorage"):
    """(pickle, records): a first tensor that memoizes the globals and strs, then the one under test."""
    w = TorchLike(1)
    pk = dict_pickle([("first", lambda: w.tensor("9", 1, 0, (1,), (1,), storage=storage)[0]),
                      ("t", lambda: w.tensor("0", numel, offset, size, stride, storage=storage)[0])], w)
    first = np.zeros(1, np.float64 if storage == "DoubleStorage" else np.float32)
    return pk, {"9": first.tobytes(), "0": F32[:12].tobytes()}


@pytest.mark.parametrize("case,match", [
    (dict(offset=1), "past the end"),
    (dict(numel=2**62, storage="DoubleStorage"), "impossible numel"),
    (dict(numel=10**12), "has 48 bytes but"),
    (dict(size=(3, 4), stride=(4,)), "2 sizes but 1 strides"),
])
def test_fused_errors(case, match):
    pk, recs = one(**case)
    with pytest.raises(torchfree.FormatError, match=match) as ei:
        torchfree.load(archive(pk, recs))
    assert "byte offset" in str(ei.value)


def test_fused_errors_match_unfused():
    """The same bad tensor, fused (memoized globals) or not (GLOBAL every time), gives the same
    error type and message text up to the byte offset."""
    bad = [dict(offset=1), dict(numel=10**12), dict(size=(3, 4), stride=(4,))]
    for kw in bad:
        fused, recs = one(**kw)
        plain = P(PROTO2, b"}", b"(", unicode("t"),
                  tensor_v2("0", kw.get("numel", 12), kw.get("offset", 0), kw.get("size", (3, 4)),
                            kw.get("stride", (4, 1))), b"u.")
        errs = []
        for pk in (fused, plain):
            with pytest.raises(torchfree.CheckpointError) as ei:
                torchfree.load(archive(pk, recs))
            errs.append((type(ei.value), str(ei.value).split(" (")[0]))
        assert errs[0] == errs[1], kw


def test_fused_limits_and_fallbacks():
    # ndim over the limit: refused as by the VM
    pk, recs = one(size=(1, 3, 4), stride=(12, 4, 1))
    with pytest.raises(torchfree.LimitError, match="dimensions"):
        torchfree.load(archive(pk, recs), limits={"ndim": 2})
    # a negative stride (BININT < 0) is left to the VM, which refuses it
    w = TorchLike(1)
    pk = dict_pickle([("first", lambda: w.tensor("9", 1, 0, (1,), (1,))[0]),
                      ("t", lambda: w.tensor("0", 12, 0, (3,), (2,))[0])], w)
    pk = pk.replace(b"K\x02\x85", b"J" + struct.pack("<i", -1) + b"\x85", 1)  # stride (2,) -> (-1,)
    with pytest.raises(torchfree.FormatError, match="out of range"):
        torchfree.load(archive(pk, recs))
    # truncated in the middle of the sequence
    pk, recs = one()
    cut = pk[:pk.rindex(b"Q") + 3]
    with pytest.raises(torchfree.UnpicklingError, match="truncated"):
        torchfree.load(archive(cut, recs))
    # a tag other than 'storage'
    pk = pk.replace(b"((X\x07\x00\x00\x00storage", b"((X\x07\x00\x00\x00storagX")
    with pytest.raises(torchfree.UnpicklingError, match="persistent id"):
        torchfree.load(archive(pk, recs))


def test_fused_many_tensors_long_memo():
    """Past 256 memo slots (LONG_BINPUT / LONG_BINGET), with keys fetched by LONG_BINGET."""
    w = TorchLike(1)
    pairs, exp = [], {}
    for i in range(300):
        pairs.append((f"p{i}", lambda i=i: w.tensor(str(i % 7), 64, i % 50, (2, 3), (3, 1))[0]))
        exp[f"p{i}"] = F32[i % 50:i % 50 + 6].reshape(2, 3)
    recs = {str(k): F32[:64].tobytes() for k in range(7)}
    got = torchfree.load(archive(dict_pickle(pairs, w), recs))
    for k, v in exp.items():
        np.testing.assert_array_equal(got[k], v)
    assert got["p0"].base is got["p7"].base and got["p0"].base is not got["p1"].base  # storages 0, 0, 1
