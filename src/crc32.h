/* crc32.h - CRC-32 (the zip/gzip polynomial) as zlib's crc32_z computes it,
 * folded with carry-less multiplies where the CPU has them.
 *
 * tf_crc32(crc, buf, len) takes and returns the same values as zlib's
 * crc32_z: start from 0, feed the previous result back for the next piece.
 * On x86-64 with PCLMULQDQ the bulk of a buffer runs four 128-bit lanes
 * folded in parallel, or four 512-bit ones where VPCLMULQDQ is there;
 * elsewhere, and for short buffers and tails, it is zlib's own crc32_z. */
#ifndef TORCHFREE_CRC32_H
#define TORCHFREE_CRC32_H

#include "common.h"

uint32_t tf_crc32(uint32_t crc, const void *buf, size_t len);

/* tf_crc32 folding at most as wide as `fold` (0: zlib only; 1: 128-bit;
 * 2: the widest this CPU has), so tests can check each path against zlib */
uint32_t tf_crc32_using(int fold, uint32_t crc, const void *buf, size_t len);

/* How tf_crc32 folds on this CPU: 0 not at all (zlib), 1 with 128-bit
 * PCLMULQDQ, 2 with 512-bit VPCLMULQDQ (AVX-512). Probed once. */
int tf_crc32_folds(void);

#endif
