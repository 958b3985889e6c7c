"""Python-2-era pickles inside checkpoint zips: py2 ``str`` (SHORT_BINSTRING, BINSTRING, STRING)
decoded with ``encoding`` ("utf-8" default, "latin1", "bytes" keeps bytes), the Python 2 module
names (``__builtin__``, ``copy_reg``) and the py2 forms of builtins (bytearray from
``(unicode, 'latin-1')``, OrderedDict from a list of ``[key, value]`` lists).

The data.pkl pickles are written opcode by opcode, as Python 2.7's pickler (protocol 2) writes
them, and compared with torch 2.13's ``torch.load(..., encoding=...)``.

torch's zip reader builds record names from the persistent id's key as given, so under
``encoding="bytes"`` it cannot load a zip whose storage key is a py2 str (it looks for
``data/b'0'``); the legacy reader decodes such keys as ASCII. For the torch comparison under
"bytes" the persistent ids are therefore written as unicode (BINUNICODE); torchfree loads the
py2-str form too, and must give the same result.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile

import numpy as np
import pytest

import torchfree
from conftest import assert_same

WEIGHT = (np.arange(6, dtype=np.float32) - 2.5) * 0.75
ENCODINGS = ["utf-8", "latin1", "bytes"]


# ---------------------------------------------------------------------------------------------
# a Python 2.7-style protocol-2 pickle, opcode by opcode
# ---------------------------------------------------------------------------------------------

def S(b: bytes) -> bytes:
    """py2 str: SHORT_BINSTRING below 256 bytes, else BINSTRING (as py2's pickler chooses)."""
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b
    return b"T" + struct.pack("<i", len(b)) + b


def U(s: str) -> bytes:
    """py2 unicode: BINUNICODE."""
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def G(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def F(x: float) -> bytes:
    return b"G" + struct.pack(">d", x)


def I(n: int) -> bytes:  # noqa: E743 - pickle's own opcode letters
    return b"J" + struct.pack("<i", n)


def tensor(key_str, *, shape=(2, 3), stride=(3, 1), offset=0):
    """_rebuild_tensor_v2 of FloatStorage key '0' with 6 elements; the persistent id's strings
    ('storage', key, location) written with key_str (S for py2 str, U for unicode)."""
    pid = b"(" + key_str(b"storage" if key_str is S else "storage") + G("torch", "FloatStorage") \
        + key_str(b"0" if key_str is S else "0") + key_str(b"cpu" if key_str is S else "cpu") + b"K\x06tQ"
    return (G("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + I(offset)
            + b"(" + b"".join(I(s) for s in shape) + b"t" + b"(" + b"".join(I(s) for s in stride) + b"t"
            + b"\x89" + G("collections", "OrderedDict") + b")RtR")


def od(pairs):
    """py2.7 OrderedDict.__reduce__: OrderedDict([[k, v], ...])."""
    return (G("collections", "OrderedDict") + b"(]("
            + b"".join(b"](" + k + v + b"e" for k, v in pairs) + b"etR")


UTF8_TEXT = "caf\u00e9 \u00fcber \u4e2d ".encode("utf-8")
LATIN1_ONLY = b"\xe9t\xe9 \xff"  # not valid UTF-8


def content(pid=S, *, weights_only_safe=False, bytearray_arg=True):
    """Pairs of a py2 state: py2 str keys and values (short, long, escaped STRING), unicode,
    __builtin__ set/complex/bytearray and, unless weights_only_safe, BINSTRING, STRING,
    frozenset and xrange (which torch's weights-only unpickler refuses)."""
    pairs = [
        (S(b"weight"), tensor(pid)),
        (S(b"view"), tensor(pid, shape=(2, 2), stride=(1, 2), offset=1)),
        (S(b"name"), S(UTF8_TEXT)),
        (S(b"ascii"), S(b"plain text")),
        (U("unicode_key"), U("\u00fcn\u00efc\u00f6d\u00e9 \u2603")),
        (S(b"set"), G("__builtin__", "set") + b"](K\x01K\x02K\x03e\x85R"),
        (S(b"complex"), G("__builtin__", "complex") + F(1.5) + F(-2.25) + b"\x86R"),
        (S(b"nested"), b"}(" + S(b"lr") + F(0.1) + S(b"names") + b"](" + S(b"a") + S(b"b\xc3\xa9") + b"eu"),
        (S(b"tuple"), b"(" + S(b"x") + U("y") + S(b"") + b"t"),
    ]
    if bytearray_arg:
        # py2: bytearray.__reduce__ -> (bytearray, (unicode(self, 'latin-1'), 'latin-1'))
        pairs.append((S(b"bytearray"), G("__builtin__", "bytearray") + U("\x00\xff ab\u00e9") + S(b"latin-1")
                      + b"\x86R"))
    if not weights_only_safe:
        pairs += [
            (S(b"long_text"), S(UTF8_TEXT * 20)),  # BINSTRING
            (S(b"string_op"), b"S'caf\\xc3\\xa9 \\'q\\' \\n'\n"),  # protocol-0 STRING with escapes
            (S(b"frozenset"), G("__builtin__", "frozenset") + b"](" + S(b"k") + b"K\x05e\x85R"),
            (S(b"xrange"), G("__builtin__", "xrange") + b"K\x01K\x0bK\x03\x87R"),
        ]
    return pairs


def checkpoint(pairs, *, prefix="archive") -> bytes:
    pkl = b"\x80\x02" + od(pairs) + b"."
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in (("data.pkl", pkl), ("data/0", WEIGHT.tobytes()), ("version", b"3\n"),
                           ("byteorder", b"little")):
            z.writestr(zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def torch_load(torch, path, **kw):
    return torch.load(path, map_location="cpu", **kw)


# ---------------------------------------------------------------------------------------------
# against torch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ENCODINGS)
def test_py2_checkpoint_matches_torch(torch, tmp_path, encoding):
    """weights_only=False: every py2 construct, decoded as torch decodes it."""
    # torch's zip reader needs str storage keys under "bytes" (see the module docstring)
    pid = U if encoding == "bytes" else S
    path = write(tmp_path, "py2.pt", checkpoint(content(pid, bytearray_arg=encoding != "bytes")))
    exp = torch_load(torch, path, weights_only=False, encoding=encoding)
    got = torchfree.load(path, weights_only=False, encoding=encoding)
    assert_same(got, exp)
    # the keys and values really are py2 str decoded (or kept) as asked
    key = b"name" if encoding == "bytes" else "name"
    assert type(got[key]) is (bytes if encoding == "bytes" else str)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_weights_only_matches_torch(torch, tmp_path, encoding):
    """weights_only=True, with what torch's weights-only unpickler accepts: SHORT_BINSTRING,
    __builtin__ set/complex/bytearray, OrderedDict from a list of pairs."""
    pid = U if encoding == "bytes" else S
    path = write(tmp_path, "py2wo.pt", checkpoint(content(pid, weights_only_safe=True,
                                                          bytearray_arg=encoding != "bytes")))
    exp = torch_load(torch, path, weights_only=True, encoding=encoding)
    got = torchfree.load(path, weights_only=True, encoding=encoding)
    assert_same(got, exp)


@pytest.mark.parametrize("weights_only", [False, True])
def test_py2_storage_keys_under_bytes(torch, tmp_path, weights_only):
    """encoding="bytes" with py2-str storage keys and locations (what a py2 torch writes): torch's
    zip reader fails on them; torchfree decodes them as ASCII (as torch's legacy reader does) and
    gives what torch gives for the same checkpoint with unicode keys."""
    kw = dict(weights_only_safe=weights_only, bytearray_arg=False)
    py2 = write(tmp_path, "py2keys.pt", checkpoint(content(S, **kw)))
    uni = write(tmp_path, "unikeys.pt", checkpoint(content(U, **kw)))
    with pytest.raises(RuntimeError, match="data/b'0'"):
        torch_load(torch, py2, weights_only=weights_only, encoding="bytes")
    exp = torch_load(torch, uni, weights_only=weights_only, encoding="bytes")
    assert_same(torchfree.load(py2, weights_only=weights_only, encoding="bytes"), exp)


def test_py2_bytearray_under_bytes_fails_like_torch(torch, tmp_path):
    """bytearray(u'...', 'latin-1') with encoding="bytes": the encoding argument stays bytes and
    bytearray() refuses it; torch raises TypeError, torchfree an UnpicklingError."""
    pairs = [(U("weight"), tensor(U)),
             (U("ba"), G("__builtin__", "bytearray") + U("ab") + S(b"latin-1") + b"\x86R")]
    path = write(tmp_path, "ba.pt", checkpoint(pairs))
    with pytest.raises(TypeError):
        torch_load(torch, path, weights_only=False, encoding="bytes")
    with pytest.raises(torchfree.UnpicklingError, match="bytearray"):
        torchfree.load(path, weights_only=False, encoding="bytes")
    # and with a str encoding both load it
    assert_same(torchfree.load(path, weights_only=False), torch_load(torch, path, weights_only=False))


@pytest.mark.parametrize("encoding,data", [("utf-8", LATIN1_ONLY), ("ascii", UTF8_TEXT)])
def test_undecodable_py2_str_fails_like_torch(torch, tmp_path, encoding, data):
    """A py2 str that does not decode with the encoding: torch raises UnicodeDecodeError
    (with weights_only either way); torchfree raises its
    UnpicklingError (a CheckpointError and a pickle.UnpicklingError)."""
    pairs = [(S(b"weight"), tensor(S)), (S(b"bad"), S(data))]
    path = write(tmp_path, "bad.pt", checkpoint(pairs))
    for wo in (False, True):
        with pytest.raises(UnicodeDecodeError):
            torch_load(torch, path, weights_only=wo, encoding=encoding)
    for wo in (False, True):
        with pytest.raises(torchfree.UnpicklingError, match=f"encoding {encoding}") as ei:
            torchfree.load(path, weights_only=wo, encoding=encoding)
        assert isinstance(ei.value, torchfree.CheckpointError)
        assert isinstance(ei.value, pickle.UnpicklingError)
    # latin1 decodes anything, as in torch
    assert_same(torchfree.load(path, weights_only=False, encoding="latin1"),
                torch_load(torch, path, weights_only=False, encoding="latin1"))


@pytest.mark.parametrize("module,name,py3", [
    ("__builtin__", "xrange", "builtins.range"),
    ("__builtin__", "frozenset", "builtins.frozenset"),
    ("__builtin__", "unicode", "builtins.str"),
    ("copy_reg", "_reconstructor", "copyreg._reconstructor"),
])
def test_py2_names_refused_under_weights_only(torch, tmp_path, module, name, py3):
    """Python 2 names outside the weights-only allowlist are refused under their Python 3 names
    (torch maps them through the same 2-to-3 tables before checking its allowlist)."""
    call = {"xrange": b"K\x01K\x05\x86R", "frozenset": b"]K\x01a\x85R", "unicode": S(b"x") + b"\x85R",
            "_reconstructor": G("argparse", "Namespace") + G("__builtin__", "object") + b"N\x87R"}[name]
    pairs = [(S(b"weight"), tensor(S)), (S(b"x"), G(module, name) + call)]
    path = write(tmp_path, "names.pt", checkpoint(pairs))
    with pytest.raises(pickle.UnpicklingError, match=py3.replace("builtins.", "")):
        torch_load(torch, path, weights_only=True)
    with pytest.raises(torchfree.UnsafeGlobalError, match=py3):
        torchfree.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------
# without torch
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ENCODINGS)
def test_py2_str_decoding(tmp_path, encoding):
    """Each py2 str comes back decoded with the encoding (bytes kept under "bytes"); unicode
    stays str; the tensor is the same whatever the encoding."""
    path = write(tmp_path, "py2.pt", checkpoint(content(S, bytearray_arg=encoding != "bytes")))
    got = torchfree.load(path, weights_only=False, encoding=encoding)

    def py2(b):
        return b if encoding == "bytes" else b.decode(encoding)

    assert list(got) == [py2(k) for k in (b"weight", b"view", b"name", b"ascii")] + ["unicode_key"] + \
        [py2(k) for k in (b"set", b"complex", b"nested", b"tuple")] + \
        ([] if encoding == "bytes" else [py2(b"bytearray")]) + \
        [py2(k) for k in (b"long_text", b"string_op", b"frozenset", b"xrange")]
    assert np.array_equal(got[py2(b"weight")], WEIGHT.reshape(2, 3))
    assert got[py2(b"name")] == py2(UTF8_TEXT)
    assert got[py2(b"long_text")] == py2(UTF8_TEXT * 20)
    assert got[py2(b"string_op")] == py2(b"caf\xc3\xa9 'q' \n")
    assert got["unicode_key"] == "\u00fcn\u00efc\u00f6d\u00e9 \u2603"
    assert got[py2(b"nested")] == {py2(b"lr"): 0.1, py2(b"names"): [py2(b"a"), py2(b"b\xc3\xa9")]}
    assert got[py2(b"tuple")] == (py2(b"x"), "y", py2(b""))
    assert got[py2(b"set")] == {1, 2, 3} and got[py2(b"frozenset")] == frozenset({py2(b"k"), 5})
    assert got[py2(b"xrange")] == range(1, 11, 3)
    if encoding != "bytes":
        assert got["bytearray"] == bytearray("\x00\xff ab\u00e9".encode("latin-1"))
        assert type(got["bytearray"]) is bytearray


def test_weights_only_accepts_py2_data_opcodes(tmp_path):
    """BINSTRING and STRING are plain data: torchfree's weights-only mode loads them (torch's
    weights-only unpickler lacks those two opcodes), with the same result as weights_only=False."""
    path = write(tmp_path, "py2.pt", checkpoint(content(S)))
    a = torchfree.load(path, weights_only=False)
    pairs = [(k, v) for k, v in a.items() if k not in ("frozenset", "xrange")]
    path2 = write(tmp_path, "py2b.pt", checkpoint(
        content(S, weights_only_safe=True) + [(S(b"long_text"), S(UTF8_TEXT * 20)),
                                              (S(b"string_op"), b"S'caf\\xc3\\xa9 \\'q\\' \\n'\n")]))
    b = torchfree.load(path2, weights_only=True)
    assert list(b) == [k for k, _ in pairs]
    for k, v in pairs:
        if isinstance(v, np.ndarray):
            assert np.array_equal(b[k], v) and b[k].strides == v.strides
        else:
            assert type(b[k]) is type(v) and b[k] == v, k


@pytest.mark.parametrize("blob,what", [
    (b"T" + struct.pack("<i", -1), "negative"),
    (b"T" + struct.pack("<i", 1000) + b"abc", "truncated"),
    (b"U\x10abc", "truncated"),
    (b"S'abc\n", "unquoted"),
    (b"S'ab\\x'\n", "bad escape"),
])
def test_malformed_py2_strings(tmp_path, blob, what):
    pkl = b"\x80\x02}(" + S(b"k") + blob
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", b"3\n")
    for wo in (False, True):
        with pytest.raises(torchfree.UnpicklingError):
            torchfree.load(out.getvalue(), weights_only=wo)


def test_no_leaks_on_py2_paths():
    """Success and error paths of the py2 decoding and of bytearray(text, encoding) leak nothing."""
    from test_leaks import check_no_growth, expect

    ok = checkpoint(content(S))
    ok_nb = checkpoint(content(S, bytearray_arg=False))
    ba_bytes = checkpoint([(U("weight"), tensor(U)),
                           (U("ba"), G("__builtin__", "bytearray") + U("ab") + S(b"latin-1") + b"\x86R")])
    ba_codec = checkpoint([(U("weight"), tensor(U)),
                           (U("ba"), G("__builtin__", "bytearray") + U("ab") + S(b"rot13") + b"\x86R")])
    bad = checkpoint([(S(b"weight"), tensor(S)), (S(b"bad"), S(LATIN1_ONLY))])

    def work():
        torchfree.load(ok, weights_only=False, encoding="latin1")
        torchfree.load(ok_nb, weights_only=False, encoding="bytes")
        expect(torchfree.UnpicklingError, torchfree.load, ba_bytes, encoding="bytes")
        expect(torchfree.UnpicklingError, torchfree.load, ba_codec)
        expect(torchfree.UnpicklingError, torchfree.load, bad)

    check_no_growth(work, rounds=400)
