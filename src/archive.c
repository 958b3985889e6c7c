/* archive.c - a zip checkpoint opened for loading: load_zip() for one-shot
 * loads, and the Archive type for scan() and lazy open().
 *
 * Both run on a Loader: the zip reader over the source (a buffer or a file
 * descriptor), the version/byteorder records, the options, and the table of
 * storages. An Archive keeps it alive between calls so single tensors can be
 * read on demand; load_zip keeps it on the C stack for one call. */
#include "module.h"
#include "pickler.h"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

/* Read a small record (version, byteorder) into buf (NUL-terminated). */
static int small_record(Loader *L, const char *name, char *buf, size_t cap, int *found) {
    ZipEntry *e = zipread_find(&L->zip, name, strlen(name));
    *found = e != NULL;
    if (e == NULL) return 0;
    if (e->usize >= cap)
        return tf_raise(L, L->st->FormatError, "record %s is %llu bytes long", name, (unsigned long long)e->usize);
    TfErr err = {0};
    if (zipread_extract(&L->zip, e, (uint8_t *)buf, &err) != TF_OK) return tf_raise_err(L, &err);
    buf[e->usize] = 0;
    return 0;
}

static int host_is_big(void) {
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 0;
}

static int read_version_and_byteorder(Loader *L) {
    char buf[64];
    int found;
    if (small_record(L, ".data/version", buf, sizeof buf, &found) < 0) return -1;
    if (!found && small_record(L, "version", buf, sizeof buf, &found) < 0) return -1;
    if (!found) return tf_raise(L, L->st->FormatError, "archive has no version record: not a torch checkpoint");
    char *end;
    long v = strtol(buf, &end, 10);
    while (*end == '\n' || *end == '\r' || *end == ' ') end++;
    if (end == buf || *end != 0 || v < 1)
        return tf_raise(L, L->st->FormatError, "version record holds %.20s, not a number", buf);
    if (v > 10)
        return tf_raise(L, L->st->FormatError,
                        "checkpoint has format version %ld; the maximum supported version for reading is 10", v);
    if (small_record(L, "byteorder", buf, sizeof buf, &found) < 0) return -1;
    int file_big = L->default_big; /* no record: little, unless torch mode says otherwise */
    if (found) {
        file_big = 0;
        if (strcmp(buf, "big") == 0) file_big = 1;
        else if (strcmp(buf, "little") != 0)
            return tf_raise(L, L->st->FormatError, "byteorder record holds an unknown value");
    }
    int host_big = host_is_big();
    L->file_big = file_big;
    L->big_endian = file_big != host_big;
    return 0;
}

/* Release everything the Loader holds (safe on a zeroed or half-opened one). */
void loader_close(Loader *L) {
    storage_batch_abort(L); /* its thread writes into storages of L->pending */
    vm_free(L);
    zipread_close(&L->zip);
    Py_CLEAR(L->storages);
    Py_CLEAR(L->storage_list);
    Py_CLEAR(L->pending);
    Py_CLEAR(L->fixups);
    Py_CLEAR(L->tar_tensors);
    Py_CLEAR(L->src_owner);
    Py_CLEAR(L->map_location);
    Py_CLEAR(L->safe_globals);
    Py_CLEAR(L->encoding);
    Py_CLEAR(L->globals_seen);
    Py_CLEAR(L->pyfile);
    Py_CLEAR(L->torch);
    Py_CLEAR(L->defer_loc);
    L->torch_tensor = L->torch_dtypes = L->torch_defer = NULL;
    L->src = NULL;
}

static char *open_kwlist[] = {"src", "size", "mode", "require_map", "map_kind", "map_location",
                              "weights_only", "safe_globals", "encoding", "limits", "torch", NULL};
#define OPEN_FORMAT "OK$ipiOpOOOO"

/* default_byteorder=None/"little"/"big"/"native" -> L->default_big (0 or 1), or -1 (raised). */
static int parse_default_byteorder(PyObject *v) {
    if (v == NULL || v == Py_None) return 0;
    if (PyUnicode_Check(v)) {
        if (PyUnicode_CompareWithASCIIString(v, "little") == 0) return 0;
        if (PyUnicode_CompareWithASCIIString(v, "big") == 0) return 1;
        if (PyUnicode_CompareWithASCIIString(v, "native") == 0) return host_is_big();
    }
    PyErr_SetString(PyExc_ValueError, "default_byteorder must be None, 'little', 'big' or 'native'");
    return -1;
}

/* Parse the options and, for a zip, open it and read its version and byteorder
 * records. The Loader keeps its own references to the options. */
int loader_open(Loader *L, ModuleState *st, PyObject *args, PyObject *kwargs, const char *fname, int fmt) {
    PyObject *src, *map_location, *safe_globals, *encoding, *limits, *torch = Py_None;
    unsigned long long size;
    int mode, require_map, map_kind, weights_only, drop_pages = 0, default_big = 0;
    char format[64];
    snprintf(format, sizeof format, "%s:%s", OPEN_FORMAT, fname);
    memset(L, 0, sizeof *L); /* loader_close() is safe on it whatever happens below */
    L->fd = -1;
    /* drop_pages=bool and default_byteorder=str, optional (the others are required): taken out
     * before parsing */
    PyObject *dp = kwargs != NULL ? PyDict_GetItemString(kwargs, "drop_pages") : NULL;
    PyObject *bo = kwargs != NULL ? PyDict_GetItemString(kwargs, "default_byteorder") : NULL;
    if (dp != NULL || bo != NULL) {
        if ((dp != NULL && (drop_pages = PyObject_IsTrue(dp)) < 0) || (default_big = parse_default_byteorder(bo)) < 0 ||
            (kwargs = PyDict_Copy(kwargs)) == NULL)
            return -1;
        if ((dp != NULL && PyDict_DelItemString(kwargs, "drop_pages") < 0) ||
            (bo != NULL && PyDict_DelItemString(kwargs, "default_byteorder") < 0)) {
            Py_DECREF(kwargs);
            return -1;
        }
    }
    int parsed = PyArg_ParseTupleAndKeywords(args, kwargs, format, open_kwlist, &src, &size, &mode, &require_map,
                                             &map_kind, &map_location, &weights_only, &safe_globals, &encoding,
                                             &limits, &torch);
    if (dp != NULL || bo != NULL) Py_DECREF(kwargs);
    if (!parsed) return -1;
    memset(L, 0, sizeof *L);
    L->default_big = default_big;
    L->st = st;
    L->drop_ok = drop_pages && fmt == FMT_ZIP; /* a request: loader_drop_start decides */
    L->mode = mode;
    L->require_map = require_map;
    L->ml_kind = map_kind;
    L->map_location = Py_NewRef(map_location);
    L->weights_only = weights_only;
    L->safe_globals = safe_globals == Py_None ? NULL : Py_NewRef(safe_globals);
    L->encoding = encoding == Py_None ? NULL : Py_NewRef(encoding);
    L->fd = -1;
    if (L->safe_globals != NULL && !PyDict_Check(L->safe_globals)) {
        PyErr_SetString(PyExc_TypeError, "safe_globals must be a dict");
        return -1;
    }
    if ((map_kind == ML_STR && !PyUnicode_Check(map_location)) ||
        (map_kind == ML_DICT && !PyDict_Check(map_location))) {
        PyErr_SetString(PyExc_TypeError, "bad map_location");
        return -1;
    }
    if (tf_parse_limits(limits, &L->lim) < 0) return -1;
    if (torch != Py_None) {
        /* torch mode: every tensor is made by torch["tensor"], dtype values are torch["dtypes"] */
        PyObject *tt = PyDict_Check(torch) ? PyDict_GetItemString(torch, "tensor") : NULL;
        PyObject *td = PyDict_Check(torch) ? PyDict_GetItemString(torch, "dtypes") : NULL;
        if (tt == NULL || !PyCallable_Check(tt) || td == NULL || !PyTuple_Check(td) || PyTuple_GET_SIZE(td) != DT_COUNT) {
            PyErr_SetString(PyExc_TypeError, "torch must be a dict with 'tensor' and 'dtypes'");
            return -1;
        }
        L->torch = Py_NewRef(torch);
        L->torch_tensor = tt;
        L->torch_dtypes = td;
        L->torch_defer = PyDict_GetItemString(torch, "defer");
    }
    L->storages = PyDict_New();
    L->storage_list = PyList_New(0);
    L->pending = PyList_New(0);
    L->fixups = PyList_New(0);
    L->format = fmt;
    if (L->storages == NULL || L->storage_list == NULL || L->pending == NULL || L->fixups == NULL) return -1;
    if (fmt != FMT_ZIP && mode != SRC_MAP && mode != SRC_COPY) {
        PyErr_SetString(PyExc_ValueError, "legacy and tar checkpoints are read from a buffer");
        return -1;
    }
    TfErr err = {0};
    TfStatus rc;
    if (mode == SRC_PYFILE) {
        /* src: (file object, start position); read through seek/readinto */
        unsigned long long start;
        PyObject *f;
        if (!PyArg_ParseTuple(src, "OK:src", &f, &start)) return -1;
        L->pyfile = Py_NewRef(f);
        L->pyfile_start = start;
        L->size = size;
        rc = zipread_open(&L->zip, storage_read_pyfile, L, L->size, &L->lim, &err);
    } else if (mode == SRC_FD) {
        L->fd = (int)PyLong_AsLong(src);
        if (L->fd == -1 && PyErr_Occurred()) return -1;
        L->size = size;
        Py_BEGIN_ALLOW_THREADS
        rc = zipread_open(&L->zip, storage_read_fd, &L->fd, L->size, &L->lim, &err);
        Py_END_ALLOW_THREADS
    } else {
        L->src_owner = PyMemoryView_FromObject(src);
        if (L->src_owner == NULL) return -1;
        /* pages are only ever dropped from a file mapping (Source's own): never from memory
         * that holds the only copy of its bytes */
        if (strcmp(Py_TYPE(src)->tp_name, "mmap.mmap") != 0) L->drop_ok = 0;
        Py_buffer *view = PyMemoryView_GET_BUFFER(L->src_owner);
        L->src = view->buf;
        L->size = (uint64_t)view->len;
        L->src_writable = !view->readonly;
        if (fmt != FMT_ZIP) return 0;
        rc = zipread_open_mem(&L->zip, L->src, L->size, &L->lim, &err);
    }
    if (rc != TF_OK) return tf_raise_err(L, &err);
    /* torch.jit.save archives are told by their constants.pkl record, as torch.load does */
    L->torchscript = zipread_find(&L->zip, "constants.pkl", 13) != NULL;
    return read_version_and_byteorder(L);
}

/* ---- dropping the pages of local headers already read -----------------------------------
 *
 * Reading each storage's local header through the mapping maps its page into this process,
 * with the pages around it (the kernel's fault-around): on a file of many small tensors that
 * is every page of the file, so an mmap load that should add only metadata to the RSS adds the
 * file's size (page-cache pages, not private memory, but counted all the same). Source() maps
 * the file privately for one load and says so (drop_pages); then, in an archive of
 * DROP_MIN_RECORDS records or more, the pages behind the last header read are dropped
 * (MADV_DONTNEED) as the load goes, by the prefault thread below or, without one, by the
 * loading thread every DROP_BATCH headers, and the whole mapping when the load ends: arrays
 * over those pages fault them back in from the page cache when used.
 *
 * Dropping a page of a private mapping is only harmless when the page is clean: a page that
 * was written to (copy-on-write) would lose the writes. Nothing of ours writes to the mapping
 * except the byte swap of a big-endian file, and no user code can see an array or storage
 * before the load returns unless the load calls it: a map_location callable, safe_globals,
 * torch mode. loader_drop_start turns dropping off in all those cases, for lazy archives
 * (Archive, whose arrays outlive any one call) and for any buffer the caller did not map for
 * this load alone; loader_drop_off turns it off for the rest of the load before anything that
 * may run Python code (our helpers, and so any trace or profile hook) or release the GIL. */

#define DROP_BATCH 256u
/* Fewer records than this leave few header pages mapped (a few large tensors): not worth a
 * madvise over the whole file */
#define DROP_MIN_RECORDS 512u

static uintptr_t page_size(void) {
    static uintptr_t ps;
    if (ps == 0) {
        long v = sysconf(_SC_PAGESIZE);
        ps = v > 0 ? (uintptr_t)v : 4096;
    }
    return ps;
}

/* Drop the whole pages of the mapping within file offsets [lo, hi). */
static void drop_span(Loader *L, uint64_t lo, uint64_t hi) {
    uintptr_t ps = page_size();
    if (hi > L->size) hi = L->size;
    if (lo >= hi) return;
    uintptr_t a = ((uintptr_t)(L->src + lo) + ps - 1) & ~(ps - 1);
    uintptr_t b = ((uintptr_t)(L->src + hi)) & ~(ps - 1);
    if (b > a) (void)madvise((void *)a, b - a, MADV_DONTNEED);
}

static void loader_drop_start(Loader *L) {
    L->drop_ok = L->drop_ok && L->format == FMT_ZIP && L->mode == SRC_MAP && L->src != NULL &&
                 !L->big_endian && L->ml_kind != ML_CALL && L->safe_globals == NULL && L->torch == NULL &&
                 !L->lazy && L->zip.n_entries >= DROP_MIN_RECORDS;
    L->drop_n = 0;
    L->drop_end = 0;
    L->drop_seen = 0;
    L->drop_async = 0;
    (void)page_size(); /* set before the prefault thread may read it */
}

void loader_drop_note(Loader *L, const ZipEntry *e) {
    uint64_t off = e->header_offset;
    if (L->drop_n == 0 || off < L->drop_min) L->drop_min = off;
    if (L->drop_n == 0 || off > L->drop_max) L->drop_max = off;
    if (off > L->drop_seen) __atomic_store_n(&L->drop_seen, off, __ATOMIC_RELAXED);
    if (L->drop_async || ++L->drop_n < DROP_BATCH) return;
    /* from the end of the last span (or the lowest header, if below it) to the page of the highest
     * header, which the next header may share */
    uint64_t lo = L->drop_min < L->drop_end ? L->drop_min : L->drop_end;
    uint64_t hi = L->drop_max & ~(uint64_t)(page_size() - 1);
    drop_span(L, lo, hi);
    if (hi > L->drop_end) L->drop_end = hi;
    L->drop_n = 0;
}

/* The load is over: every page of the mapping goes. */
static void loader_drop_all(Loader *L) {
    if (L->drop_ok) drop_span(L, 0, L->size);
    L->drop_ok = 0;
}

/* ---- prefaulting the local headers of a mapped archive ------------------------------
 *
 * Each storage's local zip header must be read (it fixes where the data starts), and in a
 * fresh mapping every such read is a page fault: ~3,000 of them for a 50,000-storage
 * optimizer checkpoint, a fifth of the load. While the VM builds objects on this thread, a
 * second thread touches those pages in directory order, so the faults are taken off the
 * critical path. It only reads the mapping, which stays alive (the Loader holds it) until
 * the thread is joined.
 *
 * When pages are dropped (drop_ok) the same thread drops them too, behind the highest header
 * the loader has read (drop_seen), and touches pages at most PREFAULT_AHEAD bytes ahead of it:
 * the cost of unmapping stays off the critical path, and what is resident at once stays small.
 * It is joined before the load returns, so no page is dropped once user code holds the arrays. */

struct Prefault {
    const volatile uint8_t *base;
    uint64_t size;
    const ZipEntry *entries;
    size_t n;
    volatile int stop;
    Loader *drop;     /* the loader whose pages are dropped, or NULL */
    uint64_t dropped; /* end of the span dropped so far */
    int dropping;     /* cleared by loader_drop_off (under mu): no madvise after that */
    pthread_mutex_t mu;
};
typedef struct Prefault Prefault;

#define PREFAULT_AHEAD ((uint64_t)2 << 20)
#define DROP_STEP ((uint64_t)1 << 20)
#define DROP_BEHIND ((uint64_t)8 << 20) /* dropped even when not ahead, past this far behind */

/* Drop up to DROP_STEP * 4 bytes behind the loader (the page of the last header it read stays).
 * Returns 1 when it dropped something. */
static int prefault_drop(Prefault *p, uint64_t seen) {
    uint64_t hi = seen & ~(uint64_t)(page_size() - 1);
    if (hi < p->dropped + DROP_STEP) return 0;
    if (hi > p->dropped + 4 * DROP_STEP) hi = p->dropped + 4 * DROP_STEP;
    int done = 0;
    pthread_mutex_lock(&p->mu);
    if (p->dropping) {
        drop_span(p->drop, p->dropped, hi);
        p->dropped = hi;
        done = 1;
    }
    pthread_mutex_unlock(&p->mu);
    return done;
}

static int prefault_dropping(Prefault *p) { return __atomic_load_n(&p->dropping, __ATOMIC_RELAXED); }

int loader_need_dtype(Loader *L, int dt) {
    if (!tf_dtype_needs_import(L->st, dt)) return 0;
    loader_drop_off(L);
    return tf_need_dtype(L->st, dt);
}

void loader_drop_off(Loader *L) {
    if (!L->drop_ok) return;
    L->drop_ok = 0;
    Prefault *p = L->prefault;
    if (p != NULL && p->drop != NULL) {
        /* once the lock is released no madvise is running, and none starts */
        pthread_mutex_lock(&p->mu);
        __atomic_store_n(&p->dropping, 0, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&p->mu);
    }
}

static void *prefault_run(void *arg) {
    Prefault *p = arg;
    uint64_t last_page = UINT64_MAX;
    for (size_t i = 0; i < p->n && !p->stop; i++) {
        uint64_t off = p->entries[i].header_offset;
        if (off >= p->size || off >> 12 == last_page) continue;
        if (p->drop != NULL && !prefault_dropping(p)) p->drop = NULL; /* loader_drop_off: plain prefaulting */
        if (p->drop != NULL && __atomic_load_n(&p->drop->drop_seen, __ATOMIC_RELAXED) > p->dropped + DROP_BEHIND)
            prefault_drop(p, __atomic_load_n(&p->drop->drop_seen, __ATOMIC_RELAXED)); /* too far behind */
        if (p->drop != NULL) {
            /* Touch only pages ahead of the loader (a page it has read may be gone already),
             * at most PREFAULT_AHEAD bytes ahead (pages faulted too early would all be resident
             * at once). Faulting comes first: pages are dropped only while far enough ahead. */
            uint64_t seen;
            while ((seen = __atomic_load_n(&p->drop->drop_seen, __ATOMIC_RELAXED)) + PREFAULT_AHEAD < off &&
                   !p->stop && prefault_dropping(p)) {
                if (!prefault_drop(p, seen)) {
                    struct timespec ts = {0, 20000};
                    nanosleep(&ts, NULL);
                }
            }
            if (off <= seen) continue;
        }
        last_page = off >> 12;
        (void)p->base[off];
    }
    while (p->drop != NULL && !p->stop && prefault_dropping(p)) { /* every header touched: keep dropping until joined */
        if (!prefault_drop(p, __atomic_load_n(&p->drop->drop_seen, __ATOMIC_RELAXED))) {
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

static int prefault_start(Loader *L, Prefault *p, pthread_t *tid) {
    if (L->mode != SRC_MAP || L->zip.n_entries < 1024) return 0;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 2) return 0;
    p->base = L->src;
    p->size = L->size;
    p->entries = L->zip.entries;
    p->n = L->zip.n_entries;
    p->stop = 0;
    p->drop = L->drop_ok ? L : NULL;
    p->dropped = L->drop_end;
    p->dropping = p->drop != NULL;
    if (p->drop != NULL && pthread_mutex_init(&p->mu, NULL) != 0) return 0;
    if (pthread_create(tid, NULL, prefault_run, p) != 0) {
        if (p->drop != NULL) pthread_mutex_destroy(&p->mu);
        return 0;
    }
    L->drop_async = p->drop != NULL; /* loader_drop_note leaves the dropping to the thread */
    L->prefault = p;
    return 1;
}

static void prefault_stop(Loader *L, Prefault *p, pthread_t tid, int started) {
    if (!started) return;
    p->stop = 1;
    pthread_join(tid, NULL);
    if (L->drop_async) pthread_mutex_destroy(&p->mu);
    L->drop_async = 0;
    L->prefault = NULL;
}

/* Run the pickle `record` on the VM, its storages being the records under `dir`
 * (lazy: tensors become TensorRefs). New reference. */
static PyObject *loader_unpickle_record(Loader *L, const char *record, const char *dir) {
    ZipEntry *pe = zipread_find(&L->zip, record, strlen(record));
    if (pe == NULL) {
        if (zipread_find(&L->zip, "model.json", 10) != NULL)
            return tf_raise(L, L->st->FormatError,
                            "archive is a TorchScript model of the torch 1.0-1.3 format (model.json, no %s), "
                            "which torchfree does not read", record),
                   NULL;
        return tf_raise(L, L->st->FormatError, "archive has no %s record", record), NULL;
    }
    if (pe->usize > L->lim.pickle_bytes)
        return tf_raise(L, L->st->LimitError, "%s of %llu bytes exceeds the limit of %llu bytes", record,
                        (unsigned long long)pe->usize, (unsigned long long)L->lim.pickle_bytes),
               NULL;
    if (L->storage_dir == NULL || strcmp(L->storage_dir, dir) != 0) {
        L->storage_dir = dir;
        L->data0 = 0; /* the directory index of <dir>0 is looked up again */
    }
    TfErr err = {0};
    if (zipread_locate(&L->zip, pe, &err) != TF_OK) return tf_raise_err(L, &err), NULL;
    const uint8_t *pk;
    uint8_t *pickle_buf = NULL;
    if ((L->mode == SRC_MAP || L->mode == SRC_COPY) && pe->method == 0) {
        pk = L->src + pe->data_offset;
    } else {
        pickle_buf = PyMem_Malloc(pe->usize ? (size_t)pe->usize : 1);
        if (pickle_buf == NULL) return PyErr_NoMemory();
        if (zipread_extract(&L->zip, pe, pickle_buf, &err) != TF_OK) {
            PyMem_Free(pickle_buf);
            return tf_raise_err(L, &err), NULL;
        }
        pk = pickle_buf;
    }
    L->record = record;
    /* the VM makes many containers and no cycles: a collection pass per few
     * hundred of them would cost more than the whole load */
    int gc_was_enabled = PyGC_Disable();
    /* the pickle is read all along: pages are dropped from its end on (torch writes it first) */
    if (L->drop_ok && pe->data_offset + pe->csize > L->drop_end) L->drop_end = pe->data_offset + pe->csize;
    Prefault pf;
    pthread_t pf_tid;
    int pf_started = L->lazy ? 0 : prefault_start(L, &pf, &pf_tid);
    PyObject *obj = vm_run(L, pk, (size_t)pe->usize);
    prefault_stop(L, &pf, pf_tid, pf_started);
    if (gc_was_enabled) PyGC_Enable();
    L->pk_start = NULL; /* later errors are not at a pickle offset */
    vm_free(L);
    PyMem_Free(pickle_buf);
    return obj;
}

static PyObject *loader_unpickle(Loader *L) { return loader_unpickle_record(L, "data.pkl", "data/"); }

/* A TorchScript archive's constants.pkl (the tensors its code names as CONSTANTS.c<i>, storages
 * under constants/) set as `constants` on the module Opaque that data.pkl gave. */
static int loader_constants(Loader *L, PyObject *obj) {
    if (!L->torchscript || (PyObject *)Py_TYPE(obj) != L->st->OpaqueType) return 0;
    /* constants/<k> are other records than data/<k>: a fresh table for keys without a record */
    PyObject *fresh = PyDict_New();
    if (fresh == NULL) return -1;
    Py_SETREF(L->storages, fresh);
    PyObject *consts = loader_unpickle_record(L, "constants.pkl", "constants/");
    if (consts == NULL) return -1;
    int r = PyObject_SetAttrString(obj, "constants", consts);
    Py_DECREF(consts);
    return r;
}

/* load_zip(src, size, *, mode, ...): the one-shot load behind torchfree.load.
 * src is a buffer (mode 0: zero-copy views; mode 1: copies) or a file
 * descriptor (mode 2: each storage read into fresh memory). */
PyObject *mod_load_zip(PyObject *module, PyObject *args, PyObject *kwargs) {
    Loader L = {0}; /* loader_close below also runs when numpy fails to import (no loader_open) */
    PyObject *obj = NULL;
    if (tf_numpy(PyModule_GetState(module)) == 0 &&
        loader_open(&L, PyModule_GetState(module), args, kwargs, "load_zip", FMT_ZIP) == 0) {
        loader_drop_start(&L);
        PyObject *ts = L.torch && L.torchscript ? PyDict_GetItemString(L.torch, "torchscript") : NULL;
        if (ts != NULL) /* torch mode: torch.load's own answer to a TorchScript archive */
            obj = PyObject_CallNoArgs(ts);
        else
            obj = loader_unpickle(&L);
        if (obj != NULL && (loader_constants(&L, obj) < 0 || storage_finish(&L) < 0)) Py_CLEAR(obj);
        if (obj != NULL) Py_SETREF(obj, loader_torch_finish(&L, obj));
        loader_drop_all(&L);
    }
    loader_close(&L);
    return obj;
}

/* How deep holds_storage looks (torch.py's _replace_storages goes as deep). */
#define FINISH_MAX_DEPTH 200

/* 1 when obj holds a torchfree.Storage in its dicts, lists and exact tuples (each container
 * looked at once: a pickle's memo can make a deep DAG of them), 0 when not, -1 on error. No
 * Python code runs. */
static int holds_storage(ModuleState *st, PyObject *obj, PtrMap *seen, int depth) {
    PyTypeObject *tp = Py_TYPE(obj);
    if (tp == st->StorageType) return 1;
    if (!(PyDict_Check(obj) || PyList_Check(obj) || tp == &PyTuple_Type) || depth > FINISH_MAX_DEPTH) return 0;
    uint64_t mark;
    if (ptrmap_get(seen, obj, &mark)) return 0;
    if (ptrmap_set(seen, obj, 1) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    if (PyDict_Check(obj)) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(obj, &pos, &k, &v)) {
            int r = holds_storage(st, v, seen, depth + 1);
            if (r != 0) return r;
        }
        return 0;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject **items = PySequence_Fast_ITEMS(obj);
    for (Py_ssize_t i = 0; i < n; i++) {
        int r = holds_storage(st, items[i], seen, depth + 1);
        if (r != 0) return r;
    }
    return 0;
}

/* Torch mode: torch gives the storages a file holds outside tensors as TypedStorage; the
 * "finish" helper replaces ours, called only when there is one (walking the result in Python
 * would cost every load). New reference. */
PyObject *loader_torch_finish(Loader *L, PyObject *obj) {
    PyObject *fin = L->torch ? PyDict_GetItemString(L->torch, "finish") : NULL;
    if (fin == NULL) return Py_NewRef(obj);
    PtrMap seen;
    ptrmap_init(&seen);
    int found = holds_storage(L->st, obj, &seen, 0);
    ptrmap_free(&seen);
    if (found <= 0) return found < 0 ? NULL : Py_NewRef(obj);
    return PyObject_CallOneArg(fin, obj);
}

/* ---- Archive ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Loader L;
    int open;
} ArchiveObject;

static ArchiveObject *archive_check(PyObject *self) {
    ArchiveObject *a = (ArchiveObject *)self;
    if (!a->open) {
        PyErr_SetString(PyExc_ValueError, "the checkpoint is closed");
        return NULL;
    }
    return a;
}

static PyObject *Archive_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    ModuleState *st = tf_state_of_type(type);
    if (st == NULL) return NULL;
    ArchiveObject *a = (ArchiveObject *)type->tp_alloc(type, 0);
    if (a == NULL) return NULL;
    if (loader_open(&a->L, st, args, kwargs, "Archive", FMT_ZIP) < 0) {
        loader_close(&a->L);
        Py_DECREF(a);
        return NULL;
    }
    a->L.drop_ok = 0; /* its arrays outlive any one call */
    a->open = 1;
    return (PyObject *)a;
}

static int Archive_traverse(ArchiveObject *a, visitproc visit, void *arg) {
    Py_VISIT(a->L.map_location);
    Py_VISIT(a->L.safe_globals);
    Py_VISIT(a->L.storages);
    Py_VISIT(a->L.storage_list);
    Py_VISIT(a->L.pending);
    Py_VISIT(a->L.pyfile);
    Py_VISIT(a->L.torch);
    Py_VISIT(Py_TYPE(a));
    return 0;
}

static int Archive_clear(ArchiveObject *a) {
    a->open = 0;
    loader_close(&a->L);
    return 0;
}

static void Archive_dealloc(ArchiveObject *a) {
    PyTypeObject *tp = Py_TYPE(a);
    PyObject_GC_UnTrack(a);
    Archive_clear(a);
    tp->tp_free(a);
    Py_DECREF(tp);
}

PyDoc_STRVAR(Archive_unpickle_doc,
"unpickle($self, /, lazy=True, collect_globals=False)\n--\n\n"
"Run data.pkl. lazy: tensors become TensorRefs read on demand by materialize().\n"
"collect_globals: record every GLOBAL (see globals()).");

static PyObject *Archive_unpickle(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"lazy", "collect_globals", NULL};
    int lazy = 1, collect = 0;
    ArchiveObject *a = archive_check(self);
    if (a == NULL || !PyArg_ParseTupleAndKeywords(args, kwargs, "|pp:unpickle", kwlist, &lazy, &collect))
        return NULL;
    Loader *L = &a->L;
    if (!lazy && tf_numpy(L->st) < 0) return NULL; /* a lazy run makes arrays only where it must */
    L->lazy = lazy;
    if (collect && L->globals_seen == NULL && (L->globals_seen = PySet_New(NULL)) == NULL) return NULL;
    PyObject *obj = loader_unpickle(L);
    if (obj != NULL && !lazy && storage_finish(L) < 0) Py_CLEAR(obj);
    return obj;
}

static PyObject *Archive_materialize(PyObject *self, PyObject *ref) {
    ArchiveObject *a = archive_check(self);
    return a && tf_numpy(a->L.st) == 0 ? tensor_materialize(&a->L, ref) : NULL;
}

static PyObject *Archive_read_storage(PyObject *self, PyObject *storage) {
    ArchiveObject *a = archive_check(self);
    if (a == NULL || tf_numpy(a->L.st) < 0) return NULL;
    if (Py_TYPE(storage) != a->L.st->StorageType) {
        PyErr_SetString(PyExc_TypeError, "expected a torchfree.Storage");
        return NULL;
    }
    if (storage_ready(&a->L, (StorageObject *)storage) < 0) return NULL;
    return Py_NewRef(storage);
}

static PyObject *Archive_records(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    ArchiveObject *a = archive_check(self);
    if (a == NULL) return NULL;
    ZipReader *z = &a->L.zip;
    PyObject *list = PyList_New((Py_ssize_t)z->n_entries);
    if (list == NULL) return NULL;
    for (size_t i = 0; i < z->n_entries; i++) {
        ZipEntry *e = &z->entries[i];
        PyObject *t = Py_BuildValue("(NiKKK)", PyUnicode_DecodeUTF8(e->name, (Py_ssize_t)e->name_len, "replace"),
                                    (int)e->method,
                                    (unsigned long long)e->csize, (unsigned long long)e->usize,
                                    (unsigned long long)(e->header_offset - z->base));
        if (t == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

static PyObject *Archive_record_table(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    ArchiveObject *a = archive_check(self);
    return a ? records_pack(&a->L.zip) : NULL;
}

static PyObject *Archive_storages(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    ArchiveObject *a = archive_check(self);
    return a ? PyList_GetSlice(a->L.storage_list, 0, PY_SSIZE_T_MAX) : NULL;
}

static PyObject *Archive_globals(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    ArchiveObject *a = (ArchiveObject *)self;
    if (a->L.globals_seen == NULL) return PyList_New(0);
    PyObject *l = PySequence_List(a->L.globals_seen);
    if (l != NULL && PyList_Sort(l) < 0) Py_CLEAR(l);
    return l;
}

static PyObject *Archive_close(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    Archive_clear((ArchiveObject *)self);
    Py_RETURN_NONE;
}

static PyObject *Archive_get_byteorder(ArchiveObject *a, void *c) {
    return PyUnicode_FromString(a->L.file_big ? "big" : "little");
}

static PyObject *Archive_get_prefix(ArchiveObject *a, void *c) {
    if (!a->open) Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8(a->L.zip.prefix, (Py_ssize_t)a->L.zip.prefix_len, "replace");
}

static PyObject *Archive_get_closed(ArchiveObject *a, void *c) { return PyBool_FromLong(!a->open); }

static PyObject *Archive_get_torchscript(ArchiveObject *a, void *c) { return PyBool_FromLong(a->L.torchscript); }

static PyMethodDef Archive_methods[] = {
    {"unpickle", (PyCFunction)(void (*)(void))Archive_unpickle, METH_VARARGS | METH_KEYWORDS, Archive_unpickle_doc},
    {"materialize", Archive_materialize, METH_O,
     "materialize($self, ref, /)\n--\n\nThe array of a TensorRef (reads its storage once)."},
    {"read_storage", Archive_read_storage, METH_O,
     "read_storage($self, storage, /)\n--\n\nRead a lazy Storage's bytes; returns it."},
    {"records", Archive_records, METH_NOARGS,
     "records($self, /)\n--\n\n[(name, method, compressed size, size, header offset)] of the zip."},
    {"record_table", Archive_record_table, METH_NOARGS,
     "record_table($self, /)\n--\n\nrecords() packed as bytes, for _core.record_infos (internal)."},
    {"storages", Archive_storages, METH_NOARGS,
     "storages($self, /)\n--\n\nThe Storage of every record the pickle named, in first-use order."},
    {"globals", Archive_globals, METH_NOARGS,
     "globals($self, /)\n--\n\nSorted 'module.name' of every GLOBAL seen by unpickle(collect_globals=True)."},
    {"close", Archive_close, METH_NOARGS, "close($self, /)\n--\n\nRelease the zip index and source."},
    {NULL},
};

static PyGetSetDef Archive_getset[] = {
    {"byteorder", (getter)Archive_get_byteorder, NULL, "'little' or 'big' (the byteorder record)", NULL},
    {"prefix", (getter)Archive_get_prefix, NULL, "the archive's top folder", NULL},
    {"closed", (getter)Archive_get_closed, NULL, "True after close()", NULL},
    {"torchscript", (getter)Archive_get_torchscript, NULL, "True for a torch.jit.save archive (constants.pkl)", NULL},
    {NULL},
};

static PyType_Slot Archive_slots[] = {
    {Py_tp_new, Archive_new},
    {Py_tp_dealloc, Archive_dealloc},
    {Py_tp_traverse, Archive_traverse},
    {Py_tp_clear, Archive_clear},
    {Py_tp_methods, Archive_methods},
    {Py_tp_getset, Archive_getset},
    {Py_tp_doc, "Archive(src, size, *, mode, require_map, map_kind, map_location, weights_only, safe_globals,"
                " encoding, limits)\n\nA zip checkpoint opened for scan() and lazy open() (internal)."},
    {0, NULL},
};

PyType_Spec ArchiveSpec = {
    .name = "torchfree._core.Archive",
    .basicsize = sizeof(ArchiveObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Archive_slots,
};
