"""Issue 19, items 1, 4 and 11.

* 1: a load in a process where numpy's C API cannot be imported raises cleanly (the Loader on the
  C stack is closed before it is opened: it must start zeroed), for a zip and a legacy stream.
* 4: legacy streams written with pickle protocol 0 or 1 (their magic number is a text ``LONG``)
  load as torch loads them; protocol 0's text persistent ids, which torch refuses too, are refused.
* 11: save errors name the user's path (never the hidden temporary file), say when the parent
  folder is missing (``torchfree.torch.save`` raising exactly what ``torch.save`` raises), point
  to ``atomic=False`` when only the folder is not writable, and to ``torchfree.torch.save`` when
  a torch object is given to ``torchfree.save``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest

import torchfree
from conftest import assert_same, run_fresh

# ---- item 1 -----------------------------------------------------------------------------------


def test_load_without_numpy_c_api_raises_cleanly(tmp_path):
    a = np.arange(6, dtype=np.float32)
    torchfree.save({"a": a}, tmp_path / "zip.pt")
    torchfree.save({"a": a}, tmp_path / "legacy.pt", format="legacy")
    # a fresh process where numpy cannot be imported (so neither can its C API); the child must
    # exit 0 (run_fresh asserts it): a segfault in loader_close fails the test, not the session
    out = run_fresh("""
        import sys
        sys.modules["numpy"] = None  # `import numpy` (and numpy._core.multiarray) raises ImportError
        import torchfree
        for p in sys.argv[1:]:
            for kw in ({}, {"mmap": False}):
                try:
                    torchfree.load(p, **kw)
                except ImportError as e:
                    print("ImportError")
                else:
                    print("loaded")
        """, tmp_path / "zip.pt", tmp_path / "legacy.pt")
    assert out.splitlines() == ["ImportError"] * 4


# ---- item 4 -----------------------------------------------------------------------------------


def _torch_legacy(torch, obj, protocol):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, buf, pickle_protocol=protocol, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _tensors(torch):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {"w": base, "wt": base.t(), "row": base[1], "col": base[:, 2],
            "i": torch.arange(5, dtype=torch.int64), "h": torch.linspace(0, 1, 7).half(),
            "b": torch.tensor([True, False, True]), "bf": torch.arange(3, dtype=torch.bfloat16),
            "c": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64), "u8": torch.arange(4, dtype=torch.uint8),
            "meta": {"epoch": 3, "lr": 0.5, "name": "run", "big": 2**70, "t": (1, [2.5, None], b"x")}}


@pytest.mark.needs_torch
@pytest.mark.parametrize("protocol", [1, 2])
def test_legacy_protocol_1_and_2_load_as_torch(torch, tmp_path, protocol):
    data = _torch_legacy(torch, _tensors(torch), protocol)
    if protocol == 1:
        assert data.startswith(b"L119547037146038801333356L\n.")
    path = tmp_path / "p.pt"
    path.write_bytes(data)
    # torch's weights-only unpickler knows no protocol-1 opcode (the magic number's LONG): it
    # refuses the file, which torch.load(weights_only=False) reads; torchfree runs no code either way
    if protocol == 1:
        with pytest.raises(Exception, match="Unsupported operand 76"):
            torch.load(path, weights_only=True)
    expected = torch.load(path, weights_only=False)
    for wo in (True, False):
        assert_same(torchfree.load(path, weights_only=wo), expected)
        assert_same(torchfree.load(path, weights_only=wo, mmap=False), expected)
        assert_same(torchfree.load(data, weights_only=wo), expected)
        assert_same(torchfree.load(io.BytesIO(data), weights_only=wo), expected)
    info = torchfree.scan(path)
    assert info.format == "legacy"
    got = {t.name: (t.torch_dtype, t.shape, t.stride, t.storage_offset) for t in info.tensors}
    want = {}
    for k, t in _tensors(torch).items():
        if k != "meta":
            want[k] = (str(t.dtype).removeprefix("torch."), tuple(t.shape), tuple(t.stride()), t.storage_offset())
    assert got == want
    assert len({t.storage_key for t in info.tensors if t.name in ("w", "wt", "row", "col")}) == 1


@pytest.mark.needs_torch
def test_legacy_protocol_0_without_tensors_loads_as_torch(torch, tmp_path):
    obj = {"epoch": 3, "lr": 0.5, "name": "run", "big": -(2**70), "t": (1, [2.5, None], True), "d": {1: "x"}}
    data = _torch_legacy(torch, obj, 0)
    assert data.startswith(b"L119547037146038801333356L\n.I1001\n.")
    path = tmp_path / "p0.pt"
    path.write_bytes(data)
    with pytest.raises(Exception, match="Unsupported operand 76"):
        torch.load(path, weights_only=True)
    expected = torch.load(path, weights_only=False)
    assert expected == obj
    for wo in (True, False):
        assert_same(torchfree.load(path, weights_only=wo), expected)
        assert_same(torchfree.load(data, weights_only=wo), expected)
    info = torchfree.scan(path)
    assert (info.format, info.tensors) == ("legacy", [])


@pytest.mark.needs_torch
def test_legacy_protocol_0_with_tensors_is_refused_as_torch_refuses_it(torch, tmp_path):
    # protocol 0 pickles the persistent id as text (PERSID of the tuple's repr): torch's loader
    # cannot read it back either (weights_only: UnpicklingError; else AssertionError)
    path = tmp_path / "p0t.pt"
    path.write_bytes(_torch_legacy(torch, {"w": torch.arange(3.0)}, 0))
    with pytest.raises(Exception):
        torch.load(path)
    with pytest.raises(torchfree.UnpicklingError, match="PERSID"):
        torchfree.load(path)


def test_legacy_stream_of_another_int_is_still_refused(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"L119547037146038801333357L\n.")  # one more than the magic number
    with pytest.raises(torchfree.FormatError, match="not a torch checkpoint"):
        torchfree.load(path)
    path.write_bytes(b"L12L\n.")
    with pytest.raises(torchfree.FormatError, match="not a torch checkpoint"):
        torchfree.load(path)


# ---- item 11 ----------------------------------------------------------------------------------


def _no_temp_left(d):
    return [n for n in os.listdir(d) if n.startswith(".")] == []


@pytest.mark.parametrize("atomic", [True, False])
def test_save_missing_parent_says_so(tmp_path, atomic, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for target in ("nodir/x.pt", str(tmp_path / "nodir" / "sub" / "x.pt")):
        with pytest.raises(FileNotFoundError) as ei:
            torchfree.save({"a": np.zeros(2)}, target, atomic=atomic)
        parent = target.rpartition("/")[0]
        assert ei.value.filename == target
        assert f"Parent directory {parent} does not exist" in str(ei.value)
        assert ".tmp" not in str(ei.value)
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="Parent directory afile does not exist"):
        torchfree.save({"a": np.zeros(2)}, "afile/x.pt", atomic=atomic)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_safetensors_save_file_missing_parent_says_so(tmp_path, monkeypatch):
    from torchfree import safetensors

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as ei:
        safetensors.save_file({"a": np.zeros(2)}, "nodir/x.safetensors")
    assert ei.value.filename == "nodir/x.safetensors"
    assert "Parent directory nodir does not exist" in str(ei.value)


def _outcome(fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - compared with torch's
        return type(e), str(e), getattr(e, "filename", None)
    return None


@pytest.mark.needs_torch
def test_torch_save_missing_parent_raises_what_torch_raises(torch, tmp_path, monkeypatch):
    import pathlib

    import torchfree.torch as tft

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_bytes(b"")
    obj = {"w": torch.arange(3.0), "n": 1}
    for target in ("nodir/x.pt", "nodir/sub/x.pt", "nodir//x.pt", "./nodir/x.pt", "afile/x.pt",
                   str(tmp_path / "nodir" / "x.pt"), pathlib.Path("nodir/x.pt"), "nödir/x.pt"):
        for use_zip in (True, False):
            want = _outcome(lambda: torch.save(obj, target, _use_new_zipfile_serialization=use_zip))
            got = _outcome(lambda: tft.save(obj, target, _use_new_zipfile_serialization=use_zip))
            assert want is not None
            assert got == want, (target, use_zip)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_save_errors_name_the_path_not_the_temporary_file(tmp_path):
    # a folder where a file of the target's name is: the temporary file is made, the rename fails
    target = tmp_path / "x.pt"
    target.mkdir()
    (target / "keep").write_bytes(b"")
    with pytest.raises(OSError) as ei:
        torchfree.save({"a": np.zeros(2)}, target)
    assert ei.value.filename == str(target)
    assert ".tmp" not in str(ei.value) and getattr(ei.value, "filename2", None) is None
    assert _no_temp_left(tmp_path)


def _immutable(d):
    """Make folder d immutable (chattr +i: no entry can be made in it, even by root); None where
    that is not possible here."""
    if shutil.which("chattr") is None:
        return None
    r = subprocess.run(["chattr", "+i", str(d)], capture_output=True)
    return None if r.returncode else True


@contextlib.contextmanager
def _unwritable_folder(d):
    if os.geteuid() != 0:
        os.chmod(d, 0o555)
        try:
            yield
        finally:
            os.chmod(d, 0o755)
        return
    if _immutable(d) is None:
        pytest.skip("running as root without chattr +i: no folder is unwritable here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


def test_save_over_writable_file_in_unwritable_folder_names_atomic_false(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    target = d / "x.pt"
    torchfree.save({"a": np.zeros(2)}, target)
    old = target.read_bytes()
    with _unwritable_folder(d):
        with pytest.raises(OSError) as ei:
            torchfree.save({"a": np.ones(3)}, target)
        assert ei.value.errno in (errno.EACCES, errno.EPERM)
        assert ei.value.filename == str(target)
        assert "atomic=False" in str(ei.value) and ".tmp" not in str(ei.value)
        assert target.read_bytes() == old
        # the way out it names works
        torchfree.save({"a": np.ones(3)}, target, atomic=False)
        assert os.listdir(d) == ["x.pt"]
    np.testing.assert_array_equal(torchfree.load(target)["a"], np.ones(3))


def test_save_new_file_in_unwritable_folder_does_not_name_atomic_false(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    with _unwritable_folder(d):
        with pytest.raises(OSError) as ei:
            torchfree.save({"a": np.zeros(2)}, d / "new.pt")
        assert ei.value.filename == str(d / "new.pt")
        assert "atomic=False" not in str(ei.value) and ".tmp" not in str(ei.value)


@pytest.mark.needs_torch
def test_torch_objects_given_to_save_point_to_torchfree_torch_save(torch, tmp_path):
    for obj in ({"w": torch.zeros(2)}, [torch.nn.Parameter(torch.zeros(2))], {"s": torch.Size([2])}):
        with pytest.raises(TypeError, match=r"torchfree\.torch\.save") as ei:
            torchfree.save(obj, tmp_path / "x.pt")
        assert "key path" in str(ei.value)
    assert os.listdir(tmp_path) == []
    # a numpy-only object is unaffected
    with pytest.raises(TypeError) as ei:
        torchfree.save({"o": object()}, tmp_path / "x.pt")
    assert "torchfree.torch.save" not in str(ei.value)
