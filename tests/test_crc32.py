"""The CRC-32 that save writes into every zip entry (src/crc32.c), against zlib.

Every folding path this CPU has (zlib's loop, 128-bit PCLMULQDQ, 512-bit VPCLMULQDQ) is run
on lengths around each block and step size, at every alignment, from several start values."""

import os
import random
import zlib

import pytest

from torchfree import _core

FOLDS = list(range(_core.crc32_folds() + 1))


def test_folds_reports_a_known_path():
    assert _core.crc32_folds() in (0, 1, 2)


@pytest.mark.parametrize("fold", FOLDS)
def test_every_length_and_alignment_matches_zlib(fold):
    rng = random.Random(fold)
    buf = os.urandom(8192)
    # every length up to 2 KiB covers the 16/64/256-byte steps, the tails and both thresholds
    for n in range(2100):
        off = n % 64
        data = buf[off:off + n]
        start = rng.choice([0, 1, 0xFFFFFFFF, rng.getrandbits(32)])
        assert _core.crc32(data, start, fold=fold) == zlib.crc32(data, start), (n, off, start)


@pytest.mark.parametrize("fold", FOLDS)
def test_long_and_chained_buffers_match_zlib(fold):
    rng = random.Random(100 + fold)
    buf = os.urandom(3 << 20)
    for _ in range(20):
        off, n = rng.randrange(64), rng.randrange(1 << 21)
        data = memoryview(buf)[off:off + n]
        assert _core.crc32(data, fold=fold) == zlib.crc32(data)
    # fed in pieces, as save feeds a record chunk by chunk
    crc, ref = 0, 0
    for piece in (buf[:1000], buf[1000:5000], buf[5000:(1 << 20) + 7], buf[(1 << 20) + 7:]):
        crc = _core.crc32(piece, crc, fold=fold)
        ref = zlib.crc32(piece, ref)
    assert crc == ref


def test_structured_inputs_match_zlib():
    # runs of zeros and of ones, where a wrong fold constant cancels least
    for pattern in (b"\x00", b"\xff", b"\x01\x00", bytes(range(256))):
        data = pattern * (100_000 // len(pattern))
        for fold in FOLDS:
            assert _core.crc32(data, fold=fold) == zlib.crc32(data)
