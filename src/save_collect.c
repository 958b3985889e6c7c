/* save_collect.c - torchfree.save's step 1, collect: walk the object once, refuse what torch's
 * weights-only unpickler could not rebuild (TypeError naming the key path), and note every array
 * (and bare torchfree.Storage). Arrays are grouped by the object that owns their memory
 * (following ndarray .base, memoryview .obj and torchfree.Storage dtype variants); each group
 * becomes one storage record: a torchfree.Storage is written whole (as torch writes a whole
 * storage, so a load -> save round trip reproduces the file), any other owner as the byte span
 * covering its arrays. Records of different owners whose bytes overlap (two .numpy() views of one
 * torch tensor) merge. Layouts torch cannot express (negative strides, strides or offsets that
 * are not a multiple of the item size) and non-native byte orders are written as contiguous
 * copies of those arrays alone. The same bytes viewed as two dtypes raise, as torch.save does.
 * Also the legacy stream's checks and record keys. */
#include "saver.h"

#include "platform.h"

int save_grow(void **p, size_t *cap, size_t need, size_t elem) {
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
    if (save_grow((void **)&S->path, &S->cap_path, S->depth + 1, sizeof(PathSeg)) < 0) return -1;
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
    /* numpy's own types by kind and size (int64 is both 'l' and 'q'): the table's rows that are
     * numpy dtypes (quantized and bits rows are not) */
    for (int i = 0; i < DT_COUNT; i++) {
        const PyArray_Descr *row = st->descr[i];
        if ((dtypes_table[i].flags & DTF_VALUE_IS_NUMPY) && row != NULL && row->type_num < NPY_USERDEF &&
            row->kind == d->kind && PyDataType_ELSIZE(row) == PyDataType_ELSIZE(d))
            return i;
    }
    return -1;
}

/* The torch dtype of a MetaArray's dtype (numpy dtype or "torch.<name>"), or -1. */
int save_dtype_of_value(ModuleState *st, PyObject *v) {
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
    if (save_grow((void **)&S->items, &S->cap_items, S->n_items + 1, sizeof(SaveItem)) < 0) {
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
            if (push(S, k, 0) < 0 || save_collect(S, k) < 0 || save_collect(S, v) < 0) {
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
        if (push(S, NULL, i) < 0 || save_collect(S, PySequence_Fast_GET_ITEM(seq, i)) < 0) {
            Py_DECREF(seq);
            return -1;
        }
        S->depth--;
    }
    Py_DECREF(seq);
    return 0;
}

/* The state pickle gives an OrderedDict: its __dict__ when not empty (new ref), or NULL. */
PyObject *save_instance_state(PyObject *obj) {
    PyObject *d = PyObject_GenericGetDict(obj, NULL);
    if (d == NULL) return NULL;
    if (PyDict_Check(d) && PyDict_GET_SIZE(d) > 0) return d;
    Py_DECREF(d);
    return Py_NewRef(Py_None);
}

/* An int outside int64 as _pickle.c encodes it for LONG1: nbits/8 + 1 two's
 * complement bytes, less one redundant 0xff of a negative value (new
 * reference to a bytes object, or NULL). */
PyObject *save_long_bytes(PyObject *obj) {
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
    PyObject *raw = save_long_bytes(obj);
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
int save_is_helper_type(Saver *S, PyObject *obj, const char *name) {
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
        if (r == 0) r = save_collect(S, PyTuple_GET_ITEM(parts, 4));
    } else if (r == 0) {
        r = save_collect(S, PyTuple_GET_ITEM(parts, 1));
    }
    Py_DECREF(parts);
    return r;
}

int save_collect(Saver *S, PyObject *obj) {
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
            PyObject *state = save_instance_state(obj);
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
        if (save_dtype_of_value(st, obj) < 0)
            return raise_at(S, PyExc_TypeError, "numpy dtype %R has no torch dtype equivalent", obj);
        return 0;
    }
    if (st->MetaArrayType != NULL && tp == (PyTypeObject *)st->MetaArrayType) {
        PyObject *shape = PyObject_GetAttr(obj, st->str_shape);
        PyObject *dtype = shape ? PyObject_GetAttr(obj, st->str_dtype) : NULL;
        int ok = dtype != NULL && PyTuple_Check(shape) && PyTuple_GET_SIZE(shape) <= (Py_ssize_t)TF_LIMIT_NDIM &&
                 save_dtype_of_value(st, dtype) >= 0;
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
    int rare = save_is_helper_type(S, obj, "QuantizedArray") || save_is_helper_type(S, obj, "SparseArray");
    if (rare < 0) return -1;
    if (rare) {
        if (ptrmap_get(&S->seen, obj, &mark)) return 0;
        if (ptrmap_set(&S->seen, obj, 1) < 0) {
            PyErr_NoMemory();
            return -1;
        }
        return collect_rare(S, obj);
    }
    if (save_is_helper_type(S, obj, "SaveGlobal") == 1) return 0;
    if (save_is_helper_type(S, obj, "SaveCall") == 1) {
        PyObject *args = PyObject_GetAttrString(obj, "args");
        int r = args ? save_collect(S, args) : -1;
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
    if (save_grow((void **)&S->recs, &S->cap_recs, S->n_recs + 1, sizeof(SaveRecord)) < 0) return -1;
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

int save_make_records(Saver *S, PyObject *root) {
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

/* ---- the legacy stream ------------------------------------------------------------------ */

/* A dtype the legacy stream cannot hold: ValueError naming its key path. */
int save_check_legacy(Saver *S, PyObject *root) {
    for (size_t i = 0; i < S->n_items; i++)
        if (dtypes_table[S->items[i].dt].storage == NULL) {
            S->depth = 0;
            int found = 0;
            PyObject *p = NULL;
            if (find_path(S, root, S->items[i].obj, &found) == 0 && found) p = path_string(S);
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError,
                         "dtype %s at key path '%S' cannot be saved in the legacy format (torch cannot "
                         "read it back from there); use format='zip'",
                         dtypes_table[S->items[i].dt].name, p ? p : Py_None);
            Py_XDECREF(p);
            return -1;
        }
    return 0;
}

int save_legacy_keys(Saver *S, LegacyKey **out) {
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
