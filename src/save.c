/* save.c - torchfree.save(): numpy objects -> a checkpoint torch.load reads.
 *
 * Three steps, all per call (no module globals):
 *
 * 1. collect: walk the object once, refuse what torch's weights-only
 *    unpickler could not rebuild (TypeError naming the key path), and note
 *    every array (and bare torchfree.Storage). Arrays are grouped by the
 *    object that owns their memory (following ndarray .base, memoryview .obj
 *    and torchfree.Storage dtype variants); each group becomes one storage
 *    record: a torchfree.Storage is written whole (as torch writes a whole
 *    storage, so a load -> save round trip reproduces the file), any other
 *    owner as the byte span covering its arrays. Records of different owners
 *    whose bytes overlap (two .numpy() views of one torch tensor) merge.
 *    Layouts torch cannot express (negative strides, strides or offsets that
 *    are not a multiple of the item size) and non-native byte orders are
 *    written as contiguous copies of those arrays alone. The same bytes
 *    viewed as two dtypes raise, as torch.save does.
 * 2. pickle: emit data.pkl through pickler.c in exactly the order CPython's
 *    _pickle.c would for the torch version of the object (memo included),
 *    storage keys "0", "1", ... in first-encounter order.
 * 3. write: the zip records (zipwrite.c) or the legacy stream, straight from
 *    the arrays' memory; for a file descriptor with the GIL released. zlib
 *    computes each storage's CRC-32 in the same pass: on a second thread
 *    over the bytes being written when a core is idle for it, else chunk by
 *    chunk just before each chunk is written. When the caller will fsync,
 *    writeback is started as the bytes are written (sync_file_range, on Linux: platform.h). */
#include "module.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32.h"
#include "opcodes.h"
#include "pickler.h"
#include "platform.h"
#include "save.h"
#include "zipwrite.h"

/* Memo identities of objects that exist only on torch's side. Their
 * addresses stand for the objects (pickler.h); dtype and storage-class
 * GLOBALs use the addresses of their dtype table fields. */
static const char K_REBUILD_V2, K_REBUILD_V3, K_REBUILD_META, K_REBUILD_QTENSOR, K_UNTYPED, K_ORDERED_DICT, K_COUNTER, K_SET,
    K_COMPLEX, K_CODECS_ENCODE, K_BYTEARRAY;

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
#define SAVE_BATCH 1000                          /* _pickle.c BATCHSIZE */
#define SAVE_RESERVE_MIN ((uint64_t)1 << 20)     /* smaller saves reserve no blocks */

/* ---- per-call state ---------------------------------------------------------- */

typedef struct {
    PyObject *obj;     /* as found in the structure (ndarray, Storage) */
    PyObject *arr;     /* ndarray whose bytes are written (obj or a copy); NULL for a bare Storage */
    PyObject *owner;   /* memory owner this item is grouped on (borrowed from arr/obj's chain) */
    char *lo, *hi;     /* bytes it spans */
    int dt;
    int rec;           /* record index */
    int64_t offset;    /* in elements from the record start */
} SaveItem;

typedef struct {
    PyObject *owner;   /* strong */
    char *start;
    uint64_t nbytes;
    int dt;
    PyObject *key;     /* zip key string, made when first pickled */
    uint64_t legacy_key;
    int64_t order;     /* position in key order, -1 until pickled */
    uint32_t crc;
    Py_buffer view;    /* export held on the owner while writing, when it has one */
    int has_view;
    int dead;          /* merged into another record */
    size_t first_item; /* an item it holds (for messages) */
} SaveRecord;

typedef struct {
    PyObject *key;     /* dict key / attribute name (borrowed), or NULL */
    Py_ssize_t index;  /* list / tuple / set position */
} PathSeg;

typedef struct {
    ModuleState *st;
    int legacy;
    Pickler pk;
    PyObject *keep;        /* list: objects we made that the memo refers to */
    PyObject *str_storage, *str_cpu, *str_latin1;
    PyObject *parts;       /* dict: QuantizedArray / SparseArray -> what the save_parts helper made of it */
    /* collect */
    PtrMap seen;           /* container -> 1 (done) / 2 (tuple in progress); item object -> index + 3 */
    SaveItem *items;
    size_t n_items, cap_items;
    SaveRecord *recs;
    size_t n_recs, cap_recs;
    PathSeg *path;
    size_t depth, cap_path;
    /* pickle */
    size_t *order;         /* record indexes in key order */
    size_t n_order, cap_order;
} Saver;

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t ncap = *cap ? *cap * 2 : 64;
    while (ncap < need) ncap *= 2;
    void *q = PyMem_Realloc(*p, ncap * elem);
    if (q == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *p = q;
    *cap = ncap;
    return 0;
}

/* ---- errors with the key path ---------------------------------------------------- */

/* "a.b.0.c" for the current path (new reference). */
static PyObject *path_string(Saver *S) {
    PyObject *parts = PyList_New(0);
    if (parts == NULL) return NULL;
    for (size_t i = 0; i < S->depth; i++) {
        PyObject *s = S->path[i].key ? PyObject_Str(S->path[i].key) : PyUnicode_FromFormat("%zd", S->path[i].index);
        if (s == NULL || PyList_Append(parts, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(parts);
            return NULL;
        }
        Py_DECREF(s);
    }
    PyObject *dot = PyUnicode_FromString(".");
    PyObject *r = dot ? PyUnicode_Join(dot, parts) : NULL;
    Py_XDECREF(dot);
    Py_DECREF(parts);
    return r;
}

/* The __module__ of tp when it is torch's ("torch" or "torch.<sub>"), else NULL (no error set):
 * a torch object given to save() is pointed to torchfree.torch.save. New reference. */
static PyObject *torch_module_of(PyTypeObject *tp) {
    PyObject *mod = PyObject_GetAttrString((PyObject *)tp, "__module__");
    const char *m = mod != NULL && PyUnicode_Check(mod) ? PyUnicode_AsUTF8(mod) : NULL;
    if (m != NULL && strncmp(m, "torch", 5) == 0 && (m[5] == '\0' || m[5] == '.')) return mod;
    PyErr_Clear();
    Py_XDECREF(mod);
    return NULL;
}

/* Raise exc("<message> at key path 'p'"); returns -1. */
static int raise_at(Saver *S, PyObject *exc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    if (msg == NULL) return -1;
    PyObject *path = path_string(S);
    if (path == NULL) {
        Py_DECREF(msg);
        return -1;
    }
    if (S->depth == 0)
        PyErr_Format(exc, "%U (the object passed to save itself)", msg);
    else
        PyErr_Format(exc, "%U at key path '%U'", msg, path);
    Py_DECREF(msg);
    Py_DECREF(path);
    return -1;
}

static int push(Saver *S, PyObject *key, Py_ssize_t index) {
    if (grow((void **)&S->path, &S->cap_path, S->depth + 1, sizeof(PathSeg)) < 0) return -1;
    S->path[S->depth].key = key;
    S->path[S->depth].index = index;
    S->depth++;
    return 0;
}

/* ---- dtypes ---------------------------------------------------------------------- */

/* The torch dtype of a numpy dtype (any byte order), or -1. */
static int dtype_of_descr(ModuleState *st, PyArray_Descr *d) {
    int tn = d->type_num;
    if (tn >= NPY_USERDEF) {
        for (int i = 0; i < DT_COUNT; i++)
            if ((dtypes_table[i].flags & DTF_VALUE_IS_NUMPY) && st->descr[i] != NULL && st->descr[i]->type_num == tn)
                return PyDataType_ELSIZE(d) == dtypes_table[i].itemsize ? i : -1;
        if (!st->ml_loaded) {
            /* an ml_dtypes array before any load needed them: the caller has ml_dtypes
             * imported already (it made the array), so this only looks its types up */
            if (tf_ml_dtypes(st) < 0) {
                PyErr_Clear();
                return -1;
            }
            return dtype_of_descr(st, d);
        }
        return -1;
    }
    if (PyDataType_HASFIELDS(d) || PyDataType_HASSUBARRAY(d)) return -1;
    switch (d->kind) {
    case 'b':
        return PyDataType_ELSIZE(d) == 1 ? DT_BOOL : -1;
    case 'i':
        switch (PyDataType_ELSIZE(d)) {
        case 1: return DT_INT8;
        case 2: return DT_INT16;
        case 4: return DT_INT32;
        case 8: return DT_INT64;
        }
        return -1;
    case 'u':
        switch (PyDataType_ELSIZE(d)) {
        case 1: return DT_UINT8;
        case 2: return DT_UINT16;
        case 4: return DT_UINT32;
        case 8: return DT_UINT64;
        }
        return -1;
    case 'f':
        switch (PyDataType_ELSIZE(d)) {
        case 2: return DT_FLOAT16;
        case 4: return DT_FLOAT32;
        case 8: return DT_FLOAT64;
        }
        return -1;
    case 'c':
        switch (PyDataType_ELSIZE(d)) {
        case 8: return DT_COMPLEX64;
        case 16: return DT_COMPLEX128;
        }
        return -1;
    }
    return -1;
}

/* The torch dtype of a MetaArray's dtype (numpy dtype or "torch.<name>"), or -1. */
static int dtype_of_value(ModuleState *st, PyObject *v) {
    if (PyArray_DescrCheck(v)) {
        PyArray_Descr *d = (PyArray_Descr *)v;
        return PyArray_ISNBO(d->byteorder) ? dtype_of_descr(st, d) : -1;
    }
    if (PyUnicode_Check(v)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(v, &n);
        if (s == NULL) {
            PyErr_Clear();
            return -1;
        }
        if (n > 6 && memcmp(s, "torch.", 6) == 0) {
            DtypeId d = dtypes_by_name(s + 6, (size_t)n - 6);
            if (d != DT_NONE && !(dtypes_table[d].flags & (DTF_QUANTIZED | DTF_NO_TENSOR))) return (int)d;
        }
    }
    return -1;
}

/* ---- collect ------------------------------------------------------------------------ */

static int collect(Saver *S, PyObject *obj);

/* The object whose memory an array (or Storage) views, for grouping (borrowed). */
static PyObject *memory_owner(Saver *S, PyObject *o) {
    for (;;) {
        if (PyArray_Check(o)) {
            PyArrayObject *a = (PyArrayObject *)o;
            PyObject *b = PyArray_BASE(a);
            if (b == NULL || PyArray_CHKFLAGS(a, NPY_ARRAY_OWNDATA)) return o;
            o = b;
        } else if (PyMemoryView_Check(o)) {
            PyObject *b = PyMemoryView_GET_BASE(o);
            if (b == NULL) return o;
            o = b;
        } else if (Py_TYPE(o) == S->st->StorageType) {
            StorageObject *s = (StorageObject *)o;
            /* a dtype variant or a map_location replacement over the same bytes */
            while (s->owner != NULL && Py_TYPE(s->owner) == S->st->StorageType &&
                   ((StorageObject *)s->owner)->data == s->data && ((StorageObject *)s->owner)->nbytes == s->nbytes)
                s = (StorageObject *)s->owner;
            return (PyObject *)s;
        } else {
            return o;
        }
    }
}

/* Note an array (arr: the ndarray to write, stolen; NULL for a bare Storage). */
static int add_item(Saver *S, PyObject *obj, PyObject *arr, int dt) {
    if (grow((void **)&S->items, &S->cap_items, S->n_items + 1, sizeof(SaveItem)) < 0) {
        Py_XDECREF(arr);
        return -1;
    }
    if (ptrmap_set(&S->seen, obj, S->n_items + 3) < 0) {
        Py_XDECREF(arr);
        PyErr_NoMemory();
        return -1;
    }
    SaveItem *it = &S->items[S->n_items++];
    memset(it, 0, sizeof *it);
    it->obj = Py_NewRef(obj);
    it->arr = arr; /* steals */
    it->dt = dt;
    it->rec = -1;
    if (arr != NULL) {
        PyArrayObject *a = (PyArrayObject *)arr;
        it->owner = memory_owner(S, arr);
        it->lo = it->hi = PyArray_BYTES(a);
        if (PyArray_SIZE(a) > 0) {
            char *end = it->lo + PyArray_ITEMSIZE(a);
            for (int i = 0; i < PyArray_NDIM(a); i++) end += (PyArray_DIM(a, i) - 1) * PyArray_STRIDE(a, i);
            it->hi = end;
        }
    } else {
        StorageObject *s = (StorageObject *)obj;
        it->owner = memory_owner(S, obj);
        it->lo = s->data;
        it->hi = s->data + s->nbytes;
    }
    return 0;
}

/* An ndarray we can write as it is: strides of dims longer than 1 are
 * non-negative multiples of the item size. */
static int layout_ok(PyArrayObject *a) {
    npy_intp item = PyArray_ITEMSIZE(a);
    for (int i = 0; i < PyArray_NDIM(a); i++) {
        npy_intp s = PyArray_STRIDE(a, i);
        if (PyArray_DIM(a, i) > 1 && (s < 0 || s % item != 0)) return 0;
    }
    return 1;
}

static int is_memmap(PyObject *o) {
    const char *n = Py_TYPE(o)->tp_name;
    return strcmp(n, "numpy.memmap") == 0 || strcmp(n, "memmap") == 0;
}

/* force_dt: the dtype of the storage (a quantized tensor's int_repr), or -1 for the array's own */
static int collect_array(Saver *S, PyObject *obj, int force_dt) {
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!PyArray_CheckExact(obj) && !is_memmap(obj))
        return raise_at(S, PyExc_TypeError,
                        "cannot save a %s (an ndarray subclass): pass a plain numpy.ndarray (np.asarray(x))",
                        Py_TYPE(obj)->tp_name);
    PyArray_Descr *d = PyArray_DESCR(a);
    int dt = force_dt >= 0 ? force_dt : dtype_of_descr(S->st, d);
    if (dt < 0) return raise_at(S, PyExc_TypeError, "numpy dtype %R has no torch equivalent", (PyObject *)d);
    if (PyArray_NDIM(a) > (int)TF_LIMIT_NDIM) return raise_at(S, PyExc_ValueError, "array has too many dimensions");
    PyObject *w = Py_NewRef(obj);
    if (!PyArray_ISNBO(d->byteorder)) {
        /* written in native order (little-endian hosts: the byteorder record says little) */
        PyArray_Descr *nd = PyArray_DescrNewByteorder(d, NPY_NATIVE);
        PyObject *c = nd ? PyArray_CastToType(a, nd, 0) : NULL; /* steals nd */
        Py_SETREF(w, c);
        if (w == NULL) return -1;
    }
    if (!layout_ok((PyArrayObject *)w)) {
        /* negative or odd strides: torch cannot view them, write a contiguous copy */
        Py_SETREF(w, PyArray_NewCopy((PyArrayObject *)w, NPY_CORDER));
        if (w == NULL) return -1;
    }
    return add_item(S, obj, w, dt);
}

static int collect_container_items(Saver *S, PyObject *obj, int is_map) {
    if (is_map) {
        /* keys and values, in the mapping's own iteration order */
        PyObject *items = PyMapping_Items(obj);
        if (items == NULL) return -1;
        Py_ssize_t n = PyList_GET_SIZE(items);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *kv = PyList_GET_ITEM(items, i);
            PyObject *k = PyTuple_GET_ITEM(kv, 0), *v = PyTuple_GET_ITEM(kv, 1);
            if (push(S, k, 0) < 0 || collect(S, k) < 0 || collect(S, v) < 0) {
                Py_DECREF(items);
                return -1;
            }
            S->depth--;
        }
        Py_DECREF(items);
        return 0;
    }
    PyObject *seq = PySequence_Fast(obj, "not a sequence");
    if (seq == NULL) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (push(S, NULL, i) < 0 || collect(S, PySequence_Fast_GET_ITEM(seq, i)) < 0) {
            Py_DECREF(seq);
            return -1;
        }
        S->depth--;
    }
    Py_DECREF(seq);
    return 0;
}

/* The state pickle gives an OrderedDict: its __dict__ when not empty (new ref), or NULL. */
static PyObject *instance_state(PyObject *obj) {
    PyObject *d = PyObject_GenericGetDict(obj, NULL);
    if (d == NULL) return NULL;
    if (PyDict_Check(d) && PyDict_GET_SIZE(d) > 0) return d;
    Py_DECREF(d);
    return Py_NewRef(Py_None);
}

/* An int outside int64 as _pickle.c encodes it for LONG1: nbits/8 + 1 two's
 * complement bytes, less one redundant 0xff of a negative value (new
 * reference to a bytes object, or NULL). */
static PyObject *long_bytes(PyObject *obj) {
    PyObject *bits = PyObject_CallMethod(obj, "bit_length", NULL);
    if (bits == NULL) return NULL;
    Py_ssize_t nbytes = PyLong_AsSsize_t(bits);
    Py_DECREF(bits);
    if (nbytes < 0) return NULL;
    nbytes = nbytes / 8 + 1;
    PyObject *meth = PyObject_GetAttrString(obj, "to_bytes");
    PyObject *args = Py_BuildValue("(ns)", nbytes, "little");
    PyObject *kw = Py_BuildValue("{sO}", "signed", Py_True);
    PyObject *raw = (meth && args && kw) ? PyObject_Call(meth, args, kw) : NULL;
    Py_XDECREF(meth);
    Py_XDECREF(args);
    Py_XDECREF(kw);
    if (raw == NULL) return NULL;
    const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(raw);
    Py_ssize_t n = PyBytes_GET_SIZE(raw);
    if (n > 1 && p[n - 1] == 0xFF && (p[n - 2] & 0x80)) Py_SETREF(raw, PyBytes_FromStringAndSize((const char *)p, n - 1));
    return raw;
}

static int collect_int(Saver *S, PyObject *obj) {
    int overflow = 0;
    PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (!overflow) return PyErr_Occurred() ? -1 : 0;
    PyObject *raw = long_bytes(obj);
    if (raw == NULL) return -1;
    Py_ssize_t n = PyBytes_GET_SIZE(raw);
    Py_DECREF(raw);
    /* LONG1 holds 255 bytes; LONG4 is refused by torch's weights-only unpickler */
    if (n > 255)
        return raise_at(S, PyExc_OverflowError,
                        "int of %zd bytes is too large: torch.load(weights_only=True) reads ints of at most "
                        "255 bytes (LONG1)", n);
    return 0;
}

/* 1 when obj is exactly the class helpers[name] (a torchfree type), 0 if not, -1 on error. */
static int is_helper_type(Saver *S, PyObject *obj, const char *name) {
    PyObject *tp = tf_helper(S->st, name);
    if (tp == NULL) return -1;
    return (PyObject *)Py_TYPE(obj) == tp;
}

/* A QuantizedArray or SparseArray: the save_parts helper says what torch's
 * pickle of it holds: ("q", int_repr, dtype name, shape, qparams) or
 * ("call", SaveCall). Kept in S->parts for the pickle pass. */
static int collect_rare(Saver *S, PyObject *obj) {
    if (S->parts == NULL && (S->parts = PyDict_New()) == NULL) return -1;
    PyObject *f = tf_helper(S->st, "save_parts");
    PyObject *parts = f ? PyObject_CallOneArg(f, obj) : NULL;
    if (parts == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyObject *t, *v, *tb;
            PyErr_Fetch(&t, &v, &tb);
            PyErr_NormalizeException(&t, &v, &tb);
            int r = raise_at(S, t, "%S", v);
            Py_XDECREF(t);
            Py_XDECREF(v);
            Py_XDECREF(tb);
            return r;
        }
        return -1;
    }
    int r = PyDict_SetItem(S->parts, obj, parts);
    if (r == 0 && PyTuple_GET_SIZE(parts) == 5) {
        PyObject *int_repr = PyTuple_GET_ITEM(parts, 1);
        const char *name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(parts, 2));
        DtypeId dt = name ? dtypes_by_name(name, strlen(name)) : DT_NONE;
        uint64_t mark;
        if (dt == DT_NONE) r = -1;
        else if (!ptrmap_get(&S->seen, int_repr, &mark)) r = collect_array(S, int_repr, (int)dt);
        else if (mark < 3 || S->items[mark - 3].dt != (int)dt) /* two quantized tensors may share one */
            r = raise_at(S, PyExc_ValueError, "the int_repr array of a QuantizedArray is also saved as another dtype");
        if (r == 0) r = collect(S, PyTuple_GET_ITEM(parts, 4));
    } else if (r == 0) {
        r = collect(S, PyTuple_GET_ITEM(parts, 1));
    }
    Py_DECREF(parts);
    return r;
}

static int collect(Saver *S, PyObject *obj) {
    ModuleState *st = S->st;
    PyTypeObject *tp = Py_TYPE(obj);
    if (obj == Py_None || tp == &PyBool_Type || tp == &PyFloat_Type || tp == &PyUnicode_Type ||
        tp == &PyBytes_Type || tp == &PyByteArray_Type || tp == &PyComplex_Type)
        return 0;
    if (tp == &PyLong_Type) return collect_int(S, obj);
    uint64_t mark;
    int is_map = tp == &PyDict_Type || tp == (PyTypeObject *)st->OrderedDict || tp == (PyTypeObject *)st->Counter;
    int is_seq = tp == &PyList_Type || tp == &PyTuple_Type || tp == &PySet_Type;
    if (is_map || is_seq) {
        if (ptrmap_get(&S->seen, obj, &mark)) {
            if (mark == 2)
                return raise_at(S, PyExc_ValueError,
                                "a tuple contains itself: torch.load(weights_only=True) cannot rebuild it");
            return 0;
        }
        if (ptrmap_set(&S->seen, obj, tp == &PyTuple_Type ? 2 : 1) < 0) {
            PyErr_NoMemory();
            return -1;
        }
        if (Py_EnterRecursiveCall(" while saving a checkpoint")) return -1;
        int r = collect_container_items(S, obj, is_map);
        if (r == 0 && tp == (PyTypeObject *)st->OrderedDict) {
            PyObject *state = instance_state(obj);
            if (state == NULL) r = -1;
            else if (state != Py_None) r = collect_container_items(S, state, 1);
            Py_XDECREF(state);
        }
        Py_LeaveRecursiveCall();
        if (r == 0 && tp == &PyTuple_Type && ptrmap_set(&S->seen, obj, 1) < 0) {
            PyErr_NoMemory();
            r = -1;
        }
        return r;
    }
    if (PyArray_Check(obj)) {
        if (ptrmap_get(&S->seen, obj, &mark)) return 0;
        return collect_array(S, obj, -1);
    }
    if (tp == st->StorageType) {
        if (ptrmap_get(&S->seen, obj, &mark)) return 0;
        StorageObject *s = (StorageObject *)obj;
        if (s->meta || s->data == NULL)
            return raise_at(S, PyExc_TypeError, "cannot save a meta torchfree.Storage: it has no bytes");
        return add_item(S, obj, NULL, s->dtype);
    }
    if (PyArray_DescrCheck(obj)) {
        if (dtype_of_value(st, obj) < 0)
            return raise_at(S, PyExc_TypeError, "numpy dtype %R has no torch dtype equivalent", obj);
        return 0;
    }
    if (st->MetaArrayType != NULL && tp == (PyTypeObject *)st->MetaArrayType) {
        PyObject *shape = PyObject_GetAttr(obj, st->str_shape);
        PyObject *dtype = shape ? PyObject_GetAttr(obj, st->str_dtype) : NULL;
        int ok = dtype != NULL && PyTuple_Check(shape) && PyTuple_GET_SIZE(shape) <= (Py_ssize_t)TF_LIMIT_NDIM &&
                 dtype_of_value(st, dtype) >= 0;
        for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(shape); i++) {
            PyObject *v = PyTuple_GET_ITEM(shape, i);
            ok = PyLong_CheckExact(v) && PyLong_AsLongLong(v) >= 0;
            if (PyErr_Occurred()) {
                PyErr_Clear();
                ok = 0;
            }
        }
        Py_XDECREF(shape);
        Py_XDECREF(dtype);
        if (PyErr_Occurred()) return -1;
        if (!ok) return raise_at(S, PyExc_TypeError, "MetaArray with a shape or dtype torch cannot rebuild");
        return 0;
    }
    int rare = is_helper_type(S, obj, "QuantizedArray") || is_helper_type(S, obj, "SparseArray");
    if (rare < 0) return -1;
    if (rare) {
        if (ptrmap_get(&S->seen, obj, &mark)) return 0;
        if (ptrmap_set(&S->seen, obj, 1) < 0) {
            PyErr_NoMemory();
            return -1;
        }
        return collect_rare(S, obj);
    }
    if (is_helper_type(S, obj, "SaveGlobal") == 1) return 0;
    if (is_helper_type(S, obj, "SaveCall") == 1) {
        PyObject *args = PyObject_GetAttrString(obj, "args");
        int r = args ? collect(S, args) : -1;
        Py_XDECREF(args);
        return r;
    }
    if (st->OpaqueType != NULL && PyObject_TypeCheck(obj, (PyTypeObject *)st->OpaqueType)) {
        PyObject *q = PyObject_GetAttrString(obj, "qualname");
        if (q == NULL) return -1;
        int r = raise_at(S, PyExc_TypeError,
                         "cannot save torchfree.Opaque placeholder of %U: torch.load(weights_only=True) "
                         "would refuse the global %U", q, q);
        Py_DECREF(q);
        return r;
    }
    if (PyArray_IsScalar(obj, Generic))
        return raise_at(S, PyExc_TypeError,
                        "cannot save a numpy scalar (%s): torch.load(weights_only=True) refuses numpy "
                        "objects; use .item() for a Python number or np.asarray() for a 0-d array",
                        tp->tp_name);
    PyObject *mod = torch_module_of(tp);
    if (mod != NULL) {
        int r = raise_at(S, PyExc_TypeError,
                         "cannot save an object of type %U.%s: torchfree.save writes numpy objects; save torch "
                         "objects with torchfree.torch.save (torch.save's stand-in), or pass tensor.numpy()",
                         mod, tp->tp_name);
        Py_DECREF(mod);
        return r;
    }
    return raise_at(S, PyExc_TypeError,
                    "cannot save an object of type %s: torch.load(weights_only=True) could not rebuild it "
                    "(supported: dict, OrderedDict, Counter, list, tuple, set, str, bytes, bytearray, int, "
                    "float, complex, bool, None, numpy arrays, numpy dtypes, torchfree.MetaArray, "
                    "torchfree.QuantizedArray, torchfree.SparseArray and torchfree.Storage)", tp->tp_name);
}

/* ---- records ------------------------------------------------------------------------ */

static int new_record(Saver *S, PyObject *owner, char *start, uint64_t nbytes, int dt, size_t first_item) {
    if (grow((void **)&S->recs, &S->cap_recs, S->n_recs + 1, sizeof(SaveRecord)) < 0) return -1;
    SaveRecord *r = &S->recs[S->n_recs];
    memset(r, 0, sizeof *r);
    r->owner = Py_NewRef(owner);
    r->start = start;
    r->nbytes = nbytes;
    r->dt = dt;
    r->order = -1;
    r->first_item = first_item;
    return (int)S->n_recs++;
}

/* An item alone in a record: a C-contiguous copy of its array (or the array
 * itself when it owns contiguous memory). */
static int lone_record(Saver *S, SaveItem *it) {
    PyArrayObject *a = (PyArrayObject *)it->arr;
    if (!PyArray_IS_C_CONTIGUOUS(a)) {
        PyObject *c = PyArray_NewCopy(a, NPY_CORDER);
        if (c == NULL) return -1;
        Py_SETREF(it->arr, c);
        a = (PyArrayObject *)c;
    }
    it->owner = it->arr;
    it->lo = PyArray_BYTES(a);
    it->hi = it->lo + PyArray_NBYTES(a);
    int r = new_record(S, it->arr, it->lo, (uint64_t)PyArray_NBYTES(a), it->dt, (size_t)(it - S->items));
    if (r < 0) return -1;
    it->rec = r;
    it->offset = 0;
    return 0;
}

static int cmp_owner(const void *pa, const void *pb, void *items) {
    const SaveItem *a = &((SaveItem *)items)[*(const size_t *)pa], *b = &((SaveItem *)items)[*(const size_t *)pb];
    if (a->owner != b->owner) return (uintptr_t)a->owner < (uintptr_t)b->owner ? -1 : 1;
    if (a->dt != b->dt) return a->dt < b->dt ? -1 : 1;
    if (a->lo != b->lo) return (uintptr_t)a->lo < (uintptr_t)b->lo ? -1 : 1;
    return *(const size_t *)pa < *(const size_t *)pb ? -1 : 1;
}

/* Paths of two items, for the dtype conflict message (found by walking again). */
static int find_path(Saver *S, PyObject *obj, PyObject *target, int *found);

static int raise_conflict(Saver *S, PyObject *root, SaveItem *a, SaveItem *b) {
    PyObject *pa = NULL, *pb = NULL;
    int found = 0;
    S->depth = 0;
    if (find_path(S, root, a->obj, &found) == 0 && found) pa = path_string(S);
    S->depth = 0;
    found = 0;
    if (find_path(S, root, b->obj, &found) == 0 && found) pb = path_string(S);
    S->depth = 0;
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError,
                 "Cannot save multiple tensors or storages that view the same data as different types "
                 "('%S' as %s and '%S' as %s)",
                 pa ? pa : Py_None, dtypes_table[a->dt].name, pb ? pb : Py_None, dtypes_table[b->dt].name);
    Py_XDECREF(pa);
    Py_XDECREF(pb);
    return -1;
}

/* One record for a run of items of one owner and one dtype (idx sorted by
 * address): the whole torchfree.Storage when allowed and every item fits
 * it, else the span of the items; items off the item-size grid of the
 * lowest one are written alone. */
static int make_run(Saver *S, PyObject *owner, const size_t *idx, size_t n, int whole_allowed) {
    SaveItem *items = S->items;
    int d = items[idx[0]].dt;
    uint64_t item = dtypes_table[d].itemsize;
    char *lo = NULL, *hi = NULL;
    int whole = 0;
    if (whole_allowed && Py_TYPE(owner) == S->st->StorageType) {
        StorageObject *s = (StorageObject *)owner;
        whole = (uint64_t)s->nbytes % item == 0;
        for (size_t i = 0; whole && i < n; i++) {
            SaveItem *m = &items[idx[i]];
            whole = m->lo >= s->data && m->hi <= s->data + s->nbytes && (uint64_t)(m->lo - s->data) % item == 0;
        }
        lo = s->data;
        hi = s->data + s->nbytes;
    }
    if (!whole) {
        lo = items[idx[0]].lo; /* the lowest: strides are >= 0, so lo is each item's first byte */
        hi = lo;
        for (size_t i = 0; i < n; i++) { /* empty views (no bytes) do not widen the record */
            SaveItem *m = &items[idx[i]];
            if ((uint64_t)(m->lo - lo) % item == 0 && m->hi > m->lo && m->hi > hi) hi = m->hi;
        }
    }
    int rec = -1;
    for (size_t i = 0; i < n; i++) {
        SaveItem *m = &items[idx[i]];
        /* an empty view keeps its offset even past the record's end, as torch writes
         * torch.zeros(4, 0, 4)[1:] (offset 4 into a 0-byte storage) */
        int empty = m->hi == m->lo;
        if ((uint64_t)(m->lo - lo) % item != 0 || (!empty && m->hi > hi)) {
            if (m->arr == NULL) return PyErr_Format(PyExc_ValueError, "a torchfree.Storage does not fit its record"), -1;
            if (lone_record(S, m) < 0) return -1;
            continue;
        }
        if (rec < 0 && (rec = new_record(S, owner, lo, (uint64_t)(hi - lo), d, idx[i])) < 0) return -1;
        m->rec = rec;
        m->offset = (int64_t)((uint64_t)(m->lo - lo) / item);
    }
    return 0;
}

/* Group the items of one owner (idx sorted by dtype, then address). The
 * dtype of the first item with bytes is the owner's; items of another dtype
 * are alone when empty, an error when their bytes overlap the owner's
 * dtype's (torch: "view the same data as different types"), else a record
 * of their own. */
static int group_owner(Saver *S, PyObject *root, size_t *idx, size_t n) {
    SaveItem *items = S->items;
    PyObject *owner = items[idx[0]].owner;
    if (Py_TYPE(owner) == S->st->StorageType && ((StorageObject *)owner)->nbytes == 0) {
        /* an empty torchfree.Storage used as several dtypes (it has no bytes to disagree on):
         * one record, as torch writes one storage, each use naming its own dtype (emit_pid) */
        StorageObject *s = (StorageObject *)owner;
        int rec = -1;
        for (size_t i = 0; i < n; i++) {
            SaveItem *m = &items[idx[i]];
            if (m->lo != s->data && m->arr != NULL) { /* not at its start: an array of its own */
                if (lone_record(S, m) < 0) return -1;
                continue;
            }
            if (rec < 0 && (rec = new_record(S, owner, s->data, 0, m->dt, idx[i])) < 0) return -1;
            m->rec = rec;
            m->offset = 0;
        }
        return 0;
    }
    int main_dt = -1;
    size_t main_start = 0, main_end = 0;
    for (size_t i = 0; i < n && main_dt < 0; i++)
        if (items[idx[i]].hi > items[idx[i]].lo) main_dt = items[idx[i]].dt;
    if (main_dt < 0) main_dt = items[idx[0]].dt;
    while (main_start < n && items[idx[main_start]].dt != main_dt) main_start++;
    main_end = main_start;
    while (main_end < n && items[idx[main_end]].dt == main_dt) main_end++;
    /* the main dtype's bytes as disjoint intervals (its items are sorted by lo) */
    char **iv = NULL;
    size_t n_iv = 0;
    int r = 0;
    if (main_end - main_start < n) {
        iv = PyMem_Malloc(2 * (main_end - main_start) * sizeof *iv);
        if (iv == NULL) return PyErr_NoMemory(), -1;
        for (size_t i = main_start; i < main_end; i++) {
            SaveItem *m = &items[idx[i]];
            if (m->hi == m->lo) continue;
            if (n_iv > 0 && m->lo < iv[2 * n_iv - 1]) {
                if (m->hi > iv[2 * n_iv - 1]) iv[2 * n_iv - 1] = m->hi;
            } else {
                iv[2 * n_iv] = m->lo;
                iv[2 * n_iv + 1] = m->hi;
                n_iv++;
            }
        }
    }
    size_t start = 0;
    while (r == 0 && start < n) {
        size_t end = start;
        int d = items[idx[start]].dt;
        while (end < n && items[idx[end]].dt == d) end++;
        if (d == main_dt) {
            r = make_run(S, owner, idx + start, end - start, 1);
            start = end;
            continue;
        }
        size_t kept = start;
        for (size_t i = start; r == 0 && i < end; i++) {
            SaveItem *o = &items[idx[i]];
            if (o->hi == o->lo && o->arr != NULL) {
                r = lone_record(S, o);
                continue;
            }
            /* first main interval ending after o->lo */
            size_t a = 0, b = n_iv;
            while (a < b) {
                size_t mid = (a + b) / 2;
                if (iv[2 * mid + 1] <= o->lo) a = mid + 1;
                else b = mid;
            }
            if (a < n_iv && iv[2 * a] < o->hi) {
                for (size_t j = main_start; j < main_end; j++) {
                    SaveItem *m = &items[idx[j]];
                    if (m->hi > m->lo && m->lo < o->hi && o->lo < m->hi) {
                        r = raise_conflict(S, root, m, o);
                        break;
                    }
                }
                if (r == 0) r = raise_conflict(S, root, &items[idx[main_start]], o);
                continue;
            }
            idx[kept++] = idx[i];
        }
        if (r == 0 && kept > start) r = make_run(S, owner, idx + start, kept - start, 0);
        start = end;
    }
    PyMem_Free(iv);
    return r;
}

static int cmp_start(const void *pa, const void *pb, void *recs) {
    const SaveRecord *a = &((SaveRecord *)recs)[*(const size_t *)pa], *b = &((SaveRecord *)recs)[*(const size_t *)pb];
    if (a->start != b->start) return (uintptr_t)a->start < (uintptr_t)b->start ? -1 : 1;
    return *(const size_t *)pa < *(const size_t *)pb ? -1 : 1;
}

/* Records of different owners over the same memory (two .numpy() views of
 * one torch tensor, two memoryviews of one buffer): overlapping bytes of
 * one dtype on one item grid become one record (its owner a tuple keeping
 * them all alive); of two dtypes, the error torch raises. */
static int merge_overlaps(Saver *S, PyObject *root) {
    size_t n = 0, n_old = S->n_recs;
    size_t *idx = PyMem_Malloc((n_old ? n_old : 1) * sizeof *idx);
    int64_t *remap = PyMem_Malloc((n_old ? n_old : 1) * sizeof *remap);
    if (idx == NULL || remap == NULL) {
        PyMem_Free(idx);
        PyMem_Free(remap);
        return PyErr_NoMemory(), -1;
    }
    for (size_t i = 0; i < n_old; i++) {
        remap[i] = -1;
        if (S->recs[i].nbytes > 0) idx[n++] = i;
    }
    tf_qsort_r(idx, n, sizeof *idx, cmp_start, S->recs);
    int r = 0, merged = 0;
    size_t c = 0;
    while (r == 0 && c < n) {
        /* a cluster: the records that start before the end of what it covers */
        SaveRecord *first = &S->recs[idx[c]];
        char *start = first->start;
        int dt = first->dt;
        uint64_t item = dtypes_table[dt].itemsize;
        char *end = start + first->nbytes;
        size_t k = c + 1, members = 1;
        while (k < n && S->recs[idx[k]].start < end) {
            SaveRecord *o = &S->recs[idx[k]];
            if (o->dt != dt) {
                r = raise_conflict(S, root, &S->items[first->first_item], &S->items[o->first_item]);
                break;
            }
            if ((uint64_t)(o->start - start) % item == 0) {
                if (o->start + o->nbytes > end) end = o->start + o->nbytes;
                idx[c + members++] = idx[k]; /* members: idx[c .. c + members) */
            }
            k++;
        }
        if (r == 0 && members > 1) {
            PyObject *owners = PyTuple_New((Py_ssize_t)members);
            if (owners == NULL) {
                r = -1;
                break;
            }
            for (size_t m = 0; m < members; m++)
                PyTuple_SET_ITEM(owners, (Py_ssize_t)m, Py_NewRef(S->recs[idx[c + m]].owner));
            int nr = new_record(S, owners, start, (uint64_t)(end - start), dt, S->recs[idx[c]].first_item);
            Py_DECREF(owners);
            if (nr < 0) {
                r = -1;
                break;
            }
            for (size_t m = 0; m < members; m++) {
                S->recs[idx[c + m]].dead = 1;
                remap[idx[c + m]] = nr;
            }
            merged = 1;
        }
        c = k;
    }
    if (r == 0 && merged) {
        for (size_t i = 0; i < S->n_items; i++) {
            SaveItem *it = &S->items[i];
            if (it->rec < 0 || (size_t)it->rec >= n_old || remap[it->rec] < 0) continue;
            int nr = (int)remap[it->rec];
            it->offset += (int64_t)((uint64_t)(S->recs[it->rec].start - S->recs[nr].start) / dtypes_table[it->dt].itemsize);
            it->rec = nr;
        }
    }
    PyMem_Free(idx);
    PyMem_Free(remap);
    return r;
}

static int make_records(Saver *S, PyObject *root) {
    if (S->n_items == 0) return 0;
    size_t *idx = PyMem_Malloc(S->n_items * sizeof *idx);
    if (idx == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < S->n_items; i++) idx[i] = i;
    tf_qsort_r(idx, S->n_items, sizeof *idx, cmp_owner, S->items);
    int r = 0;
    size_t start = 0;
    while (r == 0 && start < S->n_items) {
        size_t end = start + 1;
        while (end < S->n_items && S->items[idx[end]].owner == S->items[idx[start]].owner) end++;
        r = group_owner(S, root, idx + start, end - start);
        start = end;
    }
    PyMem_Free(idx);
    return r == 0 ? merge_overlaps(S, root) : r;
}

/* ---- find_path: the key path of one object (for messages) ------------------------------ */

static int find_path(Saver *S, PyObject *obj, PyObject *target, int *found) {
    if (obj == target) {
        *found = 1;
        return 0;
    }
    PyTypeObject *tp = Py_TYPE(obj);
    ModuleState *st = S->st;
    int is_map = tp == &PyDict_Type || tp == (PyTypeObject *)st->OrderedDict || tp == (PyTypeObject *)st->Counter;
    int is_seq = tp == &PyList_Type || tp == &PyTuple_Type;
    if (!is_map && !is_seq) return 0;
    if (Py_EnterRecursiveCall(" while saving a checkpoint")) return -1;
    PyObject *items = is_map ? PyMapping_Items(obj) : PySequence_List(obj);
    int r = items ? 0 : -1;
    for (Py_ssize_t i = 0; r == 0 && !*found && items && i < PyList_GET_SIZE(items); i++) {
        PyObject *x = PyList_GET_ITEM(items, i);
        PyObject *v = is_map ? PyTuple_GET_ITEM(x, 1) : x;
        r = push(S, is_map ? PyTuple_GET_ITEM(x, 0) : NULL, i);
        if (r == 0) r = find_path(S, v, target, found);
        if (!*found) S->depth--;
    }
    /* path segments borrow keys: keep the items list alive with the found path */
    if (*found && items != NULL && PyList_Append(S->keep, items) < 0) r = -1;
    Py_XDECREF(items);
    Py_LeaveRecursiveCall();
    return r;
}

/* ---- pickle ------------------------------------------------------------------------ */

static int save_obj(Saver *S, PyObject *obj);

static void emit_global(Saver *S, const void *key, const char *module, const char *name) {
    if (pk_memo_get(&S->pk, key)) return;
    pk_global(&S->pk, module, name);
    pk_memoize(&S->pk, key);
}

/* Keep an object we made alive for as long as the memo may name it. */
static int keep(Saver *S, PyObject *o) { return PyList_Append(S->keep, o); }

static int save_str(Saver *S, PyObject *obj) {
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(obj, &n);
    if (u != NULL) {
        pk_unicode(&S->pk, u, (size_t)n);
    } else {
        /* lone surrogates: as pickle, 'surrogatepass' */
        PyErr_Clear();
        PyObject *b = PyUnicode_AsEncodedString(obj, "utf-8", "surrogatepass");
        if (b == NULL) return -1;
        pk_unicode(&S->pk, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
        Py_DECREF(b);
    }
    pk_memoize(&S->pk, obj);
    return 0;
}

/* A str we made (key strings, latin-1 text): memo check, then as save_str. */
static int save_made_str(Saver *S, PyObject *s) {
    if (pk_memo_get(&S->pk, s)) return 0;
    return save_str(S, s);
}

static int save_long(Saver *S, PyObject *obj) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (!overflow) {
        if (v == -1 && PyErr_Occurred()) return -1;
        pk_int(&S->pk, v);
        return 0;
    }
    PyObject *raw = long_bytes(obj);
    if (raw == NULL) return -1;
    pk_long1(&S->pk, (const uint8_t *)PyBytes_AS_STRING(raw), (size_t)PyBytes_GET_SIZE(raw));
    Py_DECREF(raw);
    return 0;
}

/* _codecs.encode(latin-1 text, 'latin1'), as protocol 2 pickles bytes (also
 * for b'', which pickle writes as bytes(): torch's weights-only unpickler
 * does not allow builtins.bytes). */
static int save_bytes(Saver *S, PyObject *obj) {
    emit_global(S, &K_CODECS_ENCODE, "_codecs", "encode");
    PyObject *text = PyUnicode_DecodeLatin1(PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj), "strict");
    if (text == NULL) return -1;
    int r = keep(S, text);
    Py_DECREF(text);
    if (r < 0 || save_made_str(S, text) < 0 || save_made_str(S, S->str_latin1) < 0) return -1;
    pk_op(&S->pk, OP_TUPLE2);
    pk_memoize(&S->pk, NULL);
    pk_op(&S->pk, OP_REDUCE);
    pk_memoize(&S->pk, obj);
    return 0;
}

static int save_bytearray(Saver *S, PyObject *obj) {
    emit_global(S, &K_BYTEARRAY, "__builtin__", "bytearray");
    if (PyByteArray_GET_SIZE(obj) == 0) {
        pk_op(&S->pk, OP_EMPTY_TUPLE);
    } else {
        PyObject *b = PyBytes_FromObject(obj);
        if (b == NULL) return -1;
        int r = keep(S, b);
        Py_DECREF(b);
        if (r < 0 || save_obj(S, b) < 0) return -1;
        pk_op(&S->pk, OP_TUPLE1);
        pk_memoize(&S->pk, NULL);
    }
    pk_op(&S->pk, OP_REDUCE);
    pk_memoize(&S->pk, obj);
    return 0;
}

/* _pickle.c batch_list_exact */
static int save_list_items(Saver *S, PyObject *list) {
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (n == 0) return 0;
    if (n == 1) {
        if (save_obj(S, PyList_GET_ITEM(list, 0)) < 0) return -1;
        pk_op(&S->pk, OP_APPEND);
        return 0;
    }
    Py_ssize_t total = 0;
    do {
        pk_op(&S->pk, OP_MARK);
        for (int batch = 0; total < n && batch < SAVE_BATCH; batch++, total++)
            if (save_obj(S, PyList_GET_ITEM(list, total)) < 0) return -1;
        pk_op(&S->pk, OP_APPENDS);
    } while (total < n);
    return 0;
}

/* _pickle.c batch_dict_exact (note its empty trailing batch when the size
 * is a multiple of 1000) */
static int save_dict_items(Saver *S, PyObject *dict) {
    Py_ssize_t n = PyDict_GET_SIZE(dict), pos = 0;
    PyObject *k, *v;
    if (n == 0) return 0;
    if (n == 1) {
        PyDict_Next(dict, &pos, &k, &v);
        if (save_obj(S, k) < 0 || save_obj(S, v) < 0) return -1;
        pk_op(&S->pk, OP_SETITEM);
        return 0;
    }
    int i;
    do {
        i = 0;
        pk_op(&S->pk, OP_MARK);
        while (PyDict_Next(dict, &pos, &k, &v)) {
            if (save_obj(S, k) < 0 || save_obj(S, v) < 0) return -1;
            if (++i == SAVE_BATCH) break;
        }
        pk_op(&S->pk, OP_SETITEMS);
    } while (i == SAVE_BATCH);
    return 0;
}

/* _pickle.c batch_dict over an items iterator (OrderedDict) */
static int save_dict_iter(Saver *S, PyObject *mapping) {
    PyObject *items = PyMapping_Items(mapping);
    if (items == NULL) return -1;
    Py_ssize_t n = PyList_GET_SIZE(items), at = 0;
    int r = 0;
    while (r == 0 && at < n) {
        if (n - at == 1) {
            PyObject *kv = PyList_GET_ITEM(items, at);
            r = save_obj(S, PyTuple_GET_ITEM(kv, 0));
            if (r == 0) r = save_obj(S, PyTuple_GET_ITEM(kv, 1));
            pk_op(&S->pk, OP_SETITEM);
            break;
        }
        pk_op(&S->pk, OP_MARK);
        for (int batch = 0; r == 0 && at < n && batch < SAVE_BATCH; batch++, at++) {
            PyObject *kv = PyList_GET_ITEM(items, at);
            r = save_obj(S, PyTuple_GET_ITEM(kv, 0));
            if (r == 0) r = save_obj(S, PyTuple_GET_ITEM(kv, 1));
        }
        pk_op(&S->pk, OP_SETITEMS);
    }
    Py_DECREF(items);
    return r;
}

static int save_tuple(Saver *S, PyObject *obj) {
    Py_ssize_t n = PyTuple_GET_SIZE(obj);
    if (n == 0) {
        pk_op(&S->pk, OP_EMPTY_TUPLE);
        return 0;
    }
    if (n > 3) pk_op(&S->pk, OP_MARK);
    for (Py_ssize_t i = 0; i < n; i++)
        if (save_obj(S, PyTuple_GET_ITEM(obj, i)) < 0) return -1;
    pk_tuple(&S->pk, (size_t)n);
    pk_memoize(&S->pk, obj);
    return 0;
}

/* (offset, size, stride) of an item in elements; strides of dims of length
 * <= 1 that torch cannot hold are replaced by contiguous ones. */
static void emit_dims(Saver *S, PyArrayObject *a, int strides) {
    int nd = PyArray_NDIM(a);
    npy_intp item = PyArray_ITEMSIZE(a);
    if (nd == 0) {
        pk_op(&S->pk, OP_EMPTY_TUPLE);
        return;
    }
    if (nd > 3) pk_op(&S->pk, OP_MARK);
    npy_intp contiguous = 1;
    int64_t vals[NPY_MAXDIMS];
    for (int i = nd - 1; i >= 0; i--) {
        npy_intp dim = PyArray_DIM(a, i), st = PyArray_STRIDE(a, i);
        if (!strides) vals[i] = dim;
        else if (st >= 0 && st % item == 0) vals[i] = st / item;
        else vals[i] = contiguous;
        contiguous *= dim > 1 ? dim : 1;
    }
    for (int i = 0; i < nd; i++) pk_int(&S->pk, vals[i]);
    pk_tuple(&S->pk, (size_t)nd);
    pk_memoize(&S->pk, NULL);
}

static int emit_storage_type(Saver *S, int dt) {
    const DtypeInfo *info = &dtypes_table[dt];
    if (info->storage != NULL) emit_global(S, &info->storage, "torch", info->storage);
    else emit_global(S, &K_UNTYPED, "torch.storage", "UntypedStorage");
    return 0;
}

/* ('storage', <type>, key, 'cpu', numel[, None]) BINPERSID */
/* dt: the dtype of this use (the record's, except for an empty storage used as several) */
static int emit_pid(Saver *S, SaveRecord *r, int dt) {
    Pickler *P = &S->pk;
    const DtypeInfo *info = &dtypes_table[dt];
    if (r->order < 0) {
        if (grow((void **)&S->order, &S->cap_order, S->n_order + 1, sizeof(size_t)) < 0) return -1;
        r->order = (int64_t)S->n_order;
        S->order[S->n_order++] = (size_t)(r - S->recs);
        if (!S->legacy) {
            PyObject *n = PyLong_FromSsize_t((Py_ssize_t)r->order);
            r->key = n ? PyObject_Str(n) : NULL; /* str(len(id_map)), as torch */
            Py_XDECREF(n);
            if (r->key == NULL) return -1;
        }
    }
    pk_op(P, OP_MARK);
    if (save_made_str(S, S->str_storage) < 0) return -1;
    emit_storage_type(S, dt);
    if (S->legacy) {
        /* str(storage._cdata): a fresh string each time */
        char buf[32];
        int n = snprintf(buf, sizeof buf, "%llu", (unsigned long long)r->legacy_key);
        pk_unicode(P, buf, (size_t)n);
        pk_memoize(P, NULL);
    } else if (save_made_str(S, r->key) < 0) {
        return -1;
    }
    if (save_made_str(S, S->str_cpu) < 0) return -1;
    pk_int(P, (int64_t)(info->storage != NULL ? r->nbytes / info->itemsize : r->nbytes));
    if (S->legacy) pk_op(P, OP_NONE);
    pk_op(P, OP_TUPLE);
    pk_memoize(P, NULL);
    pk_op(P, OP_BINPERSID);
    return 0;
}

static int save_item(Saver *S, PyObject *obj, SaveItem *it) {
    Pickler *P = &S->pk;
    SaveRecord *r = &S->recs[it->rec];
    if (it->arr == NULL) return emit_pid(S, r, it->dt); /* a bare storage: persistent, not memoized */
    int v3 = dtypes_table[it->dt].storage == NULL;
    if (v3) emit_global(S, &K_REBUILD_V3, "torch._utils", "_rebuild_tensor_v3");
    else emit_global(S, &K_REBUILD_V2, "torch._utils", "_rebuild_tensor_v2");
    pk_op(P, OP_MARK);
    if (emit_pid(S, r, it->dt) < 0) return -1;
    pk_int(P, it->offset);
    emit_dims(S, (PyArrayObject *)it->arr, 0);
    emit_dims(S, (PyArrayObject *)it->arr, 1);
    pk_op(P, OP_NEWFALSE);
    emit_global(S, &K_ORDERED_DICT, "collections", "OrderedDict");
    pk_op(P, OP_EMPTY_TUPLE);
    pk_op(P, OP_REDUCE);
    pk_memoize(P, NULL);
    if (v3) emit_global(S, &dtypes_table[it->dt].name, "torch", dtypes_table[it->dt].name);
    pk_op(P, OP_TUPLE);
    pk_memoize(P, NULL);
    pk_op(P, OP_REDUCE);
    pk_memoize(P, obj);
    return 0;
}

static int save_meta(Saver *S, PyObject *obj) {
    Pickler *P = &S->pk;
    PyObject *shape = PyObject_GetAttr(obj, S->st->str_shape);
    PyObject *dtype = shape ? PyObject_GetAttr(obj, S->st->str_dtype) : NULL;
    if (dtype == NULL) {
        Py_XDECREF(shape);
        return -1;
    }
    int dt = dtype_of_value(S->st, dtype);
    Py_DECREF(dtype);
    Py_ssize_t nd = PyTuple_GET_SIZE(shape);
    emit_global(S, &K_REBUILD_META, "torch._utils", "_rebuild_meta_tensor_no_storage");
    pk_op(P, OP_MARK);
    emit_global(S, &dtypes_table[dt].name, "torch", dtypes_table[dt].name);
    for (int pass = 0; pass < 2; pass++) {
        if (nd == 0) {
            pk_op(P, OP_EMPTY_TUPLE);
            continue;
        }
        if (nd > 3) pk_op(P, OP_MARK);
        int64_t contiguous = 1;
        int64_t vals[NPY_MAXDIMS];
        for (Py_ssize_t i = nd - 1; i >= 0 && i < NPY_MAXDIMS; i--) {
            int64_t dim = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
            vals[i] = pass == 0 ? dim : contiguous;
            contiguous *= dim > 1 ? dim : 1;
        }
        for (Py_ssize_t i = 0; i < nd && i < NPY_MAXDIMS; i++) pk_int(P, vals[i]);
        pk_tuple(P, (size_t)nd);
        pk_memoize(P, NULL);
    }
    Py_DECREF(shape);
    pk_op(P, OP_NEWFALSE);
    pk_op(P, OP_TUPLE);
    pk_memoize(P, NULL);
    pk_op(P, OP_REDUCE);
    pk_memoize(P, obj);
    return 0;
}

/* torch's pickle of a quantized tensor: _rebuild_qtensor(storage, offset, size,
 * stride, qparams, False, OrderedDict()). */
static int save_quantized(Saver *S, PyObject *obj, PyObject *parts) {
    Pickler *P = &S->pk;
    uint64_t i;
    PyObject *int_repr = PyTuple_GET_ITEM(parts, 1), *shape = PyTuple_GET_ITEM(parts, 3);
    if (!ptrmap_get(&S->seen, int_repr, &i)) return PyErr_Format(PyExc_RuntimeError, "array was not collected"), -1;
    SaveItem *it = &S->items[i - 3];
    emit_global(S, &K_REBUILD_QTENSOR, "torch._utils", "_rebuild_qtensor");
    pk_op(P, OP_MARK);
    if (emit_pid(S, &S->recs[it->rec], S->recs[it->rec].dt) < 0) return -1;
    pk_int(P, it->offset);
    if (it->dt == DT_QUINT4X2 || it->dt == DT_QUINT2X4) {
        /* int_repr holds the packed bytes: the tensor is contiguous in its own shape */
        Py_ssize_t nd = PyTuple_GET_SIZE(shape);
        int64_t vals[NPY_MAXDIMS], contiguous = 1;
        if (nd > NPY_MAXDIMS) return PyErr_Format(PyExc_ValueError, "too many dimensions"), -1;
        for (Py_ssize_t d = nd - 1; d >= 0; d--) {
            int64_t dim = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d));
            if (dim < 0) return PyErr_Occurred() ? -1 : (PyErr_Format(PyExc_ValueError, "negative size"), -1);
            vals[d] = contiguous;
            contiguous *= dim > 1 ? dim : 1;
        }
        if (save_obj(S, shape) < 0) return -1;
        if (nd == 0) {
            pk_op(P, OP_EMPTY_TUPLE);
        } else {
            if (nd > 3) pk_op(P, OP_MARK);
            for (Py_ssize_t d = 0; d < nd; d++) pk_int(P, vals[d]);
            pk_tuple(P, (size_t)nd);
            pk_memoize(P, NULL);
        }
    } else {
        emit_dims(S, (PyArrayObject *)it->arr, 0);
        emit_dims(S, (PyArrayObject *)it->arr, 1);
    }
    if (save_obj(S, PyTuple_GET_ITEM(parts, 4)) < 0) return -1;
    pk_op(P, OP_NEWFALSE);
    emit_global(S, &K_ORDERED_DICT, "collections", "OrderedDict");
    pk_op(P, OP_EMPTY_TUPLE);
    pk_op(P, OP_REDUCE);
    pk_memoize(P, NULL);
    pk_op(P, OP_TUPLE);
    pk_memoize(P, NULL);
    pk_op(P, OP_REDUCE);
    pk_memoize(P, obj);
    return 0;
}

/* SaveGlobal(module, name) / SaveCall(func, args): a GLOBAL, or func(*args) by REDUCE. */
static int save_made_call(Saver *S, PyObject *obj, int is_call, PyObject *memo_key) {
    Pickler *P = &S->pk;
    if (!is_call) {
        PyObject *m = PyObject_GetAttrString(obj, "module"), *n = m ? PyObject_GetAttrString(obj, "name") : NULL;
        const char *ms = n ? PyUnicode_AsUTF8(m) : NULL, *ns = ms ? PyUnicode_AsUTF8(n) : NULL;
        if (ns != NULL) emit_global(S, obj, ms, ns); /* helpers keep one object per global alive */
        Py_XDECREF(m);
        Py_XDECREF(n);
        return ns ? 0 : -1;
    }
    PyObject *f = PyObject_GetAttrString(obj, "func"), *a = f ? PyObject_GetAttrString(obj, "args") : NULL;
    int r = a && PyTuple_Check(a) ? 0 : -1;
    if (r < 0 && a != NULL) PyErr_SetString(PyExc_TypeError, "SaveCall args must be a tuple");
    if (r == 0) r = save_obj(S, f);
    if (r == 0) r = save_obj(S, a);
    if (r == 0) {
        pk_op(P, OP_REDUCE);
        pk_memoize(P, memo_key);
    }
    Py_XDECREF(f);
    Py_XDECREF(a);
    return r;
}

/* CPython's save(): atoms, the memo, then each type's own form. */
static int save_obj(Saver *S, PyObject *obj) {
    Pickler *P = &S->pk;
    ModuleState *st = S->st;
    PyTypeObject *tp = Py_TYPE(obj);
    if (obj == Py_None) {
        pk_op(P, OP_NONE);
        return 0;
    }
    if (tp == &PyBool_Type) {
        pk_op(P, obj == Py_True ? OP_NEWTRUE : OP_NEWFALSE);
        return 0;
    }
    if (tp == &PyLong_Type) return save_long(S, obj);
    if (tp == &PyFloat_Type) {
        pk_float(P, PyFloat_AS_DOUBLE(obj));
        return 0;
    }
    if (tp == st->StorageType) {
        uint64_t i;
        if (!ptrmap_get(&S->seen, obj, &i)) return PyErr_Format(PyExc_RuntimeError, "storage was not collected"), -1;
        return save_item(S, obj, &S->items[i - 3]);
    }
    if (pk_memo_get(P, obj)) return 0;
    if (tp == &PyUnicode_Type) return save_str(S, obj);
    if (tp == &PyBytes_Type) return save_bytes(S, obj);
    if (PyArray_Check(obj)) {
        uint64_t i;
        if (!ptrmap_get(&S->seen, obj, &i)) return PyErr_Format(PyExc_RuntimeError, "array was not collected"), -1;
        return save_item(S, obj, &S->items[i - 3]);
    }
    if (Py_EnterRecursiveCall(" while saving a checkpoint")) return -1;
    int r = 0;
    if (tp == &PyDict_Type) {
        pk_op(P, OP_EMPTY_DICT);
        pk_memoize(P, obj);
        r = save_dict_items(S, obj);
    } else if (tp == &PyList_Type) {
        pk_op(P, OP_EMPTY_LIST);
        pk_memoize(P, obj);
        r = save_list_items(S, obj);
    } else if (tp == &PyTuple_Type) {
        r = save_tuple(S, obj);
    } else if (tp == (PyTypeObject *)st->OrderedDict) {
        emit_global(S, &K_ORDERED_DICT, "collections", "OrderedDict");
        pk_op(P, OP_EMPTY_TUPLE);
        pk_op(P, OP_REDUCE);
        pk_memoize(P, obj);
        r = save_dict_iter(S, obj);
        PyObject *state = r == 0 ? instance_state(obj) : NULL;
        if (state == NULL) {
            r = -1;
        } else if (state != Py_None) {
            r = save_obj(S, state);
            pk_op(P, OP_BUILD);
        }
        Py_XDECREF(state);
    } else if (tp == (PyTypeObject *)st->Counter) {
        /* Counter.__reduce__: (Counter, (dict(self),)) */
        PyObject *d = PyObject_CallOneArg((PyObject *)&PyDict_Type, obj);
        r = d ? keep(S, d) : -1;
        Py_XDECREF(d);
        if (r == 0) {
            emit_global(S, &K_COUNTER, "collections", "Counter");
            pk_op(P, OP_EMPTY_DICT);
            pk_memoize(P, d);
            r = save_dict_items(S, d);
            pk_op(P, OP_TUPLE1);
            pk_memoize(P, NULL);
            pk_op(P, OP_REDUCE);
            pk_memoize(P, obj);
        }
    } else if (tp == &PySet_Type) {
        /* (set, (list(self),)) */
        PyObject *l = PySequence_List(obj);
        r = l ? keep(S, l) : -1;
        Py_XDECREF(l);
        if (r == 0) {
            emit_global(S, &K_SET, "__builtin__", "set");
            pk_op(P, OP_EMPTY_LIST);
            pk_memoize(P, l);
            r = save_list_items(S, l);
            pk_op(P, OP_TUPLE1);
            pk_memoize(P, NULL);
            pk_op(P, OP_REDUCE);
            pk_memoize(P, obj);
        }
    } else if (tp == &PyByteArray_Type) {
        r = save_bytearray(S, obj);
    } else if (tp == &PyComplex_Type) {
        emit_global(S, &K_COMPLEX, "__builtin__", "complex");
        pk_float(P, PyComplex_RealAsDouble(obj));
        pk_float(P, PyComplex_ImagAsDouble(obj));
        pk_op(P, OP_TUPLE2);
        pk_memoize(P, NULL);
        pk_op(P, OP_REDUCE);
        pk_memoize(P, obj);
    } else if (PyArray_DescrCheck(obj)) {
        int dt = dtype_of_value(st, obj);
        emit_global(S, &dtypes_table[dt].name, "torch", dtypes_table[dt].name);
    } else if (st->MetaArrayType != NULL && tp == (PyTypeObject *)st->MetaArrayType) {
        r = save_meta(S, obj);
    } else if (S->parts != NULL && PyDict_GetItemWithError(S->parts, obj) != NULL) {
        PyObject *parts = PyDict_GetItemWithError(S->parts, obj);
        /* a sparse tensor is its call (memoized as the SparseArray itself) */
        r = PyTuple_GET_SIZE(parts) == 5 ? save_quantized(S, obj, parts)
                                         : save_made_call(S, PyTuple_GET_ITEM(parts, 1), 1, obj);
    } else if (is_helper_type(S, obj, "SaveGlobal") == 1) {
        r = save_made_call(S, obj, 0, obj);
    } else if (is_helper_type(S, obj, "SaveCall") == 1) {
        r = save_made_call(S, obj, 1, obj);
    } else {
        if (PyErr_Occurred()) {
            Py_LeaveRecursiveCall();
            return -1;
        }
        r = -1;
        PyErr_Format(PyExc_TypeError, "cannot save an object of type %s", tp->tp_name);
    }
    Py_LeaveRecursiveCall();
    return r;
}

static int pickle_main(Saver *S, PyObject *obj) {
    pk_proto(&S->pk, 2);
    if (save_obj(S, obj) < 0) return -1;
    pk_op(&S->pk, OP_STOP);
    TfStatus s = pickler_status(&S->pk);
    if (s == TF_ERR_NOMEM) {
        PyErr_NoMemory();
        return -1;
    }
    if (s != TF_OK) {
        PyErr_SetString(PyExc_OverflowError, "the pickle exceeds a protocol-2 limit (a string of 4 GiB or more)");
        return -1;
    }
    return 0;
}

/* ---- output sinks ---------------------------------------------------------------- */

typedef struct {
    int fd;                 /* >= 0: write(2), called without the GIL */
    PyObject *write;        /* else: the file object's bound write(), with the GIL */
    int err;                /* errno of a failed write(2) */
    /* the caller will fsync: start writeback of what is written as we go, so
     * the disk works while we write (the fsync then has little left to do) */
    int kick;
    int64_t pos, kicked;    /* file offsets: written so far, writeback started up to */
    int reserved;           /* sink_reserve asked for blocks past the end (sink_trim frees the rest) */
    /* the record being written: pieces inside it are passed without a copy */
    const char *span_lo, *span_hi;
    PyObject *span_owner;
} Sink;

static int sink_write(void *ctx, const void *buf, size_t n) {
    Sink *k = ctx;
    const char *p = buf;
    if (k->fd >= 0) {
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

/* Ask ext4 for the blocks of the `upper` bytes (at least) about to be written at the end of a
 * regular file, keeping its size. On this project's machine (Linux 6.18, ext4) the same 512 KB
 * write() calls then took 264 instead of 404 ms for 2 GB and 13.3 instead of 20.7 ms for 100 MB
 * (the page cache is filled over allocated blocks instead of delayed allocation), and the fsync
 * after them was no slower. On tmpfs it cost 10%, so only ext4 gets it (so nothing is reserved
 * off Linux: platform.h). Failures (no space, no support) are ignored: the writes then run, and
 * fail, as without it. */
static void sink_reserve(Sink *k, uint64_t upper) {
    struct stat st;
    if (k->fd < 0 || upper < SAVE_RESERVE_MIN || upper > (uint64_t)INT64_MAX / 2) return;
    if (fstat(k->fd, &st) != 0 || !S_ISREG(st.st_mode) || !tf_fd_on_ext4(k->fd)) return;
    off_t at = lseek(k->fd, 0, SEEK_CUR);
    if (at < 0 || st.st_size > at) return; /* only a file written at its end */
    k->reserved = 1; /* a failed fallocate (ignored, see above) may still leave blocks */
    tf_reserve_keep_size(k->fd, at, (off_t)upper);
}

/* Free the reserved blocks past the end of what was written (truncating a file to its own size
 * does that on ext4; nothing else changes). */
static void sink_trim(Sink *k) {
    struct stat st;
    if (!k->reserved) return;
    k->reserved = 0;
    if (fstat(k->fd, &st) == 0 && ftruncate(k->fd, st.st_size) != 0) {
        /* the blocks stay reserved until the file is truncated or deleted: nothing is lost */
    }
}

/* ---- CRC thread ------------------------------------------------------------------ */

typedef struct {
    SaveRecord **recs;     /* in write order */
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
        SaveRecord *r = j->recs[i];
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
static int crc_thread_pays(void) {
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

typedef struct {
    Saver *S;
    Sink *sink;
    const char *prefix;
    size_t prefix_len;
    TfErr err;
    int use_thread;
} WriteJob;

static void set_span(Sink *k, SaveRecord *r) {
    k->span_lo = r ? r->start : NULL;
    k->span_hi = r ? r->start + r->nbytes : NULL;
    k->span_owner = r ? r->owner : NULL;
}

/* Everything after data.pkl is known: no Python objects are touched here
 * (the sink calls back into Python only for file objects, with the GIL). */
static TfStatus write_zip(WriteJob *w) {
    Saver *S = w->S;
    ZipWriter z;
    TfErr *err = &w->err;
    CrcJob job;
    pthread_t tid;
    int started = 0;
    TfStatus rc = zipwrite_open(&z, sink_write, w->sink, w->prefix, w->prefix_len, err);
    SaveRecord **recs = NULL;
    if (rc != TF_OK) goto done;
    recs = malloc((S->n_order ? S->n_order : 1) * sizeof *recs);
    if (recs == NULL) {
        rc = tf_fail(err, TF_ERR_NOMEM, 0, "out of memory");
        goto done;
    }
    uint64_t total = 0;
    for (size_t i = 0; i < S->n_order; i++) {
        recs[i] = &S->recs[S->order[i]];
        total += recs[i]->nbytes;
    }
    /* an upper bound of the file: the records, data.pkl, the small records, and per record at most
     * two names, a local header with zip64 and alignment extras, a descriptor and a central entry */
    sink_reserve(w->sink, total + S->pk.len + (S->n_order + 8) * (320 + 2 * (uint64_t)w->prefix_len) + 4096);
    if (w->use_thread && total >= SAVE_CRC_THREAD_MIN) {
        memset(&job, 0, sizeof job);
        job.recs = recs;
        job.n = S->n_order;
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
    if ((rc = zipwrite_record(&z, "data.pkl", S->pk.data, S->pk.len, err)) != TF_OK ||
        (rc = zipwrite_record(&z, ".format_version", "1", 1, err)) != TF_OK ||
        (rc = zipwrite_record(&z, ".storage_alignment", "64", 2, err)) != TF_OK ||
        (rc = zipwrite_record(&z, "byteorder", "little", 6, err)) != TF_OK)
        goto done;
    for (size_t i = 0; i < S->n_order; i++) {
        SaveRecord *r = recs[i];
        char name[32];
        snprintf(name, sizeof name, "data/%zu", i);
        if ((rc = zipwrite_begin(&z, name, r->nbytes, !started, err)) != TF_OK) goto done;
        set_span(w->sink, r);
        for (uint64_t off = 0, n; off < r->nbytes; off += n) {
            n = next_piece(z.pos, r->nbytes - off);
            if ((rc = zipwrite_data(&z, r->start + off, (size_t)n, err)) != TF_OK) {
                set_span(w->sink, NULL);
                goto done;
            }
            if (started) crc_advance(&job, n);
        }
        set_span(w->sink, NULL);
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
    free(recs);
    zipwrite_close(&z);
    return rc;
}

/* A small gathering buffer for the legacy stream. */
typedef struct {
    Sink *sink;
    uint8_t *buf;
    size_t len;
    TfErr *err;
    uint64_t pos; /* bytes passed to out_write */
} Out;

static TfStatus out_flush(Out *o) {
    if (o->len == 0) return TF_OK;
    size_t n = o->len;
    o->len = 0;
    return sink_write(o->sink, o->buf, n) < 0 ? tf_fail(o->err, TF_ERR_IO, 0, "write failed") : TF_OK;
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
    return sink_write(o->sink, p, n) < 0 ? tf_fail(o->err, TF_ERR_IO, 0, "write failed") : TF_OK;
}

/* Magic number, protocol 1001 and sys_info, as torch's _legacy_save pickles them. */
static const uint8_t LEGACY_HEAD[] =
    "\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e"
    "\x80\x02\x4d\xe9\x03\x2e"
    "\x80\x02}q\x00(X\x10\x00\x00\x00protocol_versionq\x01M\xe9\x03X\r\x00\x00\x00little_endianq\x02\x88"
    "X\n\x00\x00\x00type_sizesq\x03}q\x04(X\x05\x00\x00\x00shortq\x05K\x02X\x03\x00\x00\x00intq\x06K\x04"
    "X\x04\x00\x00\x00longq\x07K\x04uu.";

typedef struct {
    char text[24];
    size_t rec;
} LegacyKey;

static int cmp_legacy_key(const void *a, const void *b) {
    return strcmp(((const LegacyKey *)a)->text, ((const LegacyKey *)b)->text);
}

/* The legacy stream: head, data pickle, sorted key list, blobs (int64 numel
 * + bytes) in key-list order. keys_pickle is written by the caller. */
static TfStatus write_legacy(WriteJob *w, const uint8_t *keys_pk, size_t keys_len, const LegacyKey *keys) {
    Saver *S = w->S;
    Out o = {w->sink, malloc(ZW_BUFFER), 0, &w->err, 0};
    if (o.buf == NULL) return tf_fail(&w->err, TF_ERR_NOMEM, 0, "out of memory");
    TfStatus rc;
    uint64_t total = 0;
    for (size_t i = 0; i < S->n_order; i++) total += S->recs[keys[i].rec].nbytes;
    sink_reserve(w->sink, sizeof LEGACY_HEAD + S->pk.len + keys_len + 8 * (uint64_t)S->n_order + total);
    if ((rc = out_write(&o, LEGACY_HEAD, sizeof LEGACY_HEAD - 1)) != TF_OK ||
        (rc = out_write(&o, S->pk.data, S->pk.len)) != TF_OK || (rc = out_write(&o, keys_pk, keys_len)) != TF_OK)
        goto done;
    for (size_t i = 0; i < S->n_order; i++) {
        SaveRecord *r = &S->recs[keys[i].rec];
        uint8_t h[8];
        tf_put64(h, r->nbytes / dtypes_table[r->dt].itemsize);
        if ((rc = out_write(&o, h, 8)) != TF_OK) goto done;
        set_span(w->sink, r);
        for (uint64_t off = 0, n; off < r->nbytes; off += n) {
            n = next_piece(o.pos, r->nbytes - off);
            if ((rc = out_write(&o, r->start + off, (size_t)n)) != TF_OK) break;
        }
        set_span(w->sink, NULL);
        if (rc != TF_OK) goto done;
    }
    rc = out_flush(&o);
done:
    free(o.buf);
    return rc;
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

static int legacy_keys(Saver *S, LegacyKey **out) {
    /* pointer-like keys, as torch writes str(storage._cdata): the record's
     * address, made unique */
    PtrMap used;
    ptrmap_init(&used);
    LegacyKey *keys = PyMem_Malloc((S->n_recs ? S->n_recs : 1) * sizeof *keys);
    if (keys == NULL) return PyErr_NoMemory(), -1;
    for (size_t i = 0; i < S->n_recs; i++) {
        uint64_t k = (uint64_t)(uintptr_t)S->recs[i].start;
        uint64_t dummy;
        if (k == 0) k = 1;
        while (ptrmap_get(&used, (const void *)(uintptr_t)k, &dummy)) k++;
        if (ptrmap_set(&used, (const void *)(uintptr_t)k, 1) < 0) {
            ptrmap_free(&used);
            PyMem_Free(keys);
            return PyErr_NoMemory(), -1;
        }
        S->recs[i].legacy_key = k;
    }
    ptrmap_free(&used);
    *out = keys;
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
    memset(&S, 0, sizeof S);
    S.st = PyModule_GetState(module);
    S.legacy = legacy;
    pickler_init(&S.pk);
    ptrmap_init(&S.seen);
    Sink sink = {.fd = -1};
    LegacyKey *keys = NULL;
    Pickler kp;
    pickler_init(&kp);
    PyObject *result = NULL;
    S.keep = PyList_New(0);
    S.str_storage = PyUnicode_InternFromString("storage");
    S.str_cpu = PyUnicode_InternFromString("cpu");
    S.str_latin1 = PyUnicode_InternFromString("latin1");
    if (S.keep == NULL || S.str_storage == NULL || S.str_cpu == NULL || S.str_latin1 == NULL) goto done;
    if (PyLong_Check(target)) {
        long fd = PyLong_AsLong(target);
        if (fd < 0 || fd > INT_MAX) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad file descriptor");
            goto done;
        }
        sink.fd = (int)fd;
        if (sync) {
            off_t at = lseek(sink.fd, 0, SEEK_CUR);
            sink.kick = at >= 0;
            sink.pos = sink.kicked = at >= 0 ? (int64_t)at : 0;
        }
    } else {
        sink.write = PyObject_GetAttrString(target, "write");
        if (sink.write == NULL) goto done;
    }

    /* 1. collect and group */
    if (collect(&S, obj) < 0 || make_records(&S, obj) < 0) goto done;
    if (legacy) {
        for (size_t i = 0; i < S.n_items; i++)
            if (dtypes_table[S.items[i].dt].storage == NULL) {
                S.depth = 0;
                int found = 0;
                PyObject *p = NULL;
                if (find_path(&S, obj, S.items[i].obj, &found) == 0 && found) p = path_string(&S);
                PyErr_Clear();
                PyErr_Format(PyExc_ValueError,
                             "dtype %s at key path '%S' cannot be saved in the legacy format (torch cannot "
                             "read it back from there); use format='zip'",
                             dtypes_table[S.items[i].dt].name, p ? p : Py_None);
                Py_XDECREF(p);
                goto done;
            }
        if (legacy_keys(&S, &keys) < 0) goto done;
    }
    /* 2. pickle */
    if (pickle_main(&S, obj) < 0) goto done;
    if (legacy) {
        for (size_t i = 0; i < S.n_order; i++) {
            snprintf(keys[i].text, sizeof keys[i].text, "%llu", (unsigned long long)S.recs[S.order[i]].legacy_key);
            keys[i].rec = S.order[i];
        }
        qsort(keys, S.n_order, sizeof *keys, cmp_legacy_key);
        /* pickle.dump(sorted keys): a list of fresh strings */
        pk_proto(&kp, 2);
        pk_op(&kp, OP_EMPTY_LIST);
        pk_memoize(&kp, NULL);
        if (S.n_order == 1) {
            pk_unicode(&kp, keys[0].text, strlen(keys[0].text));
            pk_memoize(&kp, NULL);
            pk_op(&kp, OP_APPEND);
        } else if (S.n_order > 1) {
            for (size_t i = 0; i < S.n_order; i += SAVE_BATCH) {
                pk_op(&kp, OP_MARK);
                for (size_t j = i; j < S.n_order && j < i + SAVE_BATCH; j++) {
                    pk_unicode(&kp, keys[j].text, strlen(keys[j].text));
                    pk_memoize(&kp, NULL);
                }
                pk_op(&kp, OP_APPENDS);
            }
        }
        pk_op(&kp, OP_STOP);
        if (pickler_status(&kp) != TF_OK) {
            PyErr_NoMemory();
            goto done;
        }
    }
    /* 3. write */
    if (hold_buffers(&S) < 0) goto done;
    WriteJob w = {&S, &sink, prefix, (size_t)prefix_len, {0}, crc_thread < 0 ? crc_thread_pays() : crc_thread};
    TfStatus rc;
    if (sink.fd >= 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = legacy ? write_legacy(&w, kp.data, kp.len, keys) : write_zip(&w);
        sink_trim(&sink);
        Py_END_ALLOW_THREADS
    } else {
        rc = legacy ? write_legacy(&w, kp.data, kp.len, keys) : write_zip(&w);
    }
    if (rc != TF_OK) {
        if (PyErr_Occurred()) goto done; /* raised by the stream */
        if (rc == TF_ERR_NOMEM) {
            PyErr_NoMemory();
        } else if (rc == TF_ERR_IO && sink.err) {
            errno = sink.err;
            PyErr_SetFromErrno(PyExc_OSError);
        } else {
            PyErr_Format(PyExc_ValueError, "cannot write the checkpoint: %s", w.err.detail);
        }
        goto done;
    }
    if (sink.write != NULL) {
        PyObject *flush = PyObject_GetAttrString(target, "flush");
        if (flush == NULL) {
            PyErr_Clear();
        } else {
            PyObject *r = PyObject_CallNoArgs(flush);
            Py_DECREF(flush);
            if (r == NULL) goto done;
            Py_DECREF(r);
        }
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(sink.write);
    PyMem_Free(keys);
    pickler_free(&kp);
    saver_free(&S);
    return result;
}
