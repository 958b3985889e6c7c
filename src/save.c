/* save.c - torchfree.save(): numpy objects -> a checkpoint torch.load reads. The entry point:
 * arguments, the target (a file descriptor, written by writer.c with the GIL released, or a
 * Python file object through the stream sink here), and the three steps, all per call (no module
 * globals):
 *
 * 1. collect: walk the object, refuse what torch cannot rebuild, group the arrays into storage
 *    records (save_collect.c);
 * 2. pickle: emit data.pkl as CPython's _pickle.c would for the torch version of the object
 *    (save_pickle.c);
 * 3. write: the zip records or the legacy stream, straight from the arrays' memory (writer.c,
 *    Python-free). */
#include "saver.h"

#include <errno.h>
#include <unistd.h>

#include "save.h"

/* ---- the Python file-object sink --------------------------------------------------- */

typedef struct {
    PyObject *write;        /* the file object's bound write(), with the GIL */
    /* the record being written: pieces inside it are passed without a copy */
    const char *span_lo, *span_hi;
    PyObject *span_owner;
} StreamSink;

static int stream_write(void *ctx, const void *buf, size_t n) {
    StreamSink *k = ctx;
    const char *p = buf;
    while (n > 0) {
        PyObject *chunk;
        if (k->span_owner != NULL && p >= k->span_lo && p + n <= k->span_hi) {
            /* a read-only view that keeps the array's owner alive, should
             * the stream hold on to it */
            npy_intp dims[1] = {(npy_intp)n};
            PyObject *view = PyArray_NewFromDescr(&PyArray_Type, PyArray_DescrFromType(NPY_UINT8), 1, dims, NULL,
                                                  (void *)p, 0, NULL);
            if (view == NULL) return -1;
            if (PyArray_SetBaseObject((PyArrayObject *)view, Py_NewRef(k->span_owner)) < 0) {
                Py_DECREF(view);
                return -1;
            }
            chunk = PyMemoryView_FromObject(view);
            Py_DECREF(view);
        } else {
            chunk = PyBytes_FromStringAndSize(p, (Py_ssize_t)n);
        }
        if (chunk == NULL) return -1;
        PyObject *res = PyObject_CallOneArg(k->write, chunk);
        Py_DECREF(chunk);
        if (res == NULL) return -1;
        size_t done = n;
        if (PyLong_Check(res)) {
            /* raw streams may write less; anything else counts as all (as torch) */
            Py_ssize_t w = PyLong_AsSsize_t(res);
            if (w < 0 && PyErr_Occurred()) {
                Py_DECREF(res);
                return -1;
            }
            if (w >= 0 && (size_t)w < n) done = (size_t)w;
            if (w == 0) {
                Py_DECREF(res);
                PyErr_SetString(PyExc_OSError, "the stream's write() wrote nothing");
                return -1;
            }
        }
        Py_DECREF(res);
        p += done;
        n -= done;
    }
    return 0;
}


static void stream_span(void *ctx, const WrRecord *r) {
    StreamSink *k = ctx;
    k->span_lo = r ? r->start : NULL;
    k->span_hi = r ? r->start + r->nbytes : NULL;
    k->span_owner = r ? (PyObject *)r->owner : NULL;
}

/* ---- entry point ------------------------------------------------------------------- */

static void saver_free(Saver *S) {
    for (size_t i = 0; i < S->n_items; i++) {
        Py_XDECREF(S->items[i].obj);
        Py_XDECREF(S->items[i].arr);
    }
    for (size_t i = 0; i < S->n_recs; i++) {
        SaveRecord *r = &S->recs[i];
        if (r->has_view) PyBuffer_Release(&r->view);
        Py_XDECREF(r->owner);
        Py_XDECREF(r->key);
    }
    PyMem_Free(S->items);
    PyMem_Free(S->recs);
    PyMem_Free(S->path);
    PyMem_Free(S->order);
    ptrmap_free(&S->seen);
    pickler_free(&S->pk);
    Py_XDECREF(S->keep);
    Py_XDECREF(S->str_storage);
    Py_XDECREF(S->str_cpu);
    Py_XDECREF(S->str_latin1);
    Py_XDECREF(S->parts);
}
/* Hold a buffer export on each record's owner while its bytes are written
 * (a bytearray cannot be resized, an mmap not closed meanwhile). */
static int hold_buffers(Saver *S) {
    for (size_t i = 0; i < S->n_recs; i++) {
        SaveRecord *r = &S->recs[i];
        if (r->dead || !PyObject_CheckBuffer(r->owner)) continue;
        int flags = PyArray_Check(r->owner) ? PyBUF_STRIDES : PyBUF_SIMPLE;
        if (PyObject_GetBuffer(r->owner, &r->view, flags) < 0) {
            PyErr_Clear(); /* the references we hold keep the memory alive */
            continue;
        }
        r->has_view = 1;
        if (!PyArray_Check(r->owner) && PyBuffer_IsContiguous(&r->view, 'C')) {
            const char *b = r->view.buf;
            if (r->nbytes > 0 && (r->start < b || r->start + r->nbytes > b + r->view.len))
                return PyErr_Format(PyExc_ValueError, "array memory lies outside its owner's buffer"), -1;
        }
    }
    return 0;
}

static int saver_init(Saver *S, PyObject *module, int legacy) {
    memset(S, 0, sizeof *S);
    S->st = PyModule_GetState(module);
    S->legacy = legacy;
    pickler_init(&S->pk);
    ptrmap_init(&S->seen);
    S->keep = PyList_New(0);
    S->str_storage = PyUnicode_InternFromString("storage");
    S->str_cpu = PyUnicode_InternFromString("cpu");
    S->str_latin1 = PyUnicode_InternFromString("latin1");
    if (S->keep == NULL || S->str_storage == NULL || S->str_cpu == NULL || S->str_latin1 == NULL) return -1;
    return 0;
}

/* The target: an int file descriptor (fd) or an object with a write() method (stream). */
static int open_target(PyObject *target, int sync, WrFdSink *fd, StreamSink *stream) {
    if (PyLong_Check(target)) {
        long v = PyLong_AsLong(target);
        if (v < 0 || v > INT_MAX) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad file descriptor");
            return -1;
        }
        fd->fd = (int)v;
        if (sync) {
            off_t at = lseek(fd->fd, 0, SEEK_CUR);
            fd->kick = at >= 0;
            fd->pos = fd->kicked = at >= 0 ? (int64_t)at : 0;
        }
        return 0;
    }
    stream->write = PyObject_GetAttrString(target, "write");
    return stream->write != NULL ? 0 : -1;
}

/* 3. write: the records in write order (zip: key order; legacy: the sorted key list's) through
 * writer.c; for a file descriptor with the GIL released. kp: the legacy key list's pickle. */
static int write_out(Saver *S, WrFdSink *fd, StreamSink *stream, const char *prefix, size_t prefix_len,
                     int crc_thread, const Pickler *kp, const LegacyKey *keys) {
    if (hold_buffers(S) < 0) return -1;
    WrRecord *recs = PyMem_Malloc((S->n_order ? S->n_order : 1) * sizeof *recs);
    if (recs == NULL) return PyErr_NoMemory(), -1;
    for (size_t i = 0; i < S->n_order; i++) {
        SaveRecord *r = &S->recs[S->legacy ? keys[i].rec : S->order[i]];
        recs[i] = (WrRecord){.start = r->start, .nbytes = r->nbytes, .owner = r->owner};
        if (S->legacy) recs[i].numel = r->nbytes / dtypes_table[r->dt].itemsize;
    }
    WriteJob w = {.prefix = prefix, .prefix_len = prefix_len, .pickle = S->pk.data, .pickle_len = S->pk.len,
                  .recs = recs, .n_recs = S->n_order, .keys_pickle = kp->data, .keys_len = kp->len,
                  .use_thread = crc_thread < 0 ? wr_crc_thread_pays() : crc_thread};
    TfStatus rc;
    if (fd->fd >= 0) {
        w.write = wr_fd_write;
        w.ctx = w.fd = fd;
        Py_BEGIN_ALLOW_THREADS
        rc = S->legacy ? write_legacy(&w) : write_zip(&w);
        wr_fd_trim(fd);
        Py_END_ALLOW_THREADS
    } else {
        w.write = stream_write;
        w.ctx = stream;
        w.span = stream_span;
        rc = S->legacy ? write_legacy(&w) : write_zip(&w);
    }
    PyMem_Free(recs);
    if (rc == TF_OK) return 0;
    if (PyErr_Occurred()) return -1; /* raised by the stream */
    if (rc == TF_ERR_NOMEM) {
        PyErr_NoMemory();
    } else if (rc == TF_ERR_IO && fd->err) {
        errno = fd->err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        PyErr_Format(PyExc_ValueError, "cannot write the checkpoint: %s", w.err.detail);
    }
    return -1;
}

/* target.flush() when it has one. */
static int flush_stream(PyObject *target) {
    PyObject *flush = PyObject_GetAttrString(target, "flush");
    if (flush == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *r = PyObject_CallNoArgs(flush);
    Py_DECREF(flush);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

const char mod_save_doc[] =
    "save($module, /, obj, target, archive_name, legacy, *, crc_thread=-1, sync=False)\n--\n\n"
    "Write obj as a torch checkpoint (internal: use torchfree.save).\n\n"
    "target is a file descriptor (written with the GIL released) or an object with a\n"
    "write() method. archive_name is the zip's top folder; legacy selects the pre-1.6\n"
    "stream. crc_thread: 1 computes the CRC-32s on a second thread while writing, 0\n"
    "chunk by chunk just before writing, -1 (default) decides by the idle CPUs. sync:\n"
    "the caller fsyncs afterwards, so start the writeback of a file descriptor's\n"
    "bytes while writing.";

PyObject *mod_save(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"obj", "target", "archive_name", "legacy", "crc_thread", "sync", NULL};
    PyObject *obj, *target;
    const char *prefix;
    Py_ssize_t prefix_len;
    int legacy, crc_thread = -1, sync = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOs#p|$ip:save", kwlist, &obj, &target, &prefix, &prefix_len,
                                     &legacy, &crc_thread, &sync) ||
        tf_numpy(PyModule_GetState(module)) < 0)
        return NULL;
    const uint16_t one = 1;
    if (*(const uint8_t *)&one == 0) {
        PyErr_SetString(PyExc_NotImplementedError, "torchfree.save supports little-endian hosts only");
        return NULL;
    }
    Saver S;
    WrFdSink fd = {.fd = -1};
    StreamSink stream = {0};
    LegacyKey *keys = NULL;
    Pickler kp;
    pickler_init(&kp);
    PyObject *result = NULL;
    if (saver_init(&S, module, legacy) < 0 || open_target(target, sync, &fd, &stream) < 0) goto done;
    /* 1. collect and group */
    if (save_collect(&S, obj) < 0 || save_make_records(&S, obj) < 0) goto done;
    if (legacy && (save_check_legacy(&S, obj) < 0 || save_legacy_keys(&S, &keys) < 0)) goto done;
    /* 2. pickle */
    if (save_pickle_main(&S, obj) < 0) goto done;
    if (legacy && save_pickle_legacy_keys(&S, &kp, keys) < 0) goto done;
    /* 3. write */
    if (write_out(&S, &fd, &stream, prefix, (size_t)prefix_len, crc_thread, &kp, keys) < 0) goto done;
    if (stream.write != NULL && flush_stream(target) < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(stream.write);
    PyMem_Free(keys);
    pickler_free(&kp);
    saver_free(&S);
    return result;
}
