/* zipwrite.c - Python-free writer for torch's zip layout (see zipwrite.h).
 *
 * Everything is written sequentially: sizes and CRCs follow each record's
 * data in a data descriptor and are repeated in the central directory, as
 * torch's patched miniz does (flag bit 3), so non-seekable sinks work.
 * Small pieces (headers, small records) are gathered in one buffer; large
 * data goes straight from the caller's memory to the sink. */
#include "zipwrite.h"

#include "crc32.h"

#include <stdio.h>
#include <stdlib.h>

#define ZW_SIG_LOCAL 0x04034b50u
#define ZW_SIG_CENTRAL 0x02014b50u
#define ZW_SIG_DESCRIPTOR 0x08074b50u
#define ZW_SIG_Z64_EOCD 0x06064b50u
#define ZW_SIG_Z64_LOC 0x07064b50u
#define ZW_SIG_EOCD 0x06054b50u
#define ZW_LOCAL_SIZE 30u
#define ZW_CENTRAL_SIZE 46u
#define ZW_MAX32 0xFFFFFFFFu
#define ZW_FLAG_DESCRIPTOR 0x0008u
#define ZW_FLAG_UTF8 0x0800u
#define ZW_SERIALIZATION_ID ".data/serialization_id"

typedef unsigned long long ull;

/* ---- output ------------------------------------------------------------- */

static TfStatus sink_fail(ZipWriter *z, TfErr *err) {
    return tf_fail(err, TF_ERR_IO, z->pos, "write failed");
}

TfStatus zipwrite_flush(ZipWriter *z, TfErr *err) {
    if (z->buf_len == 0) return TF_OK;
    size_t n = z->buf_len;
    z->buf_len = 0;
    if (z->sink(z->ctx, z->buf, n) < 0) return sink_fail(z, err);
    return TF_OK;
}

/* Emit n bytes: gathered when small, handed to the sink as they are when large. */
static TfStatus emit(ZipWriter *z, const void *p, size_t n, TfErr *err) {
    if (n == 0) return TF_OK;
    if (n <= ZW_BUFFER - z->buf_len) {
        memcpy(z->buf + z->buf_len, p, n);
        z->buf_len += n;
    } else {
        if (zipwrite_flush(z, err) != TF_OK) return err->status;
        if (n < ZW_BUFFER) {
            memcpy(z->buf, p, n);
            z->buf_len = n;
        } else if (z->sink(z->ctx, p, n) < 0) {
            return sink_fail(z, err);
        }
    }
    z->pos += n;
    return TF_OK;
}

/* c10::hash_combine */
static uint64_t hash_combine(uint64_t seed, uint64_t value) {
    return seed ^ (value + UINT64_C(0x9e3779b9) + (seed << 6) + (seed >> 2));
}

/* ---- open / close ------------------------------------------------------------- */

TfStatus zipwrite_open(ZipWriter *z, ZwSinkFn sink, void *ctx, const char *prefix, size_t prefix_len,
                       TfErr *err) {
    memset(z, 0, sizeof *z);
    z->sink = sink;
    z->ctx = ctx;
    if (prefix_len == 0 || prefix_len > 1024)
        return tf_fail(err, TF_ERR_FORMAT, 0, "invalid archive name (%zu bytes)", prefix_len);
    z->prefix = malloc(prefix_len + 1);
    z->buf = malloc(ZW_BUFFER);
    if (z->prefix == NULL || z->buf == NULL) return tf_fail(err, TF_ERR_NOMEM, 0, "out of memory");
    memcpy(z->prefix, prefix, prefix_len);
    z->prefix[prefix_len] = 0;
    z->prefix_len = prefix_len;
    return TF_OK;
}

void zipwrite_close(ZipWriter *z) {
    for (size_t i = 0; i < z->n_entries; i++) free(z->entries[i].name);
    free(z->entries);
    free(z->prefix);
    free(z->buf);
    memset(z, 0, sizeof *z);
}

/* ---- records ------------------------------------------------------------------ */

TfStatus zipwrite_begin(ZipWriter *z, const char *name, uint64_t size, int inline_crc, TfErr *err) {
    if (z->open) return tf_fail(err, TF_ERR_FORMAT, z->pos, "record opened twice");
    size_t nlen = strlen(name);
    size_t flen = z->prefix_len + 1 + nlen;
    if (flen > 0xFFFF) return tf_fail(err, TF_ERR_LIMIT, z->pos, "record name of %zu bytes is too long", flen);
    if (z->n_entries == z->cap_entries) {
        size_t ncap = z->cap_entries ? z->cap_entries * 2 : 64;
        ZwEntry *e = realloc(z->entries, ncap * sizeof *e);
        if (e == NULL) return tf_fail(err, TF_ERR_NOMEM, z->pos, "out of memory");
        z->entries = e;
        z->cap_entries = ncap;
    }
    ZwEntry *e = &z->entries[z->n_entries];
    memset(e, 0, sizeof *e);
    e->name = malloc(flen + 1);
    if (e->name == NULL) return tf_fail(err, TF_ERR_NOMEM, z->pos, "out of memory");
    memcpy(e->name, z->prefix, z->prefix_len);
    e->name[z->prefix_len] = '/';
    memcpy(e->name + z->prefix_len + 1, name, nlen + 1);
    e->name_len = (uint16_t)flen;
    e->flags = (uint16_t)(ZW_FLAG_UTF8 | (size ? ZW_FLAG_DESCRIPTOR : 0));
    e->size = size;
    e->header_offset = z->pos;
    e->name_hash = zipwrite_std_hash(name, nlen);
    z->n_entries++;

    /* zip64 extra: (size, compressed size 0) when size >= 4 GiB - 1, then the
     * header's own offset when it lies at or past 4 GiB - 1 */
    int big_size = size >= ZW_MAX32, big_off = e->header_offset >= ZW_MAX32;
    uint8_t z64[4 + 24];
    size_t z64_len = 0;
    if (big_size || big_off) {
        size_t at = 4;
        tf_put16(z64, 0x0001);
        if (big_size) {
            tf_put64(z64 + at, size);
            tf_put64(z64 + at + 8, 0);
            at += 16;
        }
        if (big_off) {
            tf_put64(z64 + at, e->header_offset);
            at += 8;
        }
        tf_put16(z64 + 2, (uint16_t)(at - 4));
        z64_len = at;
    }
    /* "FB" padding field so the data starts at a multiple of the alignment */
    uint64_t start = e->header_offset + ZW_LOCAL_SIZE + flen + 4 + z64_len;
    size_t pad = (size_t)((ZW_ALIGNMENT - start % ZW_ALIGNMENT) % ZW_ALIGNMENT);

    uint8_t h[ZW_LOCAL_SIZE];
    memset(h, 0, sizeof h);
    tf_put32(h, ZW_SIG_LOCAL);
    tf_put16(h + 6, e->flags);
    tf_put16(h + 26, (uint16_t)flen);
    tf_put16(h + 28, (uint16_t)(z64_len + 4 + pad));
    uint8_t fb[4 + ZW_ALIGNMENT];
    fb[0] = 'F';
    fb[1] = 'B';
    tf_put16(fb + 2, (uint16_t)pad);
    memset(fb + 4, 'Z', pad);
    if (emit(z, h, sizeof h, err) != TF_OK || emit(z, e->name, flen, err) != TF_OK ||
        emit(z, z64, z64_len, err) != TF_OK || emit(z, fb, 4 + pad, err) != TF_OK)
        return err->status;
    z->open = 1;
    z->inline_crc = inline_crc;
    z->crc = 0;
    z->written = 0;
    return TF_OK;
}

TfStatus zipwrite_data(ZipWriter *z, const void *data, size_t n, TfErr *err) {
    ZwEntry *e = &z->entries[z->n_entries - 1];
    if (!z->open || n > e->size - z->written)
        return tf_fail(err, TF_ERR_FORMAT, z->pos, "more data than declared for record %s", z->open ? e->name : "?");
    if (z->written < 8) {
        size_t k = n < 8 - z->written ? n : (size_t)(8 - z->written);
        memcpy(z->head + z->written, data, k);
    }
    if (z->inline_crc) z->crc = tf_crc32(z->crc, data, n);
    if (emit(z, data, n, err) != TF_OK) return err->status;
    z->written += n;
    return TF_OK;
}

TfStatus zipwrite_end(ZipWriter *z, uint32_t crc, TfErr *err) {
    ZwEntry *e = &z->entries[z->n_entries - 1];
    if (!z->open || z->written != e->size)
        return tf_fail(err, TF_ERR_FORMAT, z->pos, "record %s is incomplete (%llu of %llu bytes)",
                       z->open ? e->name : "?", (ull)z->written, (ull)e->size);
    z->open = 0;
    e->crc = z->inline_crc ? z->crc : crc;
    if (e->size == 0) return TF_OK; /* no descriptor for empty records */
    /* torch's writer folds into its serialization id the CRC it finds in any
     * write of >= 8 bytes that starts with the descriptor signature: the
     * record's data itself when it happens to start that way, then the
     * descriptor */
    if (e->size >= 8 && tf_le32(z->head) == ZW_SIG_DESCRIPTOR)
        z->combined_crc = hash_combine(z->combined_crc, tf_le32(z->head + 4));
    uint8_t d[24];
    size_t dlen;
    tf_put32(d, ZW_SIG_DESCRIPTOR);
    tf_put32(d + 4, e->crc);
    if (e->size >= ZW_MAX32 || e->header_offset >= ZW_MAX32) {
        tf_put64(d + 8, e->size);
        tf_put64(d + 16, e->size);
        dlen = 24;
    } else {
        tf_put32(d + 8, (uint32_t)e->size);
        tf_put32(d + 12, (uint32_t)e->size);
        dlen = 16;
    }
    z->combined_crc = hash_combine(z->combined_crc, e->crc);
    return emit(z, d, dlen, err);
}

TfStatus zipwrite_record(ZipWriter *z, const char *name, const void *data, size_t n, TfErr *err) {
    if (zipwrite_begin(z, name, n, 1, err) != TF_OK || zipwrite_data(z, data, n, err) != TF_OK)
        return err->status;
    return zipwrite_end(z, 0, err);
}

/* ---- serialization id ------------------------------------------------------------ */

uint64_t zipwrite_std_hash(const void *data, size_t len) {
    const uint64_t mul = (UINT64_C(0xc6a4a793) << 32) + UINT64_C(0x5bd1e995);
    const uint8_t *p = data;
    size_t aligned = len & ~(size_t)7;
    uint64_t h = UINT64_C(0xc70f6907) ^ ((uint64_t)len * mul);
    for (size_t i = 0; i < aligned; i += 8) {
        uint64_t v = tf_le64(p + i) * mul;
        v = (v ^ (v >> 47)) * mul;
        h ^= v;
        h *= mul;
    }
    if (len & 7) {
        uint64_t v = 0;
        for (size_t i = len; i > aligned; i--) v = (v << 8) + p[i - 1];
        h ^= v;
        h *= mul;
    }
    h = (h ^ (h >> 47)) * mul;
    return h ^ (h >> 47);
}

/* libstdc++'s bucket counts (std::__detail::__prime_list from index 6 on,
 * as _Prime_rehash_policy::_M_next_bkt searches it), up to 2^33. */
static const uint64_t zw_primes[] = {
    17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 103, 109, 113, 127, 137,
    139, 149, 157, 167, 179, 193, 199, 211, 227, 241, 257, 277, 293, 313, 337, 359, 383, 409, 439, 467,
    503, 541, 577, 619, 661, 709, 761, 823, 887, 953, 1031, 1109, 1193, 1289, 1381, 1493, 1613, 1741,
    1879, 2029, 2179, 2357, 2549, 2753, 2971, 3209, 3469, 3739, 4027, 4349, 4703, 5087, 5503, 5953, 6427,
    6949, 7517, 8123, 8783, 9497, 10273, 11113, 12011, 12983, 14033, 15173, 16411, 17749, 19183, 20753,
    22447, 24281, 26267, 28411, 30727, 33223, 35933, 38873, 42043, 45481, 49201, 53201, 57557, 62233,
    67307, 72817, 78779, 85229, 92203, 99733, 107897, 116731, 126271, 136607, 147793, 159871, 172933,
    187091, 202409, 218971, 236897, 256279, 277261, 299951, 324503, 351061, 379787, 410857, 444487,
    480881, 520241, 562841, 608903, 658753, 712697, 771049, 834181, 902483, 976369, 1056323, 1142821,
    1236397, 1337629, 1447153, 1565659, 1693859, 1832561, 1982627, 2144977, 2320627, 2510653, 2716249,
    2938679, 3179303, 3439651, 3721303, 4026031, 4355707, 4712381, 5098259, 5515729, 5967347, 6456007,
    6984629, 7556579, 8175383, 8844859, 9569143, 10352717, 11200489, 12117689, 13109983, 14183539,
    15345007, 16601593, 17961079, 19431899, 21023161, 22744717, 24607243, 26622317, 28802401, 31160981,
    33712729, 36473443, 39460231, 42691603, 46187573, 49969847, 54061849, 58488943, 63278561, 68460391,
    74066549, 80131819, 86693767, 93793069, 101473717, 109783337, 118773397, 128499677, 139022417,
    150406843, 162723577, 176048909, 190465427, 206062531, 222936881, 241193053, 260944219, 282312799,
    305431229, 330442829, 357502601, 386778277, 418451333, 452718089, 489790921, 529899637, 573292817,
    620239453, 671030513, 725980837, 785430967, 849749479, 919334987, 994618837, 1076067617, 1164186217,
    1259520799, 1362662261, 1474249943, 1594975441, 1725587117, 1866894511, 2019773507, 2185171673,
    2364114217, 2557710269, 2767159799, 2993761039, 3238918481, 3504151727, 3791104843, 4101556399,
    4294967291, UINT64_C(6442450933), UINT64_C(8589934583),
};

/* _Prime_rehash_policy::_M_next_bkt (max_load_factor 1). */
static uint64_t next_bucket_count(uint64_t n, uint64_t *next_resize) {
    static const uint8_t fast[14] = {2, 2, 2, 3, 5, 5, 7, 7, 11, 11, 11, 11, 13, 13};
    if (n < 14) {
        *next_resize = fast[n];
        return fast[n];
    }
    size_t count = sizeof zw_primes / sizeof zw_primes[0];
    size_t lo = 0, hi = count;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (zw_primes[mid] < n) lo = mid + 1;
        else hi = mid;
    }
    if (lo >= count) lo = count - 1;
    *next_resize = zw_primes[lo];
    return zw_primes[lo];
}

#define US_NONE SIZE_MAX     /* empty bucket */
#define US_BEFORE_BEGIN (SIZE_MAX - 1)

/* The order in which a libstdc++ std::unordered_set<std::string> (default
 * constructed, names inserted in write order) iterates: insertion at the
 * front of a bucket's run (or of the whole list for an empty bucket), and
 * re-threading on each rehash, exactly as _Hashtable does. order[] receives
 * entry indexes. */
static TfStatus unordered_set_order(const ZwEntry *e, size_t n, size_t *order, size_t *n_out, TfErr *err) {
    size_t *next = malloc((n ? n : 1) * sizeof *next);
    size_t *buckets = malloc(sizeof *buckets);
    size_t head = US_NONE, size = 0;
    uint64_t nb = 1, next_resize = 0;
    if (next == NULL || buckets == NULL) goto oom;
    buckets[0] = US_NONE;
    for (size_t i = 0; i < n; i++) {
        /* _M_need_rehash(nb, size, 1) */
        if (size + 1 > next_resize) {
            uint64_t min_bkts = size + 1 > (next_resize ? 0 : 11) ? size + 1 : 11;
            if (min_bkts >= nb) {
                uint64_t want = min_bkts + 1 > nb * 2 ? min_bkts + 1 : nb * 2;
                uint64_t nnb = next_bucket_count(want, &next_resize);
                if (nnb > SIZE_MAX / sizeof(size_t)) goto oom;
                size_t *nbk = malloc((size_t)nnb * sizeof *nbk);
                if (nbk == NULL) goto oom;
                for (uint64_t b = 0; b < nnb; b++) nbk[b] = US_NONE;
                size_t p = head, bbegin = 0;
                head = US_NONE;
                while (p != US_NONE) {
                    size_t nxt = next[p];
                    size_t b = (size_t)(e[p].name_hash % nnb);
                    if (nbk[b] == US_NONE) {
                        next[p] = head;
                        head = p;
                        nbk[b] = US_BEFORE_BEGIN;
                        if (next[p] != US_NONE) nbk[bbegin] = p;
                        bbegin = b;
                    } else if (nbk[b] == US_BEFORE_BEGIN) {
                        next[p] = head;
                        head = p;
                    } else {
                        next[p] = next[nbk[b]];
                        next[nbk[b]] = p;
                    }
                    p = nxt;
                }
                free(buckets);
                buckets = nbk;
                nb = nnb;
            } else {
                next_resize = nb;
            }
        }
        /* _M_insert_bucket_begin */
        size_t b = (size_t)(e[i].name_hash % nb);
        if (buckets[b] == US_BEFORE_BEGIN) {
            next[i] = head;
            head = i;
        } else if (buckets[b] != US_NONE) {
            next[i] = next[buckets[b]];
            next[buckets[b]] = i;
        } else {
            next[i] = head;
            head = i;
            if (next[i] != US_NONE) buckets[e[next[i]].name_hash % nb] = i;
            buckets[b] = US_BEFORE_BEGIN;
        }
        size++;
    }
    size_t k = 0;
    for (size_t p = head; p != US_NONE; p = next[p]) order[k++] = p;
    *n_out = k;
    free(next);
    free(buckets);
    return TF_OK;
oom:
    free(next);
    free(buckets);
    return tf_fail(err, TF_ERR_NOMEM, 0, "out of memory");
}

/* torch's id: 20 digits of the names' hash, 20 of the descriptors' CRCs. */
static TfStatus serialization_id(const ZipWriter *z, char out[41], TfErr *err) {
    size_t *order = malloc((z->n_entries ? z->n_entries : 1) * sizeof *order);
    if (order == NULL) return tf_fail(err, TF_ERR_NOMEM, 0, "out of memory");
    size_t k = 0;
    TfStatus rc = unordered_set_order(z->entries, z->n_entries, order, &k, err);
    if (rc != TF_OK) {
        free(order);
        return rc;
    }
    uint64_t names = 0;
    for (size_t i = 0; i < k; i++) names = hash_combine(names, z->entries[order[i]].name_hash);
    free(order);
    snprintf(out, 41, "%020llu%020llu", (ull)names, (ull)z->combined_crc);
    return TF_OK;
}

/* ---- finish --------------------------------------------------------------------- */

TfStatus zipwrite_finish(ZipWriter *z, TfErr *err) {
    if (z->open) return tf_fail(err, TF_ERR_FORMAT, z->pos, "a record is still open");
    char id[41];
    if (serialization_id(z, id, err) != TF_OK) return err->status;
    if (zipwrite_record(z, ZW_SERIALIZATION_ID, id, 40, err) != TF_OK) return err->status;

    uint64_t cd_offset = z->pos;
    for (size_t i = 0; i < z->n_entries; i++) {
        const ZwEntry *e = &z->entries[i];
        int big_size = e->size >= ZW_MAX32, big_off = e->header_offset >= ZW_MAX32;
        uint8_t c[ZW_CENTRAL_SIZE], x[4 + 24];
        size_t xlen = 0;
        if (big_size || big_off) {
            xlen = 4;
            tf_put16(x, 0x0001);
            if (big_size) {
                tf_put64(x + xlen, e->size);
                tf_put64(x + xlen + 8, e->size);
                xlen += 16;
            }
            if (big_off) {
                tf_put64(x + xlen, e->header_offset);
                xlen += 8;
            }
            tf_put16(x + 2, (uint16_t)(xlen - 4));
        }
        memset(c, 0, sizeof c);
        tf_put32(c, ZW_SIG_CENTRAL);
        tf_put16(c + 8, e->flags);
        tf_put32(c + 16, e->crc);
        tf_put32(c + 20, big_size ? ZW_MAX32 : (uint32_t)e->size);
        tf_put32(c + 24, big_size ? ZW_MAX32 : (uint32_t)e->size);
        tf_put16(c + 28, e->name_len);
        tf_put16(c + 30, (uint16_t)xlen);
        tf_put32(c + 42, big_off ? ZW_MAX32 : (uint32_t)e->header_offset);
        if (emit(z, c, sizeof c, err) != TF_OK || emit(z, e->name, e->name_len, err) != TF_OK ||
            emit(z, x, xlen, err) != TF_OK)
            return err->status;
    }
    uint64_t cd_size = z->pos - cd_offset, z64_offset = z->pos, n = z->n_entries;
    uint8_t t[56 + 20 + 22];
    memset(t, 0, sizeof t);
    /* zip64 end of central directory record */
    tf_put32(t, ZW_SIG_Z64_EOCD);
    tf_put64(t + 4, 44);
    tf_put16(t + 12, 0x031E);
    tf_put16(t + 14, 0x002D);
    tf_put64(t + 24, n);
    tf_put64(t + 32, n);
    tf_put64(t + 40, cd_size);
    tf_put64(t + 48, cd_offset);
    /* zip64 locator */
    tf_put32(t + 56, ZW_SIG_Z64_LOC);
    tf_put64(t + 64, z64_offset);
    tf_put32(t + 72, 1);
    /* classic end record, saturated */
    uint8_t *eo = t + 76;
    tf_put32(eo, ZW_SIG_EOCD);
    tf_put16(eo + 8, (uint16_t)(n > 0xFFFF ? 0xFFFF : n));
    tf_put16(eo + 10, (uint16_t)(n > 0xFFFF ? 0xFFFF : n));
    tf_put32(eo + 12, cd_size > ZW_MAX32 ? ZW_MAX32 : (uint32_t)cd_size);
    tf_put32(eo + 16, cd_offset > ZW_MAX32 ? ZW_MAX32 : (uint32_t)cd_offset);
    if (emit(z, t, sizeof t, err) != TF_OK) return err->status;
    return zipwrite_flush(z, err);
}
