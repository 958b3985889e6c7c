/* writer.h - Python-free output of a checkpoint whose data.pkl and records are known: the zip
 * container (zipwrite.c) or torch's legacy stream, written straight from the records' memory in
 * one sequential pass through a sink callback. Includes the file-descriptor sink (write(2),
 * writeback started as it goes, ext4 block reservation) and the CRC thread. No Python.h: the
 * CPython layer (save.c) describes the records and passes its own sink for file objects. */
#ifndef TORCHFREE_WRITER_H
#define TORCHFREE_WRITER_H

#include "common.h"
#include "zipwrite.h"

/* One storage record, in write order. */
typedef struct {
    const char *start;
    uint64_t nbytes;
    uint64_t numel;        /* legacy stream: the element count written before the bytes */
    const void *owner;     /* opaque to the writer: passed to the sink's span callback */
    uint32_t crc;          /* set by the CRC thread (write_zip) */
} WrRecord;

/* The record whose bytes are written next (NULL: none), so that a sink may pass pieces inside
 * [r->start, r->start + r->nbytes) without a copy. */
typedef void (*WrSpanFn)(void *ctx, const WrRecord *r);

/* The file-descriptor sink (its ctx for wr_fd_write); call it without the GIL. */
typedef struct {
    int fd;
    int err;                /* errno of a failed write(2) */
    /* the caller will fsync: start writeback of what is written as we go, so
     * the disk works while we write (the fsync then has little left to do) */
    int kick;
    int64_t pos, kicked;    /* file offsets: written so far, writeback started up to */
    int reserved;           /* wr_fd_reserve asked for blocks past the end (wr_fd_trim frees the rest) */
} WrFdSink;

int wr_fd_write(void *ctx, const void *buf, size_t n);
/* Free the blocks reserved past the end of what was written. */
void wr_fd_trim(WrFdSink *k);

typedef struct {
    /* the sink */
    ZwSinkFn write;
    void *ctx;
    WrSpanFn span;          /* optional */
    WrFdSink *fd;           /* when ctx is a file descriptor sink: its blocks are reserved ahead */
    /* what is written */
    const char *prefix;     /* the zip's top folder */
    size_t prefix_len;
    const uint8_t *pickle;  /* data.pkl */
    size_t pickle_len;
    WrRecord *recs;         /* zip: key order; legacy: the sorted key list's order */
    size_t n_recs;
    const uint8_t *keys_pickle; /* legacy: the pickled sorted key list */
    size_t keys_len;
    int use_thread;         /* CRC on a second thread (write_zip) */
    TfErr err;
} WriteJob;

/* Everything after data.pkl is known: the zip records. */
TfStatus write_zip(WriteJob *w);
/* The legacy stream: head, data pickle, sorted key list, blobs (int64 numel + bytes). */
TfStatus write_legacy(WriteJob *w);

/* Whether a CRC thread would pay here (crc_thread=-1). */
int wr_crc_thread_pays(void);

/* The legacy stream's key of one record (its text) and the record's index for the caller. */
typedef struct {
    char text[24];
    size_t rec;
} LegacyKey;

/* Sort keys as torch's pickle of sorted(keys) lists them (the blobs' order). */
void wr_sort_legacy_keys(LegacyKey *keys, size_t n);

#endif
