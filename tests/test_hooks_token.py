"""The VM stands in a shared object for the empty backward_hooks OrderedDict of every
_rebuild_tensor_v2 call (src/fastpath.c, rebuild_v2_fused); a pickle that uses such a
hooks dict (or the argument tuple holding it) again must still load exactly as torch loads it."""

import collections
import pickle

import pytest

import torchfree
from conftest import assert_same


def _fake_tensor_class(torch):
    class FakeTensor:
        """Pickles as torch pickles a tensor, with hooks and argument tuple we choose."""

        def __init__(self, args):
            self.args = args

        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, self.args

    return FakeTensor


def _args(torch, t, hooks):
    st = torch.storage.TypedStorage(wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True)
    return (st, 0, tuple(t.shape), t.stride(), False, hooks)


def _objects(torch):
    F = _fake_tensor_class(torch)
    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.ones(4, dtype=torch.float64)
    h = collections.OrderedDict()
    shared = _args(torch, a, h)
    return {
        # the hooks dict made by the REDUCE of the first tensor, seen again afterwards
        "hooks_again": {"t": F(_args(torch, a, h)), "h": h},
        # the same argument tuple (holding the hooks dict) pickled twice: the second is a memo GET
        "args_again": {"t1": F(shared), "t2": F(shared), "b": F(_args(torch, b, collections.OrderedDict()))},
        # the argument tuple itself in the result
        "tuple_in_result": {"t": F(shared), "args": shared},
        # plain: the stand-in is used and never seen
        "plain": {"x": F(_args(torch, a, collections.OrderedDict())), "y": [F(_args(torch, b, collections.OrderedDict()))]},
    }


@pytest.mark.parametrize("case", ["hooks_again", "args_again", "tuple_in_result", "plain"])
@pytest.mark.parametrize("mmap", [True, False])
def test_backward_hooks_reused(torch, tmp_path, case, mmap):
    obj = _objects(torch)[case]
    path = tmp_path / "c.pt"
    torch.save(obj, path)
    want = torch.load(path, weights_only=True)
    got = torchfree.load(path, mmap=mmap)
    assert_same(got, want)
    if case == "hooks_again":
        assert type(got["h"]) is collections.OrderedDict and len(got["h"]) == 0
    if case == "tuple_in_result":
        args = got["args"]
        assert isinstance(args, tuple) and len(args) == 6
        assert type(args[5]) is collections.OrderedDict and len(args[5]) == 0
        assert type(want["args"][5]) is collections.OrderedDict
    # open() (lazy) and scan() run the same VM
    with torchfree.open(path) as ck:
        for k in ck.keys():
            assert_same(ck[k], _dotted(want, k))
    torchfree.scan(path)


def _dotted(obj, name):
    for part in name.split("."):
        obj = obj[int(part)] if isinstance(obj, (list, tuple)) else obj[part]
    return obj


def test_hooks_token_never_in_results(torch, tmp_path):
    """No object of the stand-in's type (a bare object()) ever reaches the user."""
    path = tmp_path / "all.pt"
    torch.save(_objects(torch), path)
    got = torchfree.load(path)
    stack = [got]
    while stack:
        o = stack.pop()
        assert type(o) is not object
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)


def test_hooks_pattern_without_rebuild_is_a_real_ordereddict(tmp_path):
    """An OrderedDict() followed by TUPLE, REDUCE of something else than _rebuild_tensor_v2 is made."""
    # (OrderedDict(), 1, 2, 3, 4, 5) as a plain tuple in data.pkl: no rebuild call below the MARK
    data = pickle.dumps([(1, 2, 3, 4, 5, collections.OrderedDict())], protocol=2)
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/version", "3\n")
    got = torchfree.load(buf.getvalue())
    assert got == [(1, 2, 3, 4, 5, collections.OrderedDict())]
    assert type(got[0][5]) is collections.OrderedDict


def _write_ckpt(torch, path, obj, storages):
    """A zip checkpoint whose data.pkl comes from our own Pickler: persistent ids are whatever
    persistent_id returns (the same tuple object for a storage seen again: a memo GET)."""
    import io
    import zipfile

    ids = {}

    class P(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, torch.storage.TypedStorage):
                key = id(o._untyped_storage)
                if key not in ids:
                    ids[key] = ("storage", torch.FloatStorage, str(len(ids)), "cpu", o.size())
                    storages.append(o)
                return ids[key]
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/version", "3\n")
        for i, st in enumerate(storages):
            z.writestr(f"archive/data/{i}", bytes(st._untyped_storage))


@pytest.mark.parametrize("mmap", [True, False])
def test_persistent_id_tuple_used_again(torch, tmp_path, mmap):
    """The second tensor of a storage names it by a memo GET of the first id tuple."""
    F = _fake_tensor_class(torch)
    base = torch.arange(12, dtype=torch.float32)
    st = torch.storage.TypedStorage(wrap_storage=base.untyped_storage(), dtype=torch.float32, _internal=True)
    obj = collections.OrderedDict(
        a=F((st, 0, (3, 4), (4, 1), False, collections.OrderedDict())),
        b=F((st, 4, (4,), (1,), False, collections.OrderedDict())),
        c=[F((st, 1, (2, 2), (1, 2), False, collections.OrderedDict()))])
    path = tmp_path / "pid.pt"
    _write_ckpt(torch, path, obj, [])
    import zipfile
    import pickletools

    ops = [op.name for op, _, _ in pickletools.genops(zipfile.ZipFile(path).read("archive/data.pkl"))]
    assert ops.count("BINPERSID") == 3 and ops.count("TUPLE") >= 4  # the id tuple is memoized once
    want = torch.load(path, weights_only=True)
    got = torchfree.load(path, mmap=mmap)
    assert_same(got, want)
    with torchfree.open(path) as ck:
        for k in ck.keys():
            assert_same(ck[k], _dotted(want, k))
