"""ml_dtypes (bfloat16, float8_*) is imported the first time a load or a save needs it, not by
``import torchfree``. Each case runs in a fresh process, so that the first need is the one tested:
the results must be what they are once ml_dtypes is loaded (numpy dtypes, never torch names)."""


import ml_dtypes
import numpy as np
import pytest

import torchfree
from conftest import run_fresh

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ml")
    bf = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    f8 = np.linspace(-2, 2, 5, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)
    torchfree.save({"bf": bf, "f8": f8, "x": np.ones(3, np.float32)}, d / "ml.pt")
    # a dtype object in the pickle itself (a `torch bfloat16` GLOBAL, no storage of that type)
    torchfree.save({"dt": np.dtype(ml_dtypes.bfloat16), "x": np.ones(2, np.int64)}, d / "dtype_only.pt")
    torchfree.save({"x": np.ones(2, np.float32)}, d / "plain.pt")
    # bfloat16 has a storage class (torch.BFloat16Storage, as torch writes it); float8 tensors name
    # their dtype in a GLOBAL (_rebuild_tensor_v3), which imports ml_dtypes as any dtype GLOBAL does
    torchfree.save({"bf": bf, "x": np.ones(3, np.float32)}, d / "bf16.pt")
    torchfree.save({"bf": bf}, d / "legacy.pt", format="legacy")
    return d, bf, f8


def test_import_does_not_import_ml_dtypes():
    assert run_fresh("import sys, torchfree; print('ml_dtypes' in sys.modules)") == "False"


def test_a_plain_file_never_imports_it(files):
    d, _, _ = files
    out = run_fresh("""
        import sys, torchfree
        sd = torchfree.load(sys.argv[1]); torchfree.scan(sys.argv[1])
        print(sd["x"].dtype, 'ml_dtypes' in sys.modules)""", d / "plain.pt")
    assert out == "float32 False"


@pytest.mark.parametrize("how", ["load", "load_copy", "scan", "open", "legacy"])
def test_first_need_is_a_file(files, how):
    d, bf, f8 = files
    out = run_fresh("""
        import sys, numpy as np, torchfree
        how, path = sys.argv[1], sys.argv[2]
        if how == "load":
            sd = torchfree.load(path)
        elif how == "load_copy":
            sd = torchfree.load(path, mmap=False)
        elif how == "legacy":
            sd = torchfree.load(path)
        elif how == "open":
            with torchfree.open(path) as ck:
                sd = {k: ck[k] for k in ck.keys()}
        else:
            info = torchfree.scan(path)
            print(" ".join(f"{t.name}={t.dtype!r}" for t in info.tensors))
            sys.exit(0)
        import ml_dtypes
        for k, v in sorted(sd.items()):
            print(k, type(v.dtype).__name__, v.dtype, v.tobytes().hex())
        """, how, d / ("legacy.pt" if how == "legacy" else "ml.pt"))
    if how == "scan":
        assert out == "bf=dtype(bfloat16) f8=dtype(float8_e4m3fn) x=dtype('float32')"
        return
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["bf"].split()[1] == "bfloat16" and lines["bf"].split()[2] == bf.tobytes().hex()
    assert type(bf.dtype).__name__ == lines["bf"].split()[0]
    if how != "legacy":
        assert lines["f8"].split()[1:] == ["float8_e4m3fn", f8.tobytes().hex()]


def test_first_need_is_a_dtype_global(files):
    d, _, _ = files
    out = run_fresh("""
        import sys, torchfree
        sd = torchfree.load(sys.argv[1])
        print(repr(sd["dt"]))""", d / "dtype_only.pt")
    assert out == "dtype(bfloat16)"


def test_first_need_is_a_save(tmp_path, files):
    _, bf, _ = files
    path = tmp_path / "s.pt"
    run_fresh("""
        import sys, numpy as np, ml_dtypes, torchfree
        a = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)
        torchfree.save({"bf": a}, sys.argv[1])""", path)
    got = torchfree.load(path)["bf"]
    assert got.dtype == ml_dtypes.bfloat16 and got.tobytes() == np.arange(6, dtype=np.float32).astype(
        ml_dtypes.bfloat16).tobytes()


def test_scan_and_info_list_bf16_without_importing_it(files):
    """scan() of a bfloat16 file reports torch's dtype names without ml_dtypes; a TensorInfo's or
    StorageInfo's numpy dtype imports it on first access, and is then the ml_dtypes dtype."""
    d, _, _ = files
    out = run_fresh("""
        import sys, torchfree
        info = torchfree.scan(sys.argv[1])
        text = str(info)
        before = 'ml_dtypes' in sys.modules
        print(before, [(t.name, t.torch_dtype, t.nbytes, t.strides) for t in info.tensors])
        print(info.dtype_totals)
        print('bfloat16' in text, 'float8_e4m3fn' in text, 'ml_dtypes' in sys.modules)
        print(repr(info.tensors[0].dtype), repr(info.storages[0].dtype), 'ml_dtypes' in sys.modules)
        """, d / "bf16.pt")
    lines = out.splitlines()
    assert lines[0] == "False [('bf', 'bfloat16', 12, (6, 2)), ('x', 'float32', 12, (4,))]"
    assert lines[1] == "{'bfloat16': 12, 'float32': 12}"
    assert lines[2] == "True False False"
    assert lines[3] == "dtype(bfloat16) dtype(bfloat16) True"
    cli = run_fresh("""
        import sys
        from torchfree.cli import main
        main(["info", sys.argv[1]])
        print('ml_dtypes' in sys.modules)""", d / "bf16.pt")
    assert cli.splitlines()[-1] == "False" and "bfloat16" in cli


def test_open_after_scan_gets_ml_dtypes_arrays(files):
    """A lazy archive (open) whose storage classes did not import ml_dtypes imports it at its
    first such array."""
    d, bf, f8 = files
    out = run_fresh("""
        import sys, torchfree
        with torchfree.open(sys.argv[1]) as ck:
            print('ml_dtypes' in sys.modules)
            a = ck["bf"]
            print(a.dtype, a.tobytes().hex(), 'ml_dtypes' in sys.modules)
        """, d / "bf16.pt")
    lines = out.splitlines()
    assert lines == ["False", f"bfloat16 {bf.tobytes().hex()} True"]
