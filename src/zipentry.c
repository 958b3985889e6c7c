/* zipentry.c - one entry of a zip opened by zipread.c: its local header located and checked
 * against the central directory (zipread_locate), its bytes copied or inflated (zipread_extract).
 * Deflated entries are inflated from bounded input chunks straight into the caller's buffer; the
 * stream must end at exactly usize bytes. Python-free. */
#include "zipread_impl.h"

#include <stdlib.h>
#include <zlib.h>

/* ------------------------------------------------------------ local headers */

/* Byte j of the entry's full name "<prefix>/<name>". */
static char zr_full_name_byte(const ZipReader *z, const ZipEntry *e, size_t j) {
    if (j < z->prefix_len) return z->prefix[j];
    if (j == z->prefix_len) return '/';
    return e->name[j - z->prefix_len - 1];
}

TfStatus zipread_locate(ZipReader *z, ZipEntry *e, TfErr *err) {
    uint8_t buf[ZR_LOCAL_SIZE + 226];
    const uint64_t hoff = e->header_offset;
    const size_t idx = (size_t)(e - z->entries);
    const size_t full = z->prefix_len + 1 + e->name_len;
    uint64_t hend, data, dend;
    TfStatus st;

    if (e->data_offset != UINT64_MAX) return TF_OK;
    if (tf_add_u64(hoff, ZR_LOCAL_SIZE + (uint64_t)full, &hend) || hend > z->size)
        return tf_fail(err, TF_ERR_FORMAT, hoff,
                       "central directory entry %zu ('%.*s'): local header at offset %llu lies outside the file",
                       idx, ZR_NAME_SHOWN(e->name_len), e->name, (ull)hoff);
    /* One read for the header and, usually, the whole name (all of it in place from memory). */
    const uint8_t *h = buf;
    size_t first;
    if (z->mem != NULL) {
        h = z->mem + hoff;
        first = ZR_LOCAL_SIZE + full;
    } else {
        first = ZR_LOCAL_SIZE + (full < sizeof buf - ZR_LOCAL_SIZE ? full : sizeof buf - ZR_LOCAL_SIZE);
        if ((st = zr_read(z, hoff, buf, first, err)) != TF_OK) return st;
    }
    if (!zr_sig(h, ZR_SIG_LOCAL))
        return tf_fail(err, TF_ERR_FORMAT, hoff,
                       "central directory entry %zu ('%.*s'): no local header signature at offset %llu (found "
                       "0x%08x)",
                       idx, ZR_NAME_SHOWN(e->name_len), e->name, (ull)hoff, (unsigned)tf_le32(h));
    size_t nl = tf_le16(h + 26), xl = tf_le16(h + 28);
    if (nl != full)
        return tf_fail(err, TF_ERR_FORMAT, hoff,
                       "local header at offset %llu: name length %zu differs from the central directory entry "
                       "%zu ('%.*s', %zu bytes)",
                       (ull)hoff, nl, idx, ZR_NAME_SHOWN(e->name_len), e->name, full);
    /* The local name must be the central directory's name. */
    size_t have = first - ZR_LOCAL_SIZE, done = 0;
    const uint8_t *chunk = h + ZR_LOCAL_SIZE;
    if (have == full) { /* the usual case, whole name at hand: "<prefix>/<name>" */
        if ((z->prefix_len == 0 || memcmp(chunk, z->prefix, z->prefix_len) == 0) && chunk[z->prefix_len] == '/' &&
            memcmp(chunk + z->prefix_len + 1, e->name, e->name_len) == 0)
            done = have = full;
    }
    for (; done < full;) {
        for (size_t k = 0; k < have; k++)
            if ((char)chunk[k] != zr_full_name_byte(z, e, done + k))
                return tf_fail(err, TF_ERR_FORMAT, hoff,
                               "local header at offset %llu: name differs from central directory entry %zu "
                               "('%.*s')",
                               (ull)hoff, idx, ZR_NAME_SHOWN(e->name_len), e->name);
        done += have;
        if (done == full) break;
        have = full - done < sizeof buf ? full - done : sizeof buf;
        if ((st = zr_read(z, hoff + ZR_LOCAL_SIZE + done, buf, have, err)) != TF_OK) return st;
        chunk = buf;
    }
    if (tf_add_u64(hend, (uint64_t)xl, &data) || tf_add_u64(data, e->csize, &dend) || dend > z->size)
        return tf_fail(err, TF_ERR_FORMAT, hoff,
                       "central directory entry %zu ('%.*s'): data at offset %llu (+%llu bytes) from the local "
                       "header at %llu lies outside the file (%llu bytes)",
                       idx, ZR_NAME_SHOWN(e->name_len), e->name, (ull)data, (ull)e->csize, (ull)hoff,
                       (ull)z->size);
    if (e->flags & 1u)
        return tf_fail(err, TF_ERR_FORMAT, hoff, "entry %zu ('%.*s') is encrypted, which is not supported", idx,
                       ZR_NAME_SHOWN(e->name_len), e->name);
    if (dend > e->data_limit)
        return tf_fail(err, TF_ERR_FORMAT, hoff,
                       "central directory entry %zu ('%.*s'): data at offset %llu (+%llu bytes, after a local extra "
                       "field of %zu bytes) runs into the next record at %llu",
                       idx, ZR_NAME_SHOWN(e->name_len), e->name, (ull)data, (ull)e->csize, xl, (ull)e->data_limit);
    e->data_offset = data;
    return TF_OK;
}

/* ------------------------------------------------------------------ extract */

static TfStatus zr_inflate(ZipReader *z, ZipEntry *e, size_t idx, uint8_t *dst, TfErr *err) {
    z_stream s;
    uint8_t scratch[1];
    uint8_t *in = NULL;
    uint64_t in_off = e->data_offset, in_left = e->csize, out_done = 0;
    TfStatus st = TF_OK;
    int ret;

    memset(&s, 0, sizeof s);
    if (inflateInit2(&s, -15) != Z_OK)
        return tf_fail(err, TF_ERR_NOMEM, e->data_offset, "entry %zu ('%.*s'): cannot start zlib", idx,
                       ZR_NAME_SHOWN(e->name_len), e->name);
    in = (uint8_t *)malloc(ZR_INFLATE_CHUNK);
    if (!in) {
        inflateEnd(&s);
        return tf_fail(err, TF_ERR_NOMEM, e->data_offset, "out of memory for the inflate buffer");
    }
    for (;;) {
        if (s.avail_in == 0 && in_left > 0) {
            size_t n = in_left < ZR_INFLATE_CHUNK ? (size_t)in_left : ZR_INFLATE_CHUNK;
            if ((st = zr_read(z, in_off, in, n, err)) != TF_OK) break;
            in_off += n;
            in_left -= n;
            s.next_in = in;
            s.avail_in = (uInt)n;
        }
        /* Once usize bytes are out, offer one spare byte: the stream must end
         * without producing it. */
        int spare = out_done == e->usize;
        if (spare) {
            s.next_out = scratch;
            s.avail_out = 1;
        } else {
            uint64_t left = e->usize - out_done;
            s.next_out = dst + out_done;
            s.avail_out = (uInt)(left < ZR_INFLATE_OUT_MAX ? left : ZR_INFLATE_OUT_MAX);
        }
        uInt before_out = s.avail_out;
        ret = inflate(&s, Z_NO_FLUSH);
        uint64_t here = in_off - s.avail_in;
        if (spare) {
            if (s.avail_out != before_out) {
                st = tf_fail(err, TF_ERR_FORMAT, here,
                             "entry %zu ('%.*s'): deflate stream inflates to more than the declared %llu bytes",
                             idx, ZR_NAME_SHOWN(e->name_len), e->name, (ull)e->usize);
                break;
            }
        } else {
            out_done += before_out - s.avail_out;
        }
        if (ret == Z_STREAM_END) {
            if (out_done != e->usize)
                st = tf_fail(err, TF_ERR_FORMAT, here,
                             "entry %zu ('%.*s'): deflate stream ends after %llu of the declared %llu bytes", idx,
                             ZR_NAME_SHOWN(e->name_len), e->name, (ull)out_done, (ull)e->usize);
            break;
        }
        if (ret == Z_OK) continue;
        if (ret == Z_BUF_ERROR && s.avail_in == 0 && in_left > 0) continue;
        if (ret == Z_BUF_ERROR && s.avail_in == 0) {
            st = tf_fail(err, TF_ERR_FORMAT, here,
                         "entry %zu ('%.*s'): compressed data (%llu bytes) ends before the deflate stream does", idx,
                         ZR_NAME_SHOWN(e->name_len), e->name, (ull)e->csize);
            break;
        }
        if (ret == Z_MEM_ERROR) {
            st = tf_fail(err, TF_ERR_NOMEM, here, "out of memory while inflating entry %zu", idx);
            break;
        }
        st = tf_fail(err, TF_ERR_FORMAT, here, "entry %zu ('%.*s'): corrupt deflate data (%s)", idx,
                     ZR_NAME_SHOWN(e->name_len), e->name, s.msg ? s.msg : "zlib error");
        break;
    }
    inflateEnd(&s);
    free(in);
    return st;
}

TfStatus zipread_extract(ZipReader *z, ZipEntry *e, uint8_t *dst, TfErr *err) {
    const size_t idx = (size_t)(e - z->entries);
    TfStatus st;
    if ((st = zipread_locate(z, e, err)) != TF_OK) return st;
    if (e->flags & 1u)
        return tf_fail(err, TF_ERR_FORMAT, e->header_offset, "entry %zu ('%.*s') is encrypted, which is not supported",
                       idx, ZR_NAME_SHOWN(e->name_len), e->name);
    if (e->usize > SIZE_MAX)
        return tf_fail(err, TF_ERR_NOMEM, e->header_offset, "entry %zu ('%.*s') of %llu bytes does not fit in memory",
                       idx, ZR_NAME_SHOWN(e->name_len), e->name, (ull)e->usize);
    if (e->method == 0) {
        if (e->csize != e->usize)
            return tf_fail(err, TF_ERR_FORMAT, e->header_offset,
                           "entry %zu ('%.*s'): stored entry with compressed size %llu != uncompressed size %llu", idx,
                           ZR_NAME_SHOWN(e->name_len), e->name, (ull)e->csize, (ull)e->usize);
        return zr_read(z, e->data_offset, dst, (size_t)e->usize, err);
    }
    if (e->method == 8) return zr_inflate(z, e, idx, dst, err);
    return tf_fail(err, TF_ERR_FORMAT, e->header_offset,
                   "entry %zu ('%.*s'): compression method %u is not supported (only 0 stored and 8 deflated)", idx,
                   ZR_NAME_SHOWN(e->name_len), e->name, (unsigned)e->method);
}
