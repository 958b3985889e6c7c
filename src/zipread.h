/* zipread.h - Python-free reader for the zip container torch.save writes.
 *
 * The input is reached only through a read_at callback (a memcpy from a mapping,
 * or pread on a file descriptor), so the same code serves mmap, bytes and
 * copy-from-file loads. Every size and offset read from the file is checked
 * against the input size before it is used or allocated. */
#ifndef TORCHFREE_ZIPREAD_H
#define TORCHFREE_ZIPREAD_H

#include "common.h"
#include "limits.h"

/* Read exactly n bytes at absolute offset off of the input into buf.
 * Return TF_OK, or fill err and return its status. */
typedef TfStatus (*TfReadAt)(void *ctx, uint64_t off, void *buf, size_t n, TfErr *err);

typedef struct {
    const char *name;       /* name after "<prefix>/", NUL-terminated, owned by the reader */
    uint32_t name_len;
    uint16_t method;        /* 0 stored, 8 deflated (zipread_open rejects others) */
    uint16_t flags;
    uint32_t crc32;
    uint64_t csize;         /* compressed size (== usize when stored) */
    uint64_t usize;         /* uncompressed size */
    uint64_t header_offset; /* absolute offset of the local header in the input */
    uint64_t data_offset;   /* absolute offset of the data; UINT64_MAX until resolved */
    uint64_t data_limit;    /* absolute offset its data must end by: the next entry's local header
                               (in file order) or the central directory; records never overlap */
    void *user;             /* the caller's slot (NULL after open): the loader's storage */
} ZipEntry;

typedef struct {
    TfReadAt read_at;
    void *ctx;
    const uint8_t *mem; /* the input itself when it is in memory (zipread_open_mem): the central
                           directory and local headers are then read in place; or NULL */
    uint64_t size;      /* input size in bytes */
    uint64_t base;      /* absolute offset where the zip starts (bytes before it are ignored) */
    char *prefix;       /* top folder, NUL-terminated (taken from the first entry) */
    size_t prefix_len;
    ZipEntry *entries;  /* in central-directory order */
    size_t n_entries;
    char *names;        /* one block holding every entry name */
    uint32_t *index;    /* open-addressing hash: entry index + 1, 0 = empty */
    size_t index_cap;   /* power of two */
} ZipReader;

/* Quick check: do the 4 bytes at the start of the input read "PK\3\4"? */
int zipread_is_zip(const uint8_t *first4, size_t n);

/* Parse the end records (classic and zip64) and the central directory.
 * On success the reader owns its allocations (free them with zipread_close,
 * which is also safe after a failed open). Entries whose name does not start
 * with "<prefix>/" are rejected (as torch does), as are duplicate names,
 * entries whose local header or data would lie outside the input, entries
 * that overlap (two records sharing bytes: the "overlapping files" zip bomb,
 * which would let one byte be inflated or copied once per entry), and more
 * entries than lim->records or names longer than lim->name. */
TfStatus zipread_open(ZipReader *z, TfReadAt read_at, void *ctx, uint64_t size,
                      const TfLimits *lim, TfErr *err);
/* The same for an input held in memory (mem, size bytes, alive until zipread_close). */
TfStatus zipread_open_mem(ZipReader *z, const uint8_t *mem, uint64_t size, const TfLimits *lim, TfErr *err);
void zipread_close(ZipReader *z);

/* Look up an entry by its name after the prefix ("data.pkl", "data/0").
 * Returns NULL when absent. The pointer stays valid until zipread_close. */
ZipEntry *zipread_find(const ZipReader *z, const char *name, size_t name_len);

/* Read the entry's local header (signature, name length, extra length) and
 * set e->data_offset; check that the data [data_offset, data_offset+csize)
 * lies inside the input and ends by e->data_limit; refuse encrypted entries
 * (their bytes could only be garbage, mapped or not). Idempotent. */
TfStatus zipread_locate(ZipReader *z, ZipEntry *e, TfErr *err);

/* Copy (stored) or inflate (deflated, raw zlib) the entry's data into dst,
 * which holds exactly e->usize bytes. Inflating checks that the stream ends
 * exactly at usize bytes. Calls zipread_locate first. */
TfStatus zipread_extract(ZipReader *z, ZipEntry *e, uint8_t *dst, TfErr *err);

#endif
