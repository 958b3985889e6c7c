"""Issue 19, item 13: copy loads under fragmented memory. numpy asks for transparent huge pages
on every buffer of 4 MB or more; a load now spends the free huge-page blocks /proc/buddyinfo
shows and gives a buffer beyond them small pages (MADV_NOHUGEPAGE), whose faults never compact
memory (src/storage.c, storage_thp_fit). Checked through the VMA flags of the buffers in
/proc/self/smaps (no timings): `nh` where the budget ran out, numpy's `hg` where it did not.
The budget is set through the internal `_core._thp_probe(free)`. The speed is in bench/RESULTS.md
(bench/bench_thp.py)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import torchfree
from torchfree import _core

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="THP and smaps are Linux's")

N = 16 << 20  # over numpy's 4 MB huge-page threshold


def _vm_flags(addr):
    """The VmFlags of the mapping of this process that holds addr (None: smaps lacks them)."""
    start = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not line.startswith("VmFlags"):
                try:
                    lo, hi = (int(x, 16) for x in head.split("-"))
                except ValueError:
                    continue
                start = (lo, hi)
            elif line.startswith("VmFlags:") and start and start[0] <= addr < start[1]:
                return line.split()[1:]
    return None


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


@pytest.fixture
def budget():
    def set_(n):
        _core._thp_probe(n)

    yield set_
    _core._thp_probe(-1)


@pytest.fixture(params=["zip", "legacy"])
def ckpt(request, tmp_path):
    rng = np.random.default_rng(13)
    sd = {"big": rng.integers(0, 255, N, dtype=np.uint8), "mid": np.arange(N // 8, dtype=np.int32),
          "small": np.arange(10, dtype=np.float32)}
    p = tmp_path / f"ck-{request.param}.pt"
    torchfree.save(sd, p, format=request.param)
    return p, sd


def _middle_flags(arr):
    r = _root(arr)
    return _vm_flags(r.__array_interface__["data"][0] + r.nbytes // 2)


@linux_only
@pytest.mark.parametrize("free", [0, 1 << 50], ids=["fragmented", "unfragmented"])
def test_buffers_get_small_pages_past_the_budget_only(ckpt, budget, free):
    """No free huge-page block: the big buffers get small pages (nh); plenty: numpy's own."""
    p, sd = ckpt
    budget(free)
    got = torchfree.load(p, mmap=False)
    for k in sd:
        np.testing.assert_array_equal(got[k], sd[k])
    flags = _middle_flags(got["big"])
    if flags is None:
        pytest.skip("no VmFlags in /proc/self/smaps")
    if free == 0:
        assert "nh" in flags and "hg" not in flags, flags
        assert "nh" in _middle_flags(got["mid"])  # 8 MB
    else:
        assert "nh" not in flags, flags
        if np.lib.NumpyVersion(np.__version__) >= "2.0.0" and np._core.multiarray._get_madvise_hugepage():
            assert "hg" in flags, flags  # numpy's MADV_HUGEPAGE, left as it was


@linux_only
def test_small_pages_buffers_are_freed(ckpt, budget):
    p, sd = ckpt
    budget(0)

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) << 10

    for _ in range(3):
        torchfree.load(p, mmap=False)
    r0 = rss()
    for _ in range(20):
        got = torchfree.load(p, mmap=False)
        assert got["big"][N // 3] == sd["big"][N // 3]
        del got
    assert rss() - r0 < 4 * N


def test_probe_reports_the_kernels_budget(budget):
    f = _core._thp_probe()
    assert f is None or (isinstance(f, int) and f >= 0)
    budget(12345)
    assert _core._thp_probe() == 12345
    budget(-1)
    assert (_core._thp_probe() is None) == (f is None)
    with pytest.raises(ValueError):
        _core._thp_probe(-5)
