/* zipwrite.h - Python-free writer for the zip container torch.save writes.
 *
 * Output goes through a sink callback in one sequential pass (no seeks), so
 * the same code writes to a file descriptor or to a Python stream. The layout
 * is torch 2.x's (miniz as patched by torch, spec section 2.4), byte for byte:
 *
 *   - every record: a local header with version 0, flags 0x0808 (0x0800 for
 *     an empty record), zero CRC/sizes/time/date, then a zip64 extra field
 *     when the data is >= 0xFFFFFFFF bytes or the header starts at or past
 *     0xFFFFFFFF, then an "FB" extra field of 'Z' bytes that puts the data
 *     at a multiple of the alignment; the data; a data descriptor (16 bytes,
 *     or 24 when the header had a zip64 extra) unless the record is empty;
 *   - the central directory (real CRCs and sizes, zip64 extras past 4 GiB);
 *   - always a zip64 end record and locator, then the classic end record.
 *
 * zipwrite_finish also writes `.data/serialization_id` the way torch
 * computes it (a hash of the record names, iterated in libstdc++'s
 * unordered_set order, and a hash of the CRCs of the data descriptors), so a
 * file written here is identical to torch.save's for the same records. */
#ifndef TORCHFREE_ZIPWRITE_H
#define TORCHFREE_ZIPWRITE_H

#include "common.h"

/* Write exactly n bytes. Return 0, or -1 on failure (the sink keeps its own
 * error details: errno, a Python exception). */
typedef int (*ZwSinkFn)(void *ctx, const void *buf, size_t n);

#define ZW_ALIGNMENT 64u             /* torch's default storage_alignment */
#define ZW_BUFFER (256u * 1024u)     /* small writes are gathered up to this size */

typedef struct {
    char *name;       /* full name "<prefix>/<record>", owned */
    uint16_t name_len;
    uint16_t flags;
    uint32_t crc;
    uint64_t size;
    uint64_t header_offset;
    uint64_t name_hash; /* libstdc++ std::hash of the record name (without prefix) */
} ZwEntry;

typedef struct {
    ZwSinkFn sink;
    void *ctx;
    char *prefix;      /* top folder, owned */
    size_t prefix_len;
    uint64_t pos;      /* bytes handed to the sink or buffered so far */
    uint8_t *buf;      /* gathering buffer of ZW_BUFFER bytes */
    size_t buf_len;
    ZwEntry *entries;
    size_t n_entries, cap_entries;
    /* record being written */
    int open;
    int inline_crc;    /* compute the CRC from the data as it is written */
    uint32_t crc;
    uint64_t written;  /* data bytes of the open record so far */
    uint8_t head[8];   /* its first bytes (for torch's serialization id quirk) */
    /* serialization id: hash_combine over the CRCs torch's writer sees */
    uint64_t combined_crc;
} ZipWriter;

/* prefix: the top folder ("archive", or the file stem). */
TfStatus zipwrite_open(ZipWriter *z, ZwSinkFn sink, void *ctx, const char *prefix, size_t prefix_len,
                       TfErr *err);
/* Free everything (also after a failure). Writes nothing. */
void zipwrite_close(ZipWriter *z);

/* Start a record of `size` bytes named `name` (after the prefix). With
 * inline_crc the CRC is computed from the data passed to zipwrite_data;
 * otherwise the caller passes it to zipwrite_end. */
TfStatus zipwrite_begin(ZipWriter *z, const char *name, uint64_t size, int inline_crc, TfErr *err);
/* Write n more bytes of the open record (large pieces go to the sink as
 * they are, without a copy). The total must not exceed the declared size. */
TfStatus zipwrite_data(ZipWriter *z, const void *data, size_t n, TfErr *err);
/* Close the record: the data must be complete. crc is used when the record
 * was begun without inline_crc. Writes the data descriptor. */
TfStatus zipwrite_end(ZipWriter *z, uint32_t crc, TfErr *err);
/* begin + data + end for a small record held in memory. */
TfStatus zipwrite_record(ZipWriter *z, const char *name, const void *data, size_t n, TfErr *err);
/* Write `.data/serialization_id`, the central directory and the end records,
 * and flush. The writer must then be closed. */
TfStatus zipwrite_finish(ZipWriter *z, TfErr *err);
/* Hand buffered bytes to the sink now. */
TfStatus zipwrite_flush(ZipWriter *z, TfErr *err);

/* libstdc++'s std::hash<std::string> on 64-bit targets (murmur2-64 with
 * seed 0xc70f6907), which torch's writer uses. */
uint64_t zipwrite_std_hash(const void *data, size_t len);

#endif
