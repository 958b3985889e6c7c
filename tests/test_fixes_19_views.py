"""Issue 19, items 10 and 12: the text views at scale (info --json compact, print(scan) capped,
diff --json) and the free-threading declaration."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from html import escape

import numpy as np
import pytest

import torchfree
from conftest import REPO

N = 2_000


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    p = tmp_path_factory.mktemp("many") / "many.pt"
    sd = {f"layers.{i}.w": np.full((2, i % 5 + 1), i, np.float32) for i in range(N)}
    sd["odd \"name\"\\é"] = np.arange(3, dtype=np.int16)[::2]
    torchfree.save(sd, p)
    return p


def cli(*args):
    return subprocess.run([sys.executable, "-m", "torchfree.cli", *map(str, args)], capture_output=True, text=True)


def test_print_scan_is_capped_like_the_notebook_view(many):
    info = torchfree.scan(many)
    text = str(info)
    lines = text.splitlines()
    n = len(info.tensors)
    assert len(lines) < 80, len(lines)
    names = [t.name for t in info.tensors]
    assert names[0] in text and names[49] in text and names[-1] in text and names[-10] in text
    assert names[50] + " " not in text and names[-11] + " " not in text
    assert f"... {n - 60:,} more tensors" in lines
    assert lines[-1].startswith("by dtype: float32") and lines[0] == info._header()
    # the whole table stays one call away, and `torchfree info` prints it
    full = info.to_text()
    assert len(full.splitlines()) == n + 6 and all(nm in full for nm in names)
    assert cli("info", many).stdout == full + "\n"
    # the notebook view: first and last rows around one "more" row
    html = info._repr_html_()
    assert f"… {n - 500:,} more tensors" in html and names[449] in html and escape(names[-1]) in html
    assert f">{names[450]}<" not in html
    # small checkpoints are printed whole
    small = torchfree.CheckpointInfo(None, "zip", "little", tensors=info.tensors[:60])
    assert str(small) == small.to_text() and "more tensors" not in str(small)


def test_info_json_is_a_compact_tensor_listing(many):
    info = torchfree.scan(many)
    r = cli("info", many, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["tensor_count"] == len(d["tensors"]) == N + 1 and "records" not in d and "storages" not in d
    assert len(r.stdout.splitlines()) == N + 2  # the totals, then one line per tensor
    by = {t["name"]: t for t in d["tensors"]}
    odd = by["odd \"name\"\\é"]
    assert odd == {"name": "odd \"name\"\\é", "dtype": "int16", "shape": [2], "stride": [2],
                   "storage": info["odd \"name\"\\é"].storage_key, "offset": 0, "nbytes": 4, "location": "cpu"}
    assert by["layers.7.w"]["shape"] == [2, 3] and by["layers.7.w"]["stride"] == [3, 1]
    assert d["total_bytes"] == info.total_bytes and d["param_count"] == info.param_count
    # smaller than the full description, which --records still gives
    full = cli("info", many, "--json", "--records")
    assert json.loads(full.stdout) == json.loads(info.to_json())
    assert len(r.stdout) * 2 < len(full.stdout)
    assert "needs --json" in cli("info", many, "--records").stderr


def _pair(tmp_path):
    a = {"same": np.arange(4.0), "val": np.array([1.0, 2.0, 3.0]), "shape": np.zeros(3), "gone": np.ones(2, np.int8),
         "dt": np.array([1, 2], np.int32), "inf": np.array([1.0])}
    b = {"same": np.arange(4.0), "val": np.array([1.0, 2.5, 3.0]), "shape": np.zeros(4), "new": np.ones(1),
         "dt": np.array([1, 3], np.int64), "inf": np.array([np.inf])}
    torchfree.save(a, tmp_path / "a.pt")
    torchfree.save(b, tmp_path / "b.pt")
    return tmp_path / "a.pt", tmp_path / "b.pt"


def test_diff_json(tmp_path):
    a, b = _pair(tmp_path)
    r = cli("diff", a, b, "--json")
    assert r.returncode == 1, r.stderr
    d = json.loads(r.stdout)
    assert d["differ"] is True and d["common"] == 5 and d["identical"] == 1 and d["atol"] == 0
    assert d["a"] == {"path": str(a), "format": "pt", "tensors": 6}
    assert d["only_in_a"] == [{"name": "gone", "dtype": "int8", "shape": [2]}]
    assert d["only_in_b"] == [{"name": "new", "dtype": "float64", "shape": [1]}]
    ch = {c["name"]: c for c in d["changed"]}
    assert ch["shape"]["a"]["shape"] == [3] and ch["shape"]["b"]["shape"] == [4]
    assert ch["dt"]["a"]["dtype"] == "int32" and ch["dt"]["b"]["dtype"] == "int64"
    assert ch["dt"]["elements_differ"] == 1 and ch["dt"]["max_abs_diff"] == 1.0
    vals = {v["name"]: v for v in d["values_differ"]}
    assert vals["val"] == {"name": "val", "dtype": "float64", "shape": [3], "elements_differ": 1, "elements": 3,
                           "max_abs_diff": 0.5}
    assert vals["inf"]["max_abs_diff"] == "inf"
    # the text form says the same, from the same report
    t = cli("diff", a, b)
    assert t.returncode == 1
    assert "! val: float64 [3]: 1 of 3 elements differ, max abs diff 0.5" in t.stdout
    assert "~ dt: int32 -> int64 [2], max abs diff 1" in t.stdout
    assert "differ: 1 only in A, 1 only in B, 2 changed, 2 with different values; 1 of 5 common" in t.stdout
    same = json.loads(cli("diff", a, a, "--json").stdout)
    assert same["differ"] is False and same["identical"] == 6 and same["changed"] == []


def test_no_free_threading_claim_without_locks():
    """Item 12: the module state's lazy numpy / ml_dtypes setup and caches have no lock, so the
    module must not tell a free-threaded CPython that it is safe without the GIL."""
    src = (REPO / "src" / "module.c").read_text()
    assert not re.search(r"Py_mod_gil\s*,\s*Py_MOD_GIL_NOT_USED", src)
    if sysconfig.get_config_var("Py_GIL_DISABLED"):  # a free-threaded build: importing turns the GIL on
        out = subprocess.run([sys.executable, "-c", "import torchfree._core, sys; print(sys._is_gil_enabled())"],
                             capture_output=True, text=True)
        assert out.stdout.strip() == "True", out
