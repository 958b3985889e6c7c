/* zipread_impl.h - internal to the zip reader (zipread.c, zipentry.c): the format's constants and
 * the bounded read both use. */
#ifndef TORCHFREE_ZIPREAD_IMPL_H
#define TORCHFREE_ZIPREAD_IMPL_H

#include "zipread.h"

/* ---------------------------------------------------------------- constants */

#define ZR_SIG_LOCAL 0x04034b50u     /* PK\3\4 */
#define ZR_SIG_CENTRAL 0x02014b50u   /* PK\1\2 */
#define ZR_SIG_EOCD 0x06054b50u      /* PK\5\6 */
#define ZR_SIG_Z64_EOCD 0x06064b50u  /* PK\6\6 */
#define ZR_SIG_Z64_LOC 0x07064b50u   /* PK\6\7 */

#define ZR_LOCAL_SIZE 30u
#define ZR_CENTRAL_SIZE 46u
#define ZR_EOCD_SIZE 22u
#define ZR_Z64_EOCD_SIZE 56u
#define ZR_Z64_LOC_SIZE 20u
#define ZR_MAX_COMMENT 65535u
#define ZR_Z64_EXTRA_ID 0x0001u

#define ZR_SAT16 0xFFFFu
#define ZR_SAT32 0xFFFFFFFFu

/* Compressed bytes read per inflate step, and the most output handed to zlib at
 * once (its counters are 32-bit). */
#define ZR_INFLATE_CHUNK (64u * 1024u)
#define ZR_INFLATE_OUT_MAX (1u << 30)
/* Deflate cannot expand more than 1032:1 (a 258-byte match costs at least 2
 * bits); a larger declared usize cannot be honest, so it is refused at open
 * time, before any caller allocates from it. */
#define ZR_DEFLATE_MAX_RATIO 1032u
#define ZR_DEFLATE_SLACK 8u
/* Probes per hash lookup. With a load factor <= 1/2 and a mixed hash an honest
 * archive practically never needs more than a dozen; the cap bounds the work
 * that crafted colliding names can cause (rejected as a format error). */
#define ZR_MAX_PROBES 128u
/* The central directory is read through a window of this many bytes; one
 * entry (46 + 3 * 65535 bytes at most) always fits. */
#define ZR_CD_WINDOW (256u * 1024u)

/* Print at most 80 bytes of a name in messages. */
#define ZR_NAME_SHOWN(n) ((int)((n) > 80 ? 80 : (n)))

typedef unsigned long long ull; /* for printf of uint64_t without PRIu64 noise */

/* ------------------------------------------------------------------ helpers */

static inline TfStatus zr_read(const ZipReader *z, uint64_t off, void *buf, size_t n, TfErr *err) {
    uint64_t end;
    if (n == 0) return TF_OK;
    /* Callers check first; this is a last line of defence. */
    if (tf_add_u64(off, (uint64_t)n, &end) || end > z->size)
        return tf_fail(err, TF_ERR_FORMAT, off, "read of %llu bytes at offset %llu lies outside the input (%llu bytes)",
                       (ull)n, (ull)off, (ull)z->size);
    return z->read_at(z->ctx, off, buf, n, err);
}

static inline int zr_sig(const uint8_t *p, uint32_t sig) { return tf_le32(p) == sig; }

#endif
