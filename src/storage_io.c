/* storage_io.c - reading storage bytes for copy loads: the read_at functions over a file
 * descriptor and a Python file object, huge pages of fresh buffers (THP fitting), big records
 * split over threads, and the read batches that run while unpickling goes on. Below storage.c:
 * it touches a Storage's buffer fields only. */
#include "pagedrop.h"
#include "rebuild.h"
#include "platform.h"

#include <errno.h>
#include <pthread.h>
#include <unistd.h>

/* ---- reading ---------------------------------------------------------------- */

static TfStatus pread_all(int fd, uint64_t off, uint8_t *buf, size_t n, TfErr *err) {
    while (n > 0) {
        size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
        ssize_t r = pread(fd, buf, chunk, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            return tf_fail(err, TF_ERR_IO, off, "read failed: %s", strerror(errno));
        }
        if (r == 0) return tf_fail(err, TF_ERR_FORMAT, off, "file ended early (it changed while loading?)");
        buf += r;
        off += (uint64_t)r;
        n -= (size_t)r;
    }
    return TF_OK;
}

TfStatus storage_read_fd(void *ctx, uint64_t off, void *buf, size_t n, TfErr *err) {
    return pread_all(*(int *)ctx, off, buf, n, err);
}

TfStatus storage_read_pyfile(void *ctx, uint64_t off, void *buf, size_t n, TfErr *err) {
    Loader *L = ctx;
    uint64_t pos;
    if (tf_add_u64(L->pyfile_start, off, &pos) || pos > (uint64_t)PY_SSIZE_T_MAX)
        return tf_fail(err, TF_ERR_FORMAT, off, "offset out of range");
    PyObject *r = PyObject_CallMethod(L->pyfile, "seek", "K", (unsigned long long)pos);
    if (r == NULL) goto pyerr;
    Py_DECREF(r);
    while (n > 0) {
        size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n;
        PyObject *mv = PyMemoryView_FromMemory(buf, (Py_ssize_t)chunk, PyBUF_WRITE);
        if (mv == NULL) goto pyerr;
        r = PyObject_CallMethod(L->pyfile, "readinto", "O", mv);
        Py_DECREF(mv);
        if (r == NULL) goto pyerr;
        Py_ssize_t got = PyLong_AsSsize_t(r);
        Py_DECREF(r);
        if (got < 0 && PyErr_Occurred()) goto pyerr;
        if (got <= 0) return tf_fail(err, TF_ERR_FORMAT, off, "file ended early");
        buf = (char *)buf + got;
        n -= (size_t)got;
        off += (uint64_t)got;
    }
    return TF_OK;
pyerr:;
    /* keep the Python error's text; the caller raises OSError from it */
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyObject *msg = v ? PyObject_Str(v) : NULL;
    TfStatus st = tf_fail(err, TF_ERR_IO, off, "reading the file object failed: %s",
                          msg ? PyUnicode_AsUTF8(msg) : "?");
    if (msg == NULL || PyUnicode_AsUTF8(msg) == NULL) PyErr_Clear();
    Py_XDECREF(msg);
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
    return st;
}

/* ---- huge pages of fresh buffers ------------------------------------------
 *
 * A copy load reads each record into a fresh numpy buffer, and numpy asks for transparent huge
 * pages on those of 4 MB or more. When free memory is in 2 MB blocks that is the fastest way
 * to fill them (one fault per 2 MB, fewer TLB misses), but when it is fragmented (a page cache
 * full of 4 kB pages) every 2 MB fault of such a region may compact memory first, in the
 * faulting thread, under the kernel's default defrag=madvise: a 2 GB load took 271-1,191 ms
 * instead of ~400. So a load asks /proc/buddyinfo, at its first such buffer, how much free
 * memory lies in huge-page blocks, and spends that budget buffer by buffer; a buffer the budget
 * does not cover (asked once more then, in case memory was freed meanwhile) gets small pages
 * (MADV_NOHUGEPAGE), which fault without compaction. Only where the THP settings can stall
 * (tf_thp_stall_size, read once per process; a change of the sysfs settings afterwards is not
 * seen) and only on Linux; elsewhere nothing changes. The buffer stays numpy's (freed by it). */
#define TF_THP_MIN (4u << 20)              /* numpy's own threshold for MADV_HUGEPAGE */
#define TF_THP_MARGIN ((uint64_t)64 << 20) /* kept free: the zones' watermarks */

static uint64_t thp_size_cached = UINT64_MAX; /* UINT64_MAX: not read yet */
static int64_t thp_free_override = -1;         /* tests: the free bytes to assume (-1: ask the kernel) */

static uint64_t thp_stall_size(void) {
    uint64_t hp = __atomic_load_n(&thp_size_cached, __ATOMIC_RELAXED);
    if (hp == UINT64_MAX) {
        hp = tf_thp_stall_size();
        __atomic_store_n(&thp_size_cached, hp, __ATOMIC_RELAXED);
    }
    return hp;
}

/* Free bytes in huge-page blocks, less the margin (0 at least); -1: stalls cannot happen here. */
static int64_t thp_free_budget(void) {
    int64_t ov = __atomic_load_n(&thp_free_override, __ATOMIC_RELAXED);
    if (ov >= 0) return ov;
    uint64_t hp = thp_stall_size();
    if (hp == 0) return -1;
    int64_t f = tf_free_huge_bytes(hp);
    if (f < 0) return -1;
    return f > (int64_t)TF_THP_MARGIN ? f - (int64_t)TF_THP_MARGIN : 0;
}

void storage_thp_fit(Loader *L, void *p, size_t n) {
    if (n < TF_THP_MIN || L->thp_probed < 0) return;
    if (L->thp_probed == 0 || (L->thp_probed == 1 && L->thp_left < n)) {
        int64_t f = thp_free_budget();
        if (f < 0) {
            L->thp_probed = -1; /* never stalls: nothing to do in this load */
            return;
        }
        L->thp_left = (uint64_t)f;
        L->thp_probed = L->thp_probed == 0 || L->thp_left >= n ? 1 : 2;
    }
    if (L->thp_left >= n) {
        L->thp_left -= n;
    } else {
        tf_no_hugepage(p, n);
    }
}

/* _thp_probe(free=None, /): the free bytes in huge-page blocks a load would budget now (after
 * the margin), or None where faults never compact (not Linux, THP never, defrag defer/never);
 * an int `free` >= 0 makes loads assume that budget from now on, -1 restores the kernel's
 * figure (internal: tests). */
PyObject *mod_thp_probe(PyObject *module, PyObject *args) {
    (void)module;
    long long set = -2;
    if (!PyArg_ParseTuple(args, "|L:_thp_probe", &set)) return NULL;
    if (set < -1) {
        if (set != -2) {
            PyErr_SetString(PyExc_ValueError, "_thp_probe: free must be >= -1");
            return NULL;
        }
    } else {
        __atomic_store_n(&thp_free_override, (int64_t)set, __ATOMIC_RELAXED);
    }
    int64_t f = thp_free_budget();
    return f < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong((long long)f);
}

typedef struct {
    int fd;
    uint64_t off;
    uint8_t *dst;
    size_t n;
} ReadJob;

typedef struct {
    ReadJob *jobs;
    size_t njobs;
    size_t next; /* atomic */
    int failed;  /* atomic errno */
} ReadPool;

static void *read_worker(void *arg) {
    ReadPool *p = arg;
    for (;;) {
        size_t i = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED);
        if (i >= p->njobs || __atomic_load_n(&p->failed, __ATOMIC_RELAXED)) break;
        TfErr err;
        if (pread_all(p->jobs[i].fd, p->jobs[i].off, p->jobs[i].dst, p->jobs[i].n, &err) != TF_OK)
            __atomic_store_n(&p->failed, errno ? errno : EIO, __ATOMIC_RELAXED);
    }
    return NULL;
}

/* Run the jobs on up to `nthreads` threads (the caller is one of them). */
static int run_reads(ReadJob *jobs, size_t njobs, int nthreads) {
    ReadPool pool = {jobs, njobs, 0, 0};
    pthread_t tids[16];
    int started = 0;
    for (int t = 1; t < nthreads && t < 16; t++) {
        if (pthread_create(&tids[started], NULL, read_worker, &pool) != 0) break;
        started++;
    }
    read_worker(&pool);
    for (int t = 0; t < started; t++) pthread_join(tids[t], NULL);
    return pool.failed;
}

#define READ_CHUNK ((size_t)8 << 20)
/* one record read on its own (open()[name], a lazy load's first access) is split over the CPUs
 * from this size, in pieces of READ_SPLIT_PIECE: a 23 MB tensor took ~1.0 ms in one pread here */
#define READ_SPLIT_MIN ((uint64_t)8 << 20)
#define READ_SPLIT_PIECE ((size_t)2 << 20)

static int online_cpus(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return (int)(n < 1 ? 1 : n > 8 ? 8 : n);
}

/* Read a big stored record with several threads (GIL released). 0: done; -1: not done (not
 * such a record, or a read failed: the caller then reads it the plain way, which says why). */
int storage_read_split(Loader *L, ZipEntry *e, uint8_t *dst) {
    int nthreads = online_cpus();
    if (e->method != 0 || e->csize != e->usize || e->usize < READ_SPLIT_MIN || e->usize > SIZE_MAX ||
        nthreads < 2)
        return -1;
    ReadJob jobs[64];
    size_t piece = READ_SPLIT_PIECE, n = (size_t)e->usize;
    if (n / piece >= sizeof jobs / sizeof *jobs) piece = n / (sizeof jobs / sizeof *jobs - 1);
    size_t njobs = 0;
    for (size_t off = 0; off < n; off += piece, njobs++) {
        jobs[njobs].fd = L->fd;
        jobs[njobs].off = e->data_offset + off;
        jobs[njobs].dst = dst + off;
        jobs[njobs].n = n - off < piece ? n - off : piece;
    }
    int failed;
    loader_drop_off(L);
    Py_BEGIN_ALLOW_THREADS
    failed = run_reads(jobs, njobs, nthreads);
    Py_END_ALLOW_THREADS
    return failed ? -1 : 0;
}

/* ---- read batches: deferred reads while unpickling goes on -----------------------
 *
 * Copying from a file descriptor (mmap=False), a stored record's bytes are read into its fresh
 * buffer after its storage is made. Rather than all at the end, they are handed out as they
 * come, in batches of BATCH_MIN_BYTES or BATCH_MIN_COUNT storages or more, to a thread of their
 * own, one batch at a time, so that the reads (and the page faults of the fresh buffers) run on
 * another CPU while the VM builds objects: a 50,000-storage copy load spent a third of its time
 * in them. A batch's storages stay `pending` until it is joined: storage_ready joins it first (a
 * storage needed early may be in it), storage_finish reads the rest and joins it, loader_close
 * waits for it whatever happened. Its thread touches only its jobs (file offsets and the
 * buffers of storages that L->pending keeps alive), never a Python object. */

struct ReadBatch {
    pthread_t tid;
    ReadPool pool;
    Py_ssize_t lo, hi; /* its storages: pending[lo:hi], those still pending when it started */
    int done;          /* atomic: the thread is finished */
};

#ifndef BATCH_MIN_BYTES /* -D overrides for experiments: huge values turn batches off */
#define BATCH_MIN_BYTES ((uint64_t)4 << 20)
#endif
#ifndef BATCH_MIN_COUNT
#define BATCH_MIN_COUNT 2048
#endif

static void *batch_run(void *arg) {
    struct ReadBatch *b = arg;
    read_worker(&b->pool);
    __atomic_store_n(&b->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* The reads of pending[lo:hi] still pending, big records split into READ_CHUNK pieces so that
 * threads share the work (PyMem_Malloc'd; NULL with an exception set). */
static ReadJob *make_jobs(Loader *L, Py_ssize_t lo, Py_ssize_t hi, size_t *njobs, uint64_t *total) {
    size_t n = 0;
    uint64_t t = 0;
    for (Py_ssize_t i = lo; i < hi; i++) {
        StorageObject *s = (StorageObject *)PyList_GET_ITEM(L->pending, i);
        if (!s->pending) continue;
        size_t nb = (size_t)s->nbytes;
        n += nb == 0 ? 0 : (nb + READ_CHUNK - 1) / READ_CHUNK;
        t += nb;
    }
    ReadJob *jobs = PyMem_Malloc((n ? n : 1) * sizeof(ReadJob));
    if (jobs == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    size_t j = 0;
    for (Py_ssize_t i = lo; i < hi; i++) {
        StorageObject *s = (StorageObject *)PyList_GET_ITEM(L->pending, i);
        if (!s->pending) continue;
        for (size_t off = 0; off < (size_t)s->nbytes; off += READ_CHUNK) {
            size_t nb = (size_t)s->nbytes - off;
            jobs[j].fd = L->fd;
            jobs[j].off = s->rec.entry->data_offset + off;
            jobs[j].dst = (uint8_t *)s->data + off;
            jobs[j].n = nb < READ_CHUNK ? nb : READ_CHUNK;
            j++;
        }
    }
    *njobs = j;
    *total = t;
    return jobs;
}

/* Hand pending[pend_sent:] to a batch thread (none started: storage_finish reads them). */
static int batch_start(Loader *L) {
    Py_ssize_t lo = L->pend_sent, hi = PyList_GET_SIZE(L->pending);
    size_t njobs;
    uint64_t total;
    ReadJob *jobs = make_jobs(L, lo, hi, &njobs, &total);
    if (jobs == NULL) return -1;
    struct ReadBatch *b = PyMem_Calloc(1, sizeof *b);
    if (b == NULL) {
        PyMem_Free(jobs);
        PyErr_NoMemory();
        return -1;
    }
    b->pool.jobs = jobs;
    b->pool.njobs = njobs;
    b->lo = lo;
    b->hi = hi;
    if (pthread_create(&b->tid, NULL, batch_run, b) != 0) {
        PyMem_Free(jobs);
        PyMem_Free(b);
        return 0;
    }
    L->batch = b;
    L->pend_sent = hi;
    L->pend_bytes = 0;
    return 0;
}

/* Wait for the batch in flight (GIL released) and free it; 1: it failed (errno in *failed). */
static int batch_wait(Loader *L, Py_ssize_t *lo, Py_ssize_t *hi, int *failed) {
    struct ReadBatch *b = L->batch;
    L->batch = NULL;
    if (__atomic_load_n(&b->done, __ATOMIC_ACQUIRE)) {
        pthread_join(b->tid, NULL);
    } else {
        Py_BEGIN_ALLOW_THREADS
        pthread_join(b->tid, NULL);
        Py_END_ALLOW_THREADS
    }
    *lo = b->lo;
    *hi = b->hi;
    *failed = b->pool.failed;
    PyMem_Free(b->pool.jobs);
    PyMem_Free(b);
    return *failed != 0;
}

/* Join the batch in flight, if any: its storages are read (0), or OSError (-1). */
int storage_batch_join(Loader *L) {
    if (L->batch == NULL) return 0;
    Py_ssize_t lo, hi;
    int failed;
    if (batch_wait(L, &lo, &hi, &failed)) {
        errno = failed;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    for (Py_ssize_t i = lo; i < hi; i++) ((StorageObject *)PyList_GET_ITEM(L->pending, i))->pending = 0;
    return 0;
}

void storage_batch_abort(Loader *L) {
    if (L->batch == NULL) return;
    Py_ssize_t lo, hi;
    int failed;
    (void)batch_wait(L, &lo, &hi, &failed);
}

/* A deferred storage was added to L->pending: join a finished batch, start the next. */
int storage_pending_pump(Loader *L) {
    if (L->batch != NULL) {
        if (!__atomic_load_n(&L->batch->done, __ATOMIC_ACQUIRE)) return 0;
        if (storage_batch_join(L) < 0) return -1;
    }
    if (L->pend_bytes < BATCH_MIN_BYTES && PyList_GET_SIZE(L->pending) - L->pend_sent < BATCH_MIN_COUNT) return 0;
    return batch_start(L);
}

int storage_read_pending(Loader *L) {
    Py_ssize_t npend = PyList_GET_SIZE(L->pending);
    if (npend > L->pend_sent || L->batch != NULL) {
        /* the rest, on the CPUs the batch in flight leaves (it is mostly done by now) */
        size_t njobs;
        uint64_t total;
        ReadJob *jobs = make_jobs(L, L->pend_sent, npend, &njobs, &total);
        if (jobs == NULL) return -1; /* loader_close waits for the batch */
        int nthreads = total >= ((uint64_t)64 << 20) ? online_cpus() : 1;
        int failed;
        Py_BEGIN_ALLOW_THREADS
        failed = run_reads(jobs, njobs, nthreads);
        Py_END_ALLOW_THREADS
        PyMem_Free(jobs);
        if (storage_batch_join(L) < 0) return -1;
        if (failed) {
            errno = failed;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        for (Py_ssize_t i = 0; i < npend; i++)
            ((StorageObject *)PyList_GET_ITEM(L->pending, i))->pending = 0;
        L->pend_sent = npend;
        L->pend_bytes = 0;
    }
    return 0;
}
