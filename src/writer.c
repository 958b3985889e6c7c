/* writer.c - the output of a checkpoint whose data.pkl and records are known (writer.h), with no
 * Python: the zip records (zipwrite.c) or the legacy stream, straight from the records' memory;
 * save.c calls it for a file descriptor with the GIL released. zlib computes each storage's
 * CRC-32 in the same pass: on a second thread over the bytes being written when a core is idle
 * for it, else chunk by chunk just before each chunk is written. When the caller will fsync,
 * writeback is started as the bytes are written (sync_file_range, on Linux: platform.h). */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32.h"
#include "platform.h"
#include "writer.h"

/* Record bytes are written in pieces of SAVE_INLINE_CHUNK that end on multiples of it in the
 * output (next_piece); without the CRC thread each piece is CRCed just before it is written, while
 * it is in the core's cache, so the CRC costs no second trip to memory. On this project's machine
 * (Linux 6.18, ext4) writes of 2 MB or more into a 2 GB file took 1.5-3x longer whenever an
 * earlier writer had left memory fragmented (direct compaction), 512 KB ones did not; and aligned
 * 512 KB pieces (after sink_reserve) saved a 100 MB state_dict faster than writing each record
 * whole (13.8 vs 14.9 ms). The legacy stream is written in the same pieces. */
#ifndef SAVE_INLINE_CHUNK
#define SAVE_INLINE_CHUNK ((size_t)512 << 10)
#endif
#ifndef SAVE_CRC_LEAD
#define SAVE_CRC_LEAD ((uint64_t)1 << 20) /* the CRC thread's most bytes ahead of the writer */
#endif
#define SAVE_CRC_THREAD_MIN ((uint64_t)16 << 20) /* below this, CRC inline */
#define SAVE_KICK ((int64_t)32 << 20)            /* start writeback every this many bytes */
#define SAVE_RESERVE_MIN ((uint64_t)1 << 20)     /* smaller saves reserve no blocks */

/* ---- output sinks ---------------------------------------------------------------- */

int wr_fd_write(void *ctx, const void *buf, size_t n) {
    WrFdSink *k = ctx;
    const char *p = buf;
    while (n > 0) {
        size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
        ssize_t w = write(k->fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) continue;
            k->err = errno;
            return -1;
        }
        if (w == 0) {
            k->err = EIO;
            return -1;
        }
        p += w;
        n -= (size_t)w;
        k->pos += w;
    }
    if (k->kick && k->pos - k->kicked >= SAVE_KICK) {
        /* asynchronous; errors (e.g. not a regular file) only mean no head start */
        if (tf_writeback_start(k->fd, k->kicked, k->pos - k->kicked) < 0) k->kick = 0;
        k->kicked = k->pos;
    }
    return 0;
}

/* Ask ext4 for the blocks of the `upper` bytes (at least) about to be written at the end of a
 * regular file, keeping its size. On this project's machine (Linux 6.18, ext4) the same 512 KB
 * write() calls then took 264 instead of 404 ms for 2 GB and 13.3 instead of 20.7 ms for 100 MB
 * (the page cache is filled over allocated blocks instead of delayed allocation), and the fsync
 * after them was no slower. On tmpfs it cost 10%, so only ext4 gets it (so nothing is reserved
 * off Linux: platform.h). Failures (no space, no support) are ignored: the writes then run, and
 * fail, as without it. */
static void sink_reserve(WrFdSink *k, uint64_t upper) {
    struct stat st;
    if (k == NULL || upper < SAVE_RESERVE_MIN || upper > (uint64_t)INT64_MAX / 2) return;
    if (fstat(k->fd, &st) != 0 || !S_ISREG(st.st_mode) || !tf_fd_on_ext4(k->fd)) return;
    off_t at = lseek(k->fd, 0, SEEK_CUR);
    if (at < 0 || st.st_size > at) return; /* only a file written at its end */
    k->reserved = 1; /* a failed fallocate (ignored, see above) may still leave blocks */
    tf_reserve_keep_size(k->fd, at, (off_t)upper);
}

/* Free the reserved blocks past the end of what was written (truncating a file to its own size
 * does that on ext4; nothing else changes). */
void wr_fd_trim(WrFdSink *k) {
    struct stat st;
    if (!k->reserved) return;
    k->reserved = 0;
    if (fstat(k->fd, &st) == 0 && ftruncate(k->fd, st.st_size) != 0) {
        /* the blocks stay reserved until the file is truncated or deleted: nothing is lost */
    }
}

/* ---- CRC thread ------------------------------------------------------------------ */

typedef struct {
    WrRecord *recs;        /* in write order */
    size_t n;
    size_t done;           /* records whose crc is ready (under lock) */
    int stop;
    /* The thread stays at most SAVE_CRC_LEAD bytes ahead of the writer, so each piece it reads
     * from memory is still in the caches when the writer copies it into the file: one trip to
     * memory for both. */
    uint64_t written;      /* bytes of records the writer has passed to write() (under lock) */
    int waiting;           /* the thread waits for `written` (under lock) */
    pthread_mutex_t lock;
    pthread_cond_t cond;   /* done moved (the writer waits) */
    pthread_cond_t moved;  /* written moved (the thread waits) */
} CrcJob;

static void *crc_worker(void *arg) {
    CrcJob *j = arg;
    uint64_t at = 0; /* bytes of records CRCed so far */
    for (size_t i = 0; i < j->n; i++) {
        WrRecord *r = &j->recs[i];
        uint32_t crc = 0;
        for (uint64_t off = 0; off < r->nbytes; off += SAVE_INLINE_CHUNK) {
            size_t n = r->nbytes - off < SAVE_INLINE_CHUNK ? (size_t)(r->nbytes - off) : SAVE_INLINE_CHUNK;
            pthread_mutex_lock(&j->lock);
            while (at + n > j->written + SAVE_CRC_LEAD && !j->stop) {
                j->waiting = 1;
                pthread_cond_wait(&j->moved, &j->lock);
            }
            j->waiting = 0;
            int stop = j->stop;
            pthread_mutex_unlock(&j->lock);
            if (stop) return NULL;
            crc = tf_crc32(crc, (const char *)r->start + off, n);
            at += n;
        }
        r->crc = crc;
        pthread_mutex_lock(&j->lock);
        j->done = i + 1;
        pthread_cond_signal(&j->cond);
        pthread_mutex_unlock(&j->lock);
    }
    return NULL;
}

/* The writer passed n more bytes of records to write(). */
static void crc_advance(CrcJob *j, uint64_t n) {
    pthread_mutex_lock(&j->lock);
    j->written += n;
    if (j->waiting) pthread_cond_signal(&j->moved);
    pthread_mutex_unlock(&j->lock);
}

static void crc_wait(CrcJob *j, size_t i) {
    pthread_mutex_lock(&j->lock);
    while (j->done <= i) pthread_cond_wait(&j->cond, &j->lock);
    pthread_mutex_unlock(&j->lock);
}

/* A CRC thread hides the CRC's CPU time only when a core is idle to run it:
 * at least two CPUs for us and, over the last minute, on average at least
 * one of them free (on a busy machine the thread only competes with the
 * writer and the kernel's writeback, and computing each piece's CRC just
 * before writing it costs a few percent: folded with (V)PCLMULQDQ it runs at
 * tens of GB/s on bytes in cache). */
int wr_crc_thread_pays(void) {
    /* folded, the CRC of a piece in cache costs a few percent of writing it, and a
     * thread measured no faster on this project's machine (2 GB: 414 vs 405 ms) */
    if (tf_crc32_folds() > 0) return 0;
    long ncpu = tf_usable_cpus();
    if (ncpu < 2) return 0;
    double load;
    if (getloadavg(&load, 1) != 1) return 1;
    return load <= (double)(ncpu - 1) + 0.25;
}

/* ---- writing ---------------------------------------------------------------------- */

/* The next write of a record's bytes at output offset pos, left bytes to go: up to the next
 * multiple of SAVE_INLINE_CHUNK in the output, so that every write() but a record's first and last
 * covers whole pages (512 KB writes at 64 bytes past a page boundary took 285 instead of 243 ms
 * for 2 GB here). A short first piece is gathered with the record's header. */
static size_t next_piece(uint64_t pos, uint64_t left) {
    uint64_t to_boundary = SAVE_INLINE_CHUNK - pos % SAVE_INLINE_CHUNK;
    return (size_t)(left < to_boundary ? left : to_boundary);
}

static void set_span(WriteJob *w, const WrRecord *r) {
    if (w->span != NULL) w->span(w->ctx, r);
}

/* Everything after data.pkl is known: no Python objects are touched here
 * (the sink calls back into Python only for file objects, with the GIL). */
TfStatus write_zip(WriteJob *w) {
    ZipWriter z;
    TfErr *err = &w->err;
    CrcJob job;
    pthread_t tid;
    int started = 0;
    TfStatus rc = zipwrite_open(&z, w->write, w->ctx, w->prefix, w->prefix_len, err);
    WrRecord *recs = w->recs;
    if (rc != TF_OK) goto done;
    uint64_t total = 0;
    for (size_t i = 0; i < w->n_recs; i++) total += recs[i].nbytes;
    /* an upper bound of the file: the records, data.pkl, the small records, and per record at most
     * two names, a local header with zip64 and alignment extras, a descriptor and a central entry */
    sink_reserve(w->fd, total + w->pickle_len + (w->n_recs + 8) * (320 + 2 * (uint64_t)w->prefix_len) + 4096);
    if (w->use_thread && total >= SAVE_CRC_THREAD_MIN) {
        memset(&job, 0, sizeof job);
        job.recs = recs;
        job.n = w->n_recs;
        pthread_mutex_init(&job.lock, NULL);
        pthread_cond_init(&job.cond, NULL);
        pthread_cond_init(&job.moved, NULL);
        started = pthread_create(&tid, NULL, crc_worker, &job) == 0;
        if (!started) {
            pthread_mutex_destroy(&job.lock);
            pthread_cond_destroy(&job.cond);
            pthread_cond_destroy(&job.moved);
        }
    }
    if ((rc = zipwrite_record(&z, "data.pkl", w->pickle, w->pickle_len, err)) != TF_OK ||
        (rc = zipwrite_record(&z, ".format_version", "1", 1, err)) != TF_OK ||
        (rc = zipwrite_record(&z, ".storage_alignment", "64", 2, err)) != TF_OK ||
        (rc = zipwrite_record(&z, "byteorder", "little", 6, err)) != TF_OK)
        goto done;
    for (size_t i = 0; i < w->n_recs; i++) {
        WrRecord *r = &recs[i];
        char name[32];
        snprintf(name, sizeof name, "data/%zu", i);
        if ((rc = zipwrite_begin(&z, name, r->nbytes, !started, err)) != TF_OK) goto done;
        set_span(w, r);
        for (uint64_t off = 0, n; off < r->nbytes; off += n) {
            n = next_piece(z.pos, r->nbytes - off);
            if ((rc = zipwrite_data(&z, r->start + off, (size_t)n, err)) != TF_OK) {
                set_span(w, NULL);
                goto done;
            }
            if (started) crc_advance(&job, n);
        }
        set_span(w, NULL);
        if (started) crc_wait(&job, i);
        if ((rc = zipwrite_end(&z, started ? r->crc : 0, err)) != TF_OK) goto done;
    }
    if ((rc = zipwrite_record(&z, "version", "3\n", 2, err)) != TF_OK) goto done;
    rc = zipwrite_finish(&z, err);
done:
    if (started) {
        pthread_mutex_lock(&job.lock);
        job.stop = 1;
        pthread_cond_signal(&job.moved);
        pthread_mutex_unlock(&job.lock);
        pthread_join(tid, NULL);
        pthread_mutex_destroy(&job.lock);
        pthread_cond_destroy(&job.cond);
        pthread_cond_destroy(&job.moved);
    }
    zipwrite_close(&z);
    return rc;
}

/* A small gathering buffer for the legacy stream. */
typedef struct {
    WriteJob *w;
    uint8_t *buf;
    size_t len;
    TfErr *err;
    uint64_t pos; /* bytes passed to out_write */
} Out;

static TfStatus out_flush(Out *o) {
    if (o->len == 0) return TF_OK;
    size_t n = o->len;
    o->len = 0;
    return o->w->write(o->w->ctx, o->buf, n) < 0 ? tf_fail(o->err, TF_ERR_IO, 0, "write failed") : TF_OK;
}

static TfStatus out_write(Out *o, const void *p, size_t n) {
    o->pos += n;
    if (n <= ZW_BUFFER - o->len) {
        memcpy(o->buf + o->len, p, n);
        o->len += n;
        return TF_OK;
    }
    if (out_flush(o) != TF_OK) return o->err->status;
    if (n < ZW_BUFFER) {
        memcpy(o->buf, p, n);
        o->len = n;
        return TF_OK;
    }
    return o->w->write(o->w->ctx, p, n) < 0 ? tf_fail(o->err, TF_ERR_IO, 0, "write failed") : TF_OK;
}

/* Magic number, protocol 1001 and sys_info, as torch's _legacy_save pickles them. */
static const uint8_t LEGACY_HEAD[] =
    "\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e"
    "\x80\x02\x4d\xe9\x03\x2e"
    "\x80\x02}q\x00(X\x10\x00\x00\x00protocol_versionq\x01M\xe9\x03X\r\x00\x00\x00little_endianq\x02\x88"
    "X\n\x00\x00\x00type_sizesq\x03}q\x04(X\x05\x00\x00\x00shortq\x05K\x02X\x03\x00\x00\x00intq\x06K\x04"
    "X\x04\x00\x00\x00longq\x07K\x04uu.";

static int cmp_legacy_key(const void *a, const void *b) {
    return strcmp(((const LegacyKey *)a)->text, ((const LegacyKey *)b)->text);
}

void wr_sort_legacy_keys(LegacyKey *keys, size_t n) { qsort(keys, n, sizeof *keys, cmp_legacy_key); }

/* The legacy stream: head, data pickle, sorted key list, blobs (int64 numel
 * + bytes) in key-list order. */
TfStatus write_legacy(WriteJob *w) {
    Out o = {w, malloc(ZW_BUFFER), 0, &w->err, 0};
    if (o.buf == NULL) return tf_fail(&w->err, TF_ERR_NOMEM, 0, "out of memory");
    TfStatus rc;
    uint64_t total = 0;
    for (size_t i = 0; i < w->n_recs; i++) total += w->recs[i].nbytes;
    sink_reserve(w->fd, sizeof LEGACY_HEAD + w->pickle_len + w->keys_len + 8 * (uint64_t)w->n_recs + total);
    if ((rc = out_write(&o, LEGACY_HEAD, sizeof LEGACY_HEAD - 1)) != TF_OK ||
        (rc = out_write(&o, w->pickle, w->pickle_len)) != TF_OK ||
        (rc = out_write(&o, w->keys_pickle, w->keys_len)) != TF_OK)
        goto done;
    for (size_t i = 0; i < w->n_recs; i++) {
        WrRecord *r = &w->recs[i];
        uint8_t h[8];
        tf_put64(h, r->numel);
        if ((rc = out_write(&o, h, 8)) != TF_OK) goto done;
        set_span(w, r);
        for (uint64_t off = 0, n; off < r->nbytes; off += n) {
            n = next_piece(o.pos, r->nbytes - off);
            if ((rc = out_write(&o, r->start + off, (size_t)n)) != TF_OK) break;
        }
        set_span(w, NULL);
        if (rc != TF_OK) goto done;
    }
    rc = out_flush(&o);
done:
    free(o.buf);
    return rc;
}
