/* save_pickle.c - torchfree.save's step 2: emit data.pkl through pickler.c in exactly the order
 * CPython's _pickle.c would for the torch version of the object (memo included), storage keys
 * "0", "1", ... in first-encounter order; and the legacy stream's sorted key list. */
#include "saver.h"

#include "opcodes.h"

/* Memo identities of objects that exist only on torch's side. Their
 * addresses stand for the objects (pickler.h); dtype and storage-class
 * GLOBALs use the addresses of their dtype table fields. */
static const char K_REBUILD_V2, K_REBUILD_V3, K_REBUILD_META, K_REBUILD_QTENSOR, K_UNTYPED, K_ORDERED_DICT, K_COUNTER, K_SET,
    K_COMPLEX, K_CODECS_ENCODE, K_BYTEARRAY;

#define SAVE_BATCH 1000 /* _pickle.c BATCHSIZE */

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
    PyObject *raw = save_long_bytes(obj);
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
/* The record's location tag: "cpu" (one string, memoized, as torch's constant "cpu"), or the
 * device tag a Storage made by storage_over(..., location) carries (torchfree.torch.save of a
 * CUDA tensor): a fresh string each time, as torch's location_tag makes one per call. */
static int emit_location(Saver *S, SaveRecord *r) {
    PyObject *o = r->owner;
    if (Py_TYPE(o) != S->st->StorageType || !((StorageObject *)o)->write_location)
        return save_made_str(S, S->str_cpu);
    PyObject *loc = ((StorageObject *)o)->location;
    PyObject *fresh = PyUnicode_FromKindAndData(PyUnicode_KIND(loc), PyUnicode_DATA(loc), PyUnicode_GET_LENGTH(loc));
    int rc = fresh != NULL ? keep(S, fresh) : -1; /* kept: its address stays its memo key */
    if (rc == 0) rc = save_str(S, fresh);
    Py_XDECREF(fresh);
    return rc;
}

static int emit_pid(Saver *S, SaveRecord *r, int dt) {
    Pickler *P = &S->pk;
    const DtypeInfo *info = &dtypes_table[dt];
    if (r->order < 0) {
        if (save_grow((void **)&S->order, &S->cap_order, S->n_order + 1, sizeof(size_t)) < 0) return -1;
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
    if (emit_location(S, r) < 0) return -1;
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
    int dt = save_dtype_of_value(S->st, dtype);
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
/* OrderedDict: (OrderedDict, ()) with SETITEMS, then its instance state (_metadata). */
static int save_ordered_dict(Saver *S, PyObject *obj) {
    Pickler *P = &S->pk;
    emit_global(S, &K_ORDERED_DICT, "collections", "OrderedDict");
    pk_op(P, OP_EMPTY_TUPLE);
    pk_op(P, OP_REDUCE);
    pk_memoize(P, obj);
    int r = save_dict_iter(S, obj);
    PyObject *state = r == 0 ? save_instance_state(obj) : NULL;
    if (state == NULL) {
        r = -1;
    } else if (state != Py_None) {
        r = save_obj(S, state);
        pk_op(P, OP_BUILD);
    }
    Py_XDECREF(state);
    return r;
}

/* (cls, (copy,)): how Counter (copy = dict(self)) and set (copy = list(self)) reduce; copy is a
 * new dict or list, kept (its address is its memo key), pickled in full, then the call. */
static int save_reduce_of_copy(Saver *S, PyObject *obj, PyObject *copy, const void *key, const char *module,
                               const char *name) {
    Pickler *P = &S->pk;
    int r = copy ? keep(S, copy) : -1;
    Py_XDECREF(copy); /* kept */
    if (r < 0) return -1;
    emit_global(S, key, module, name);
    pk_op(P, PyDict_Check(copy) ? OP_EMPTY_DICT : OP_EMPTY_LIST);
    pk_memoize(P, copy);
    r = PyDict_Check(copy) ? save_dict_items(S, copy) : save_list_items(S, copy);
    pk_op(P, OP_TUPLE1);
    pk_memoize(P, NULL);
    pk_op(P, OP_REDUCE);
    pk_memoize(P, obj);
    return r;
}

/* complex: (complex, (real, imag)). */
static void save_complex(Saver *S, PyObject *obj) {
    Pickler *P = &S->pk;
    emit_global(S, &K_COMPLEX, "__builtin__", "complex");
    pk_float(P, PyComplex_RealAsDouble(obj));
    pk_float(P, PyComplex_ImagAsDouble(obj));
    pk_op(P, OP_TUPLE2);
    pk_memoize(P, NULL);
    pk_op(P, OP_REDUCE);
    pk_memoize(P, obj);
}

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
        r = save_ordered_dict(S, obj);
    } else if (tp == (PyTypeObject *)st->Counter) {
        r = save_reduce_of_copy(S, obj, PyObject_CallOneArg((PyObject *)&PyDict_Type, obj), &K_COUNTER,
                                "collections", "Counter");
    } else if (tp == &PySet_Type) {
        r = save_reduce_of_copy(S, obj, PySequence_List(obj), &K_SET, "__builtin__", "set");
    } else if (tp == &PyByteArray_Type) {
        r = save_bytearray(S, obj);
    } else if (tp == &PyComplex_Type) {
        save_complex(S, obj);
    } else if (PyArray_DescrCheck(obj)) {
        int dt = save_dtype_of_value(st, obj);
        emit_global(S, &dtypes_table[dt].name, "torch", dtypes_table[dt].name);
    } else if (st->MetaArrayType != NULL && tp == (PyTypeObject *)st->MetaArrayType) {
        r = save_meta(S, obj);
    } else if (S->parts != NULL && PyDict_GetItemWithError(S->parts, obj) != NULL) {
        PyObject *parts = PyDict_GetItemWithError(S->parts, obj);
        /* a sparse tensor is its call (memoized as the SparseArray itself) */
        r = PyTuple_GET_SIZE(parts) == 5 ? save_quantized(S, obj, parts)
                                         : save_made_call(S, PyTuple_GET_ITEM(parts, 1), 1, obj);
    } else if (save_is_helper_type(S, obj, "SaveGlobal") == 1) {
        r = save_made_call(S, obj, 0, obj);
    } else if (save_is_helper_type(S, obj, "SaveCall") == 1) {
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

int save_pickle_main(Saver *S, PyObject *obj) {
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

int save_pickle_legacy_keys(Saver *S, Pickler *kp, LegacyKey *keys) {
    for (size_t i = 0; i < S->n_order; i++) {
        snprintf(keys[i].text, sizeof keys[i].text, "%llu", (unsigned long long)S->recs[S->order[i]].legacy_key);
        keys[i].rec = S->order[i];
    }
    wr_sort_legacy_keys(keys, S->n_order);
    /* pickle.dump(sorted keys): a list of fresh strings */
    pk_proto(kp, 2);
    pk_op(kp, OP_EMPTY_LIST);
    pk_memoize(kp, NULL);
    if (S->n_order == 1) {
        pk_unicode(kp, keys[0].text, strlen(keys[0].text));
        pk_memoize(kp, NULL);
        pk_op(kp, OP_APPEND);
    } else if (S->n_order > 1) {
        for (size_t i = 0; i < S->n_order; i += SAVE_BATCH) {
            pk_op(kp, OP_MARK);
            for (size_t j = i; j < S->n_order && j < i + SAVE_BATCH; j++) {
                pk_unicode(kp, keys[j].text, strlen(keys[j].text));
                pk_memoize(kp, NULL);
            }
            pk_op(kp, OP_APPENDS);
        }
    }
    pk_op(kp, OP_STOP);
    if (pickler_status(kp) != TF_OK) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}
