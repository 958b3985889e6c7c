/* zipread.c - Python-free reader for the zip container torch.save writes.
 *
 * Layout handled (spec section 2.4): local headers + data, central directory,
 * optional zip64 end record and locator, classic end record. Everything read
 * from the input is checked before it is used: every offset and length goes
 * through checked arithmetic and is compared with the input size before any
 * read or allocation. No allocation is larger than a small multiple of the
 * central directory, which itself has been proven to lie inside the input.
 *
 * This file opens the archive (end record, central directory, the name index);
 * zipentry.c reads one entry's local header and bytes. */
#include "zipread_impl.h"

#include <stdlib.h>

/* FNV-1a over the bytes, then the murmur3 finalizer so the low bits (used as
 * the bucket) depend on every input byte. */
static uint64_t zr_hash(const char *s, size_t n) {
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= UINT64_C(0x100000001b3);
    }
    h ^= h >> 33;
    h *= UINT64_C(0xff51afd7ed558ccd);
    h ^= h >> 33;
    h *= UINT64_C(0xc4ceb9fe1a85ec53);
    h ^= h >> 33;
    return h;
}

static int zr_name_eq(const ZipEntry *e, const char *name, size_t n) {
    return e->name_len == n && (n == 0 || memcmp(e->name, name, n) == 0);
}

/* --------------------------------------------------------------- end record */

typedef struct {
    uint64_t n_entries;
    uint64_t cd_size;
    uint64_t cd_offset; /* as claimed by the record, relative to the zip start */
    uint64_t end_pos;   /* absolute offset where the central directory must end */
    int zip64;
} ZrEnd;

/* Find and read the zip64 end record whose locator sits at loc_pos. */
static TfStatus zr_read_zip64(const ZipReader *z, uint64_t loc_pos, const uint8_t *loc, ZrEnd *end,
                              TfErr *err) {
    uint32_t loc_disk = tf_le32(loc + 4);
    uint64_t claimed = tf_le64(loc + 8);
    uint32_t disks = tf_le32(loc + 16);
    uint8_t r[ZR_Z64_EOCD_SIZE];
    uint64_t pos = UINT64_MAX;
    TfStatus st;

    if (loc_disk != 0 || disks > 1)
        return tf_fail(err, TF_ERR_FORMAT, loc_pos,
                       "zip64 end of central directory locator at offset %llu: archives spanning several "
                       "disks are not supported (disk %u of %u)",
                       (ull)loc_pos, (unsigned)loc_disk, (unsigned)disks);

    /* Usual case: the record (without extensible data) ends where the locator
     * starts. This also works when the zip starts after other bytes, where the
     * claimed offset is off by that amount. */
    if (loc_pos >= ZR_Z64_EOCD_SIZE) {
        uint64_t cand = loc_pos - ZR_Z64_EOCD_SIZE;
        if ((st = zr_read(z, cand, r, sizeof r, err)) != TF_OK) return st;
        if (zr_sig(r, ZR_SIG_Z64_EOCD) && tf_le64(r + 4) == ZR_Z64_EOCD_SIZE - 12) pos = cand;
    }
    /* Otherwise trust the claimed offset, if a record that ends at the locator is there. */
    if (pos == UINT64_MAX && claimed < loc_pos && loc_pos - claimed >= ZR_Z64_EOCD_SIZE) {
        uint64_t rec_end;
        if ((st = zr_read(z, claimed, r, sizeof r, err)) != TF_OK) return st;
        if (zr_sig(r, ZR_SIG_Z64_EOCD) && !tf_add_u64(tf_le64(r + 4), 12 + claimed, &rec_end) &&
            rec_end == loc_pos)
            pos = claimed;
    }
    if (pos == UINT64_MAX)
        return tf_fail(err, TF_ERR_FORMAT, loc_pos,
                       "zip64 end of central directory locator at offset %llu: no zip64 end of central "
                       "directory record before it (the locator claims offset %llu)",
                       (ull)loc_pos, (ull)claimed);

    uint32_t disk = tf_le32(r + 16), cd_disk = tf_le32(r + 20);
    uint64_t n_disk = tf_le64(r + 24), n_total = tf_le64(r + 32);
    if (disk != 0 || cd_disk != 0 || n_disk != n_total)
        return tf_fail(err, TF_ERR_FORMAT, pos,
                       "zip64 end of central directory record at offset %llu: archives spanning several "
                       "disks are not supported (disk %u, directory disk %u, %llu of %llu entries)",
                       (ull)pos, (unsigned)disk, (unsigned)cd_disk, (ull)n_disk, (ull)n_total);
    end->n_entries = n_total;
    end->cd_size = tf_le64(r + 40);
    end->cd_offset = tf_le64(r + 48);
    end->end_pos = pos;
    end->zip64 = 1;
    return TF_OK;
}

static TfStatus zr_find_end(const ZipReader *z, ZrEnd *end, TfErr *err) {
    const uint64_t max_tail = ZR_EOCD_SIZE + ZR_MAX_COMMENT;
    uint64_t tail_len, tail_start, eocd_pos;
    uint8_t *tail;
    size_t i, exact = SIZE_MAX, loose = SIZE_MAX, found;
    TfStatus st;

    if (z->size < ZR_EOCD_SIZE)
        return tf_fail(err, TF_ERR_FORMAT, 0, "input of %llu bytes is too small to be a zip archive", (ull)z->size);
    /* First the last 42 bytes (an end record without comment, and the zip64
     * locator before it: every torch file), so that a small archive is not
     * read whole; then the largest window a comment allows. */
    for (int attempt = 0;; attempt++) {
        uint64_t want = attempt == 0 ? ZR_EOCD_SIZE + ZR_Z64_LOC_SIZE : max_tail;
        tail_len = z->size < want ? z->size : want;
        tail_start = z->size - tail_len;
        tail = (uint8_t *)malloc((size_t)tail_len);
        if (!tail) return tf_fail(err, TF_ERR_NOMEM, 0, "out of memory reading the end of the archive");
        if ((st = zr_read(z, tail_start, tail, (size_t)tail_len, err)) != TF_OK) {
            free(tail);
            return st;
        }
        /* Search back from the end. Prefer a record whose comment ends exactly at
         * the end of the input; else take the last one whose comment fits (bytes
         * appended after the archive). */
        exact = loose = SIZE_MAX;
        for (i = (size_t)tail_len - ZR_EOCD_SIZE + 1; i-- > 0;) {
            if (tail[i] != 'P' || !zr_sig(tail + i, ZR_SIG_EOCD)) continue;
            size_t room = (size_t)tail_len - i - ZR_EOCD_SIZE;
            size_t clen = tf_le16(tail + i + 20);
            if (clen == room) {
                exact = i;
                break;
            }
            if (clen < room && loose == SIZE_MAX) loose = i;
        }
        found = exact != SIZE_MAX ? exact : loose;
        if ((attempt == 0 && exact != SIZE_MAX) || attempt == 1 || tail_len == z->size) break;
        free(tail);
    }
    if (found == SIZE_MAX) {
        free(tail);
        return tf_fail(err, TF_ERR_FORMAT, tail_start,
                       "no end of central directory record in the last %llu bytes: not a zip archive, or "
                       "truncated",
                       (ull)tail_len);
    }
    eocd_pos = tail_start + found;

    const uint8_t *r = tail + found;
    uint16_t disk = tf_le16(r + 4), cd_disk = tf_le16(r + 6), n_disk = tf_le16(r + 8), n_total = tf_le16(r + 10);
    uint32_t cd_size = tf_le32(r + 12), cd_off = tf_le32(r + 16);

    /* Zip64 locator right before the end record? */
    uint8_t loc[ZR_Z64_LOC_SIZE];
    int have_loc = 0;
    if (eocd_pos >= ZR_Z64_LOC_SIZE) {
        if (found >= ZR_Z64_LOC_SIZE) {
            memcpy(loc, tail + found - ZR_Z64_LOC_SIZE, sizeof loc);
        } else if ((st = zr_read(z, eocd_pos - ZR_Z64_LOC_SIZE, loc, sizeof loc, err)) != TF_OK) {
            free(tail);
            return st;
        }
        have_loc = zr_sig(loc, ZR_SIG_Z64_LOC);
    }
    free(tail);

    if (have_loc) return zr_read_zip64(z, eocd_pos - ZR_Z64_LOC_SIZE, loc, end, err);

    if (cd_size == ZR_SAT32 || cd_off == ZR_SAT32 || disk == ZR_SAT16 || cd_disk == ZR_SAT16)
        return tf_fail(err, TF_ERR_FORMAT, eocd_pos,
                       "end of central directory record at offset %llu: fields are saturated (zip64) but no "
                       "zip64 end of central directory locator precedes it",
                       (ull)eocd_pos);
    if (disk != 0 || cd_disk != 0 || n_disk != n_total)
        return tf_fail(err, TF_ERR_FORMAT, eocd_pos,
                       "end of central directory record at offset %llu: archives spanning several disks are "
                       "not supported (disk %u, directory disk %u, %u of %u entries)",
                       (ull)eocd_pos, (unsigned)disk, (unsigned)cd_disk, (unsigned)n_disk, (unsigned)n_total);
    end->n_entries = n_total;
    end->cd_size = cd_size;
    end->cd_offset = cd_off;
    end->end_pos = eocd_pos;
    end->zip64 = 0;
    return TF_OK;
}

/* ------------------------------------------------------- central directory */

/* A window over the central directory [cd_pos, cd_pos + cd_size), so that a
 * big directory is parsed without holding a copy of all of it. */
typedef struct {
    uint8_t *buf;
    size_t cap;
    size_t start; /* directory-relative offset of buf[0] */
    size_t len;
} ZrWindow;

/* Point *out at directory bytes [p, p + need); the caller has checked that
 * they lie inside the directory and need <= cap. */
static inline TfStatus zr_window_get(const ZipReader *z, ZrWindow *w, uint64_t cd_pos, size_t cdn, size_t p,
                                     size_t need, const uint8_t **out, TfErr *err) {
    if (z->mem != NULL) { /* in place: the directory lies inside the input */
        *out = z->mem + cd_pos + p;
        return TF_OK;
    }
    if (TF_UNLIKELY(p < w->start || p - w->start > w->len || w->len - (p - w->start) < need)) {
        size_t len = cdn - p < w->cap ? cdn - p : w->cap;
        TfStatus st = zr_read(z, cd_pos + p, w->buf, len, err);
        if (st != TF_OK) return st;
        w->start = p;
        w->len = len;
    }
    *out = w->buf + (p - w->start);
    return TF_OK;
}

/* Apply the zip64 extra field (id 1) of a central-directory entry: an 8-byte
 * value for each of usize, csize, header offset whose 32-bit field is
 * saturated, in that order. Other extra fields are skipped. */
static TfStatus zr_zip64_extra(const uint8_t *x, size_t xl, uint64_t *usize, uint64_t *csize, uint64_t *hoff,
                               size_t idx, uint64_t ent_off, TfErr *err) {
    int seen = 0;
    size_t p = 0;
    while (xl - p >= 4) {
        uint16_t id = tf_le16(x + p), len = tf_le16(x + p + 2);
        const uint8_t *d = x + p + 4;
        if (len > xl - p - 4)
            return tf_fail(err, TF_ERR_FORMAT, ent_off,
                           "central directory entry %zu at offset %llu: extra field 0x%04x of %u bytes runs "
                           "past the end of the extra data",
                           idx, (ull)ent_off, (unsigned)id, (unsigned)len);
        if (id == ZR_Z64_EXTRA_ID) {
            size_t q = 0;
            uint64_t *fields[3] = {usize, csize, hoff};
            static const char *const names[3] = {"uncompressed size", "compressed size", "local header offset"};
            if (seen)
                return tf_fail(err, TF_ERR_FORMAT, ent_off,
                               "central directory entry %zu at offset %llu: two zip64 extra fields", idx,
                               (ull)ent_off);
            seen = 1;
            for (int k = 0; k < 3; k++) {
                if (*fields[k] != ZR_SAT32) continue;
                if (len - q < 8)
                    return tf_fail(err, TF_ERR_FORMAT, ent_off,
                                   "central directory entry %zu at offset %llu: zip64 extra field of %u bytes "
                                   "lacks the %s",
                                   idx, (ull)ent_off, (unsigned)len, names[k]);
                *fields[k] = tf_le64(d + q);
                q += 8;
            }
        }
        p += 4 + (size_t)len;
    }
    return TF_OK;
}

/* Records must not share bytes. Sort the local headers by offset; each
 * record's fixed header and data must end by the next header, which becomes
 * its data_limit (checked again by zipread_locate once the local name and
 * extra field are known). Honest archives are laid out one record after the
 * other; overlapping ones are how "better zip bombs" make one compressed
 * kernel count once per entry, and how one byte range could be copied once
 * per entry naming it. */
typedef struct {
    uint64_t off;
    size_t idx;
} ZrSpan;

static int zr_span_cmp(const void *a, const void *b) {
    const ZrSpan *x = (const ZrSpan *)a, *y = (const ZrSpan *)b;
    return x->off < y->off ? -1 : x->off > y->off ? 1 : (x->idx > y->idx) - (x->idx < y->idx);
}

static TfStatus zr_check_overlap(ZipReader *z, uint64_t cd_pos, TfErr *err) {
    const size_t n = z->n_entries;
    ZrSpan *sp = (ZrSpan *)malloc(n * sizeof(ZrSpan));
    if (!sp) return tf_fail(err, TF_ERR_NOMEM, cd_pos, "out of memory checking %zu entries", n);
    for (size_t i = 0; i < n; i++) {
        sp[i].off = z->entries[i].header_offset;
        sp[i].idx = i;
    }
    /* torch writes records in file order: sort only when the directory is not */
    int sorted = 1;
    for (size_t i = 1; i < n && sorted; i++) sorted = sp[i - 1].off < sp[i].off;
    if (!sorted) qsort(sp, n, sizeof(ZrSpan), zr_span_cmp);
    TfStatus st = TF_OK;
    for (size_t k = 0; k < n; k++) {
        ZipEntry *e = &z->entries[sp[k].idx];
        uint64_t limit = k + 1 < n ? sp[k + 1].off : cd_pos, end;
        /* fixed header + data (the sum was checked against cd_pos at open); the
         * names are left to zipread_locate, which compares the local one with
         * ours first and reports a mismatch as such */
        end = e->header_offset + ZR_LOCAL_SIZE + e->csize;
        if (end > limit) {
            const ZipEntry *o = k + 1 < n ? &z->entries[sp[k + 1].idx] : NULL;
            st = tf_fail(err, TF_ERR_FORMAT, e->header_offset,
                         "entry %zu ('%.*s', local header at %llu, %llu bytes of data) overlaps %s%.*s%s at offset "
                         "%llu: records must not share bytes",
                         sp[k].idx, ZR_NAME_SHOWN(e->name_len), e->name, (ull)e->header_offset, (ull)e->csize,
                         o ? "entry '" : "the central directory", o ? ZR_NAME_SHOWN(o->name_len) : 0,
                         o ? o->name : "", o ? "'" : "", (ull)limit);
            break;
        }
        e->data_limit = limit;
    }
    free(sp);
    return st;
}

static TfStatus zr_build_index(ZipReader *z, TfErr *err) {
    size_t cap = 8;
    while (cap < 2 * z->n_entries) cap <<= 1;
    z->index = (uint32_t *)calloc(cap, sizeof(uint32_t));
    if (!z->index) return tf_fail(err, TF_ERR_NOMEM, 0, "out of memory for the index of %zu entries", z->n_entries);
    z->index_cap = cap;
    const size_t mask = cap - 1;
    for (size_t i = 0; i < z->n_entries; i++) {
        const ZipEntry *e = &z->entries[i];
        size_t pos = (size_t)zr_hash(e->name, e->name_len) & mask;
        for (size_t step = 1;; step++) {
            uint32_t slot = z->index[pos];
            if (slot == 0) {
                z->index[pos] = (uint32_t)(i + 1);
                break;
            }
            const ZipEntry *o = &z->entries[slot - 1];
            if (zr_name_eq(o, e->name, e->name_len))
                return tf_fail(err, TF_ERR_FORMAT, e->header_offset,
                               "central directory entry %zu (local header at %llu): duplicate name '%s/%.*s' "
                               "(also entry %u)",
                               i, (ull)e->header_offset, z->prefix, ZR_NAME_SHOWN(e->name_len), e->name,
                               (unsigned)(slot - 1));
            if (step >= ZR_MAX_PROBES)
                return tf_fail(err, TF_ERR_FORMAT, e->header_offset,
                               "central directory entry %zu (local header at %llu): too many entry names collide in "
                               "the hash index (crafted names?)",
                               i, (ull)e->header_offset);
            pos = (pos + step) & mask; /* triangular probing visits every slot */
        }
    }
    return TF_OK;
}

static TfStatus zr_mem_read_at(void *ctx, uint64_t off, void *buf, size_t n, TfErr *err) {
    (void)err; /* zr_read checked the span against the input's size */
    memcpy(buf, (const uint8_t *)ctx + off, n);
    return TF_OK;
}

/* The end record's claims against the file: *cd_pos (where the directory starts), z->base and
 * *min_cd (the directory's least size for its entry count). */
static TfStatus zr_check_end(ZipReader *z, const ZrEnd *e, const TfLimits *lim, uint64_t *cd_pos_out,
                             uint64_t *min_cd_out, TfErr *err) {
    const ZrEnd end = *e;
    uint64_t cd_pos, n, min_cd;
    TfStatus st;
    const char *rec = end.zip64 ? "zip64 end of central directory record" : "end of central directory record";

    /* The central directory ends where the end record starts; its claimed
     * offset then tells where the zip starts (base). */
    if (end.cd_size > end.end_pos) {
        st = tf_fail(err, TF_ERR_FORMAT, end.end_pos,
                     "%s at offset %llu: central directory size %llu is larger than the bytes before the record",
                     rec, (ull)end.end_pos, (ull)end.cd_size);
        return st;
    }
    cd_pos = end.end_pos - end.cd_size;
    if (end.cd_offset > cd_pos) {
        st = tf_fail(err, TF_ERR_FORMAT, end.end_pos,
                     "%s at offset %llu: central directory offset %llu (size %llu) lies past where the "
                     "directory actually starts (%llu): truncated or corrupt archive",
                     rec, (ull)end.end_pos, (ull)end.cd_offset, (ull)end.cd_size, (ull)cd_pos);
        return st;
    }
    z->base = cd_pos - end.cd_offset;
    n = end.n_entries;
    if (n == 0) {
        st = tf_fail(err, TF_ERR_FORMAT, end.end_pos, "%s at offset %llu: the archive has no entries", rec,
                     (ull)end.end_pos);
        return st;
    }
    if (tf_mul_u64(n, ZR_CENTRAL_SIZE, &min_cd) || min_cd > end.cd_size) {
        st = tf_fail(err, TF_ERR_FORMAT, end.end_pos,
                     "%s at offset %llu: %llu entries cannot fit in a central directory of %llu bytes", rec,
                     (ull)end.end_pos, (ull)n, (ull)end.cd_size);
        return st;
    }
    if (n > lim->records || n >= UINT32_MAX) {
        st = tf_fail(err, TF_ERR_LIMIT, end.end_pos, "archive has %llu entries, more than the limit of %llu",
                     (ull)n, (ull)(lim->records < UINT32_MAX - 1 ? lim->records : UINT32_MAX - 1));
        return st;
    }
    if (end.cd_size > SIZE_MAX / 2 || n > SIZE_MAX / sizeof(ZipEntry)) {
        st = tf_fail(err, TF_ERR_NOMEM, cd_pos, "central directory of %llu bytes does not fit in memory",
                     (ull)end.cd_size);
        return st;
    }
    *cd_pos_out = cd_pos;
    *min_cd_out = min_cd;
    return TF_OK;
}

/* The top folder: from the first entry; every entry must share it. */
static TfStatus zr_entry_prefix(ZipReader *z, size_t i, const char *name, size_t nl, uint64_t ent_off, TfErr *err) {
    TfStatus st;
    if (i == 0) {
        const char *slash = nl ? (const char *)memchr(name, '/', nl) : NULL;
        if (!slash) {
            st = tf_fail(err, TF_ERR_FORMAT, ent_off,
                         "central directory entry 0 at offset %llu: file in archive is not in a "
                         "subdirectory: '%.*s'",
                         (ull)ent_off, ZR_NAME_SHOWN(nl), name);
            return st;
        }
        z->prefix_len = (size_t)(slash - name);
        z->prefix = (char *)malloc(z->prefix_len + 1);
        if (!z->prefix) {
            st = tf_fail(err, TF_ERR_NOMEM, ent_off, "out of memory");
            return st;
        }
        memcpy(z->prefix, name, z->prefix_len);
        z->prefix[z->prefix_len] = '\0';
    } else if (nl <= z->prefix_len || name[z->prefix_len] != '/' ||
               memcmp(name, z->prefix, z->prefix_len) != 0) {
        st = tf_fail(err, TF_ERR_FORMAT, ent_off,
                     "central directory entry %zu at offset %llu: name '%.*s' is not under the archive's "
                     "top folder '%s/'",
                     i, (ull)ent_off, ZR_NAME_SHOWN(nl), name, z->prefix);
        return st;
    }

    return TF_OK;
}

/* Where entry i's local header lies (*habs), checked, and its method and sizes. */
static TfStatus zr_entry_bounds(const ZipReader *z, size_t i, uint64_t ent_off, const char *name, size_t nl,
                                uint16_t method, uint64_t csize, uint64_t usize, uint64_t hoff, uint64_t cd_pos,
                                uint64_t *habs_out, TfErr *err) {
    TfStatus st;
    /* Local header (30 bytes + the same name) and data must lie between the
     * zip start and the central directory. */
    uint64_t habs, hend;
    if (tf_add_u64(hoff, z->base, &habs) || tf_add_u64(habs, ZR_LOCAL_SIZE + (uint64_t)nl, &hend) ||
        tf_add_u64(hend, csize, &hend) || hend > cd_pos) {
        st = tf_fail(err, TF_ERR_FORMAT, ent_off,
                     "central directory entry %zu at offset %llu: local header at %llu (+ base %llu) with "
                     "%llu bytes of data lies outside the file or overlaps the central directory at %llu",
                     i, (ull)ent_off, (ull)hoff, (ull)z->base, (ull)csize, (ull)cd_pos);
        return st;
    }
    /* Only stored and deflated entries can be read; refusing the rest here
     * means every usize that open accepts is bounded by the input (stored:
     * usize == csize; deflated: at most 1032:1), so callers may size
     * buffers from it. */
    if (method != 0 && method != 8) {
        st = tf_fail(err, TF_ERR_FORMAT, ent_off,
                     "central directory entry %zu at offset %llu ('%.*s'): compression method %u is not "
                     "supported (only 0 stored and 8 deflated)",
                     i, (ull)ent_off, ZR_NAME_SHOWN(nl), name, (unsigned)method);
        return st;
    }
    if (method == 0 && csize != usize) {
        st = tf_fail(err, TF_ERR_FORMAT, ent_off,
                     "central directory entry %zu at offset %llu: stored entry with compressed size %llu "
                     "!= uncompressed size %llu",
                     i, (ull)ent_off, (ull)csize, (ull)usize);
        return st;
    }
    if (method == 8) {
        uint64_t bound;
        if (tf_mul_u64(csize + ZR_DEFLATE_SLACK, ZR_DEFLATE_MAX_RATIO, &bound) || usize > bound) {
            st = tf_fail(err, TF_ERR_FORMAT, ent_off,
                         "central directory entry %zu at offset %llu: deflated entry claims %llu bytes from "
                         "%llu compressed bytes, beyond deflate's maximum ratio",
                         i, (ull)ent_off, (ull)usize, (ull)csize);
            return st;
        }
    }

    *habs_out = habs;
    return TF_OK;
}

/* Central directory entry i, at p bytes into the directory: checked and put in z->entries[i]
 * (its name in z->names at *names_used); *p moves past it. */
static TfStatus zr_entry(ZipReader *z, ZrWindow *win, uint64_t cd_pos, size_t cdn, size_t *p, size_t i,
                         const TfLimits *lim, size_t *names_used, TfErr *err) {
    TfStatus st;
    const uint64_t ent_off = cd_pos + *p;
    const uint8_t *h;
    if (cdn - *p < ZR_CENTRAL_SIZE) {
        st = tf_fail(err, TF_ERR_FORMAT, ent_off,
                     "central directory entry %zu at offset %llu: truncated (%zu bytes left, 46 needed)", i,
                     (ull)ent_off, cdn - *p);
        return st;
    }
    if ((st = zr_window_get(z, win, cd_pos, cdn, *p, ZR_CENTRAL_SIZE, &h, err)) != TF_OK) return st;
    if (!zr_sig(h, ZR_SIG_CENTRAL)) {
        st = tf_fail(err, TF_ERR_FORMAT, ent_off,
                     "central directory entry %zu at offset %llu: bad signature 0x%08x", i, (ull)ent_off,
                     (unsigned)tf_le32(h));
        return st;
    }
    uint16_t flags = tf_le16(h + 8), method = tf_le16(h + 10);
    uint32_t crc = tf_le32(h + 16);
    uint64_t csize = tf_le32(h + 20), usize = tf_le32(h + 24), hoff = tf_le32(h + 42);
    size_t nl = tf_le16(h + 28), xl = tf_le16(h + 30), cl = tf_le16(h + 32);
    /* The fixed 46 bytes of every entry still to come stay reserved: the
     * name block (sized from the directory minus n fixed headers) then
     * always holds the names (found by fuzzing: a zip64 record whose
     * directory holds fewer, longer-named entries than it claims). */
    const size_t reserved = (z->n_entries - i - 1) * ZR_CENTRAL_SIZE; /* <= cdn - *p - 46 by induction */
    if (cdn - *p - ZR_CENTRAL_SIZE - reserved < nl + xl + cl) {
        st = tf_fail(err, TF_ERR_FORMAT, ent_off,
                     "central directory entry %zu at offset %llu: name, extra and comment (%zu+%zu+%zu "
                     "bytes) run past the end of the central directory (%zu more entries to come)",
                     i, (ull)ent_off, nl, xl, cl, z->n_entries - i - 1);
        return st;
    }
    if ((st = zr_window_get(z, win, cd_pos, cdn, *p, ZR_CENTRAL_SIZE + nl + xl + cl, &h, err)) != TF_OK)
        return st;
    const char *name = (const char *)(h + ZR_CENTRAL_SIZE);
    if (nl > lim->name) {
        st = tf_fail(err, TF_ERR_LIMIT, ent_off,
                     "central directory entry %zu at offset %llu: name of %zu bytes is longer than the "
                     "limit of %llu",
                     i, (ull)ent_off, nl, (ull)lim->name);
        return st;
    }
    if (nl && memchr(name, 0, nl)) {
        st = tf_fail(err, TF_ERR_FORMAT, ent_off,
                     "central directory entry %zu at offset %llu: name contains a NUL byte", i, (ull)ent_off);
        return st;
    }
    if ((st = zr_zip64_extra(h + ZR_CENTRAL_SIZE + nl, xl, &usize, &csize, &hoff, i, ent_off, err)) != TF_OK)
        return st;

    if ((st = zr_entry_prefix(z, i, name, nl, ent_off, err)) != TF_OK) return st;

    uint64_t habs = 0;
    if ((st = zr_entry_bounds(z, i, ent_off, name, nl, method, csize, usize, hoff, cd_pos, &habs, err)) != TF_OK)
        return st;

    ZipEntry *e = &z->entries[i];
    size_t sl = nl - z->prefix_len - 1;
    e->name = z->names + (*names_used);
    e->name_len = (uint32_t)sl;
    memcpy(z->names + (*names_used), name + z->prefix_len + 1, sl);
    z->names[(*names_used) + sl] = '\0';
    (*names_used) += sl + 1;
    e->method = method;
    e->flags = flags;
    e->crc32 = crc;
    e->csize = csize;
    e->usize = usize;
    e->header_offset = habs;
    e->data_offset = UINT64_MAX;
    e->user = NULL;
    e->data_limit = cd_pos;
    *p += ZR_CENTRAL_SIZE + nl + xl + cl;
    return TF_OK;
}

static TfStatus zr_open(ZipReader *z, TfReadAt read_at, void *ctx, const uint8_t *mem, uint64_t size,
                        const TfLimits *lim, TfErr *err);

TfStatus zipread_open(ZipReader *z, TfReadAt read_at, void *ctx, uint64_t size, const TfLimits *lim,
                      TfErr *err) {
    return zr_open(z, read_at, ctx, NULL, size, lim, err);
}

TfStatus zipread_open_mem(ZipReader *z, const uint8_t *mem, uint64_t size, const TfLimits *lim, TfErr *err) {
    return zr_open(z, zr_mem_read_at, (void *)(uintptr_t)mem, mem, size, lim, err);
}

static TfStatus zr_open(ZipReader *z, TfReadAt read_at, void *ctx, const uint8_t *mem, uint64_t size,
                        const TfLimits *lim, TfErr *err) {
    static const TfLimits defaults = TF_LIMITS_DEFAULT;
    ZrEnd end = {0, 0, 0, 0, 0};
    ZrWindow win = {NULL, 0, 0, 0};
    uint64_t cd_pos = 0, n, min_cd = 0;
    size_t cdn, names_cap, names_used = 0, p = 0;
    TfStatus st;

    memset(z, 0, sizeof *z);
    z->read_at = read_at;
    z->ctx = ctx;
    z->mem = mem;
    z->size = size;
    if (!lim) lim = &defaults;

    if ((st = zr_find_end(z, &end, err)) != TF_OK) goto fail;
    const char *rec = end.zip64 ? "zip64 end of central directory record" : "end of central directory record";

    if ((st = zr_check_end(z, &end, lim, &cd_pos, &min_cd, err)) != TF_OK) goto fail;
    n = end.n_entries;
    cdn = (size_t)end.cd_size;
    z->n_entries = (size_t)n;

    /* Allocations below are bounded by the central directory, which lies
     * inside the input: entries (56 bytes per >= 46 bytes of directory) and
     * one name block (each stored name + NUL is no longer than its full name
     * plus one byte). */
    win.cap = cdn < ZR_CD_WINDOW ? cdn : ZR_CD_WINDOW;
    win.buf = (uint8_t *)malloc(z->mem != NULL ? 1 : win.cap); /* unused when in memory */
    z->entries = (ZipEntry *)malloc(z->n_entries * sizeof(ZipEntry));
    names_cap = cdn - (size_t)min_cd + z->n_entries;
    z->names = (char *)malloc(names_cap);
    if (!win.buf || !z->entries || !z->names) {
        st = tf_fail(err, TF_ERR_NOMEM, cd_pos, "out of memory for a central directory of %zu entries",
                     z->n_entries);
        goto fail;
    }

    for (size_t i = 0; i < z->n_entries; i++) {
        if ((st = zr_entry(z, &win, cd_pos, cdn, &p, i, lim, &names_used, err)) != TF_OK) goto fail;
    }
    if (p != cdn) {
        st = tf_fail(err, TF_ERR_FORMAT, cd_pos + p,
                     "%s: central directory of %zu bytes has %zu bytes left after its %zu entries", rec, cdn,
                     cdn - p, z->n_entries);
        goto fail;
    }
    free(win.buf);
    win.buf = NULL;
    if ((st = zr_build_index(z, err)) != TF_OK) goto fail;
    if ((st = zr_check_overlap(z, cd_pos, err)) != TF_OK) goto fail;
    return TF_OK;

fail:
    free(win.buf);
    zipread_close(z);
    return st;
}

void zipread_close(ZipReader *z) {
    if (!z) return;
    free(z->prefix);
    free(z->entries);
    free(z->names);
    free(z->index);
    z->prefix = NULL;
    z->prefix_len = 0;
    z->entries = NULL;
    z->n_entries = 0;
    z->names = NULL;
    z->index = NULL;
    z->index_cap = 0;
}

int zipread_is_zip(const uint8_t *first4, size_t n) {
    return n >= 4 && first4 && zr_sig(first4, ZR_SIG_LOCAL);
}

ZipEntry *zipread_find(const ZipReader *z, const char *name, size_t name_len) {
    if (!z->index || z->index_cap == 0 || (name_len && !name)) return NULL;
    const size_t mask = z->index_cap - 1;
    size_t pos = (size_t)zr_hash(name, name_len) & mask;
    for (size_t step = 1; step <= ZR_MAX_PROBES; step++) {
        uint32_t slot = z->index[pos];
        if (slot == 0) return NULL;
        ZipEntry *e = &z->entries[slot - 1];
        if (zr_name_eq(e, name, name_len)) return e;
        pos = (pos + step) & mask;
    }
    return NULL;
}

