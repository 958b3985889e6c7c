"""numpy is imported the first time torchfree makes or meets an array, not by ``import torchfree``:
``torchfree info`` and ``scan`` of a zip checkpoint run without it. Each case runs in a fresh
process that has not imported numpy, so that the first need is the one tested; its results must
be exactly what they are in this process, where numpy was loaded from the start."""

import json
import textwrap

import numpy as np
import pytest

import torchfree
from conftest import require_torch, run_fresh

# what a child prints of each array: enough to be compared bit for bit with this process's
SHOW = """
def show(name, a):
    print(name, type(a).__name__, a.dtype, a.shape, a.strides, a.tobytes().hex())
"""


def _run(code, *args):
    return run_fresh(SHOW + textwrap.dedent(code), *args).splitlines()


def _show(name, a):
    return f"{name} {type(a).__name__} {a.dtype} {a.shape} {a.strides} {a.tobytes().hex()}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("np")
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    sd = {"w": base, "wt": base.T, "row": base[1], "i": np.arange(5, dtype=np.int64), "b": np.array([True, False]),
          "h": np.linspace(0, 1, 7).astype(np.float16), "epoch": 3}
    torchfree.save(sd, d / "zip.pt")
    torchfree.save(sd, d / "legacy.pt", format="legacy")
    torchfree.save({"m": torchfree.MetaArray((2, 3), np.dtype(np.float32)), "x": base}, d / "meta.pt")
    torchfree.save({"dt": np.dtype(np.int16), "x": base}, d / "dtype.pt")
    return d, sd


def test_import_does_not_import_numpy():
    out = _run("""
        import sys, torchfree, torchfree.cli
        print('numpy' in sys.modules, 'ml_dtypes' in sys.modules, 're' in sys.modules, 'pickle' in sys.modules)""")
    assert out == ["False False False False"]


def test_info_of_a_zip_checkpoint_runs_without_numpy(files):
    d, _ = files
    path = d / "zip.pt"
    out = _run("""
        import sys
        from torchfree.cli import main
        main(["info", sys.argv[1]])
        print('numpy' in sys.modules)""", path)
    assert out[-1] == "False"
    assert "\n".join(out[:-1]) == str(torchfree.scan(path))
    # scan's names, shapes, strides, offsets and sizes need no numpy either
    out = _run("""
        import sys, torchfree
        info = torchfree.scan(sys.argv[1])
        print([(t.name, t.torch_dtype, t.shape, t.strides, t.stride, t.storage_offset, t.nbytes) for t in info.tensors])
        print(info.total_bytes, info.param_count, info.dtype_totals, 'numpy' in sys.modules)""", path)
    info = torchfree.scan(path)
    assert out[0] == repr([(t.name, t.torch_dtype, t.shape, t.strides, t.stride, t.storage_offset, t.nbytes)
                           for t in info.tensors])
    assert out[1] == f"{info.total_bytes} {info.param_count} {info.dtype_totals} False"


def test_scan_dtypes_import_numpy_on_first_access(files):
    d, _ = files
    path = d / "zip.pt"
    out = _run("""
        import sys, torchfree
        info = torchfree.scan(sys.argv[1])
        print('numpy' in sys.modules)
        t = info.tensors[0]
        print(repr(t.dtype), type(t.dtype).__module__.split(".")[0], "numpy" in sys.modules)
        print([repr(s.dtype) for s in info.storages], [repr(t.dtype) for t in info.tensors])
        print(info.to_json())""", path)
    info = torchfree.scan(path)
    assert out[0] == "False"
    assert out[1] == f"{info.tensors[0].dtype!r} numpy True"
    assert out[2] == f"{[repr(s.dtype) for s in info.storages]} {[repr(t.dtype) for t in info.tensors]}"
    assert json.loads(out[3]) == json.loads(info.to_json())


@pytest.mark.parametrize("how", ["load", "load_copy", "legacy", "open", "open_copy", "storage_numpy"])
def test_first_need_is_a_load(files, how):
    d, sd = files
    out = _run("""
        import sys, torchfree
        how, path = sys.argv[1], sys.argv[2]
        if how == "storage_numpy":
            with torchfree.open(path) as ck:
                for s in ck.storages:
                    show(s.key, ck.read_storage(s).numpy())
            sys.exit(0)
        if how in ("open", "open_copy"):
            with torchfree.open(path, mmap=how == "open") as ck:
                sd = {k: ck[k] for k in ck.keys()}
        else:
            sd = torchfree.load(path, mmap={"load": True, "load_copy": False}.get(how))
        for k in sorted(sd):
            if k != "epoch":
                show(k, sd[k])
        print(sd.get("epoch", 3))""", how, d / ("legacy.pt" if how == "legacy" else "zip.pt"))
    if how == "storage_numpy":
        with torchfree.open(d / "zip.pt") as ck:
            assert out == [_show(s.key, ck.read_storage(s).numpy()) for s in ck.storages]
        return
    assert out == [_show(k, sd[k]) for k in sorted(sd) if k != "epoch"] + ["3"]


def test_first_need_is_a_save(tmp_path, files):
    _, sd = files
    path = tmp_path / "s.pt"
    _run("""
        import sys, torchfree
        import numpy as np  # the user's arrays: numpy is imported, torchfree's C side has not used it yet
        base = np.arange(24, dtype=np.float32).reshape(4, 6)
        torchfree.save({"w": base, "wt": base.T, "i": np.arange(5, dtype=np.int64)}, sys.argv[1])""", path)
    got = torchfree.load(path)
    assert [_show(k, got[k]) for k in ("w", "wt", "i")] == [_show(k, sd[k]) for k in ("w", "wt", "i")]


def test_first_need_is_flatten_of_the_users_arrays():
    """flatten() of arrays numpy made before torchfree's core ever used numpy: they are leaves."""
    out = _run("""
        import torchfree
        import numpy as np
        flat = torchfree.flatten({"a": {"b": np.ones(2), "c": [np.zeros(3, np.int8), 5]}, "d": "text"})
        print(list(flat), [str(v.dtype) for v in flat.values()])""")
    assert out == ["['a.b', 'a.c.0'] ['float64', 'int8']"]


@pytest.mark.parametrize("name", ["meta.pt", "dtype.pt"])
def test_scan_of_a_file_that_needs_numpy_dtypes(files, name):
    """A meta tensor or a dtype value in the pickle needs numpy's dtype during the scan itself."""
    d, _ = files
    path = d / name
    out = _run("""
        import sys, torchfree
        info = torchfree.scan(sys.argv[1])
        print([(t.name, repr(t.dtype), t.shape, t.location) for t in info.tensors])
        sd = torchfree.load(sys.argv[1])
        print(sorted((k, (str(v.dtype), v.shape) if type(v).__name__ == "ndarray" else repr(v)) for k, v in sd.items()))""",
               path)
    info = torchfree.scan(path)
    sd = torchfree.load(path)
    assert out[0] == repr([(t.name, repr(t.dtype), t.shape, t.location) for t in info.tensors])
    assert out[1] == repr(sorted((k, (str(v.dtype), v.shape) if type(v).__name__ == "ndarray" else repr(v))
                                 for k, v in sd.items()))


def test_scan_of_numpy_objects_in_the_pickle(tmp_path):
    """A numpy array pickled inside a checkpoint (torch.save of a dict holding one) is rebuilt by
    numpy's own reduce during the scan: the walk must see it as an array, though torchfree's core
    had not imported numpy when the scan began."""
    torch = require_torch()
    path = tmp_path / "np_inside.pt"
    torch.save({"t": torch.arange(4, dtype=torch.float32), "n": np.arange(6, dtype=np.int32).reshape(2, 3)}, path)
    out = _run("""
        import sys, torchfree
        info = torchfree.scan(sys.argv[1])
        print([(t.name, repr(t.dtype), t.shape, t.location) for t in info.tensors])
        sd = torchfree.load(sys.argv[1], weights_only=False)
        show("n", sd["n"]); show("t", sd["t"])""", path)
    info = torchfree.scan(path)
    sd = torchfree.load(path, weights_only=False)
    assert out[0] == repr([(t.name, repr(t.dtype), t.shape, t.location) for t in info.tensors])
    assert {t.name for t in info.tensors} == {"t", "n"}
    assert out[1:] == [_show("n", sd["n"]), _show("t", sd["t"])]
