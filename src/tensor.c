/* tensor.c - our own code behind every allowlisted GLOBAL: the tensor
 * rebuilds of torch._utils (strided views over a Storage, validated before
 * numpy sees them) and the inert constructors of builtins and torch objects.
 * Rare, non-hot rebuilds (numpy objects, Opaque, MetaArray, complex32 and
 * conj/neg) go to small helpers in torchfree/_rebuild.py: our own code too. */
#include "pagedrop.h"
#include "rebuild.h"

static int is_storage(Loader *L, PyObject *o) { return Py_TYPE(o) == L->st->StorageType; }

static int wrong_args(Loader *L, GlobalRef *g, const char *expect, PyObject *args) {
    return tf_raise(L, L->st->UnpicklingError, "%U expects %s, got %zd arguments", g->canon, expect,
                    PyTuple_GET_SIZE(args));
}

/* An int >= 0 from the pickle (offsets, sizes, strides). */
static int get_index(Loader *L, PyObject *o, const char *what, int64_t *out) {
    if (!PyLong_Check(o) || PyBool_Check(o))
        return tf_raise(L, L->st->UnpicklingError, "tensor %s is a %s, not an int", what, Py_TYPE(o)->tp_name);
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || v < 0) return tf_raise(L, L->st->FormatError, "tensor %s %R is out of range", what, o);
    *out = (int64_t)v;
    return 0;
}

static int get_dims(Loader *L, PyObject *seq, const char *what, int64_t *out, int *nd) {
    if (!PyTuple_Check(seq) && !PyList_Check(seq))
        return tf_raise(L, L->st->UnpicklingError, "tensor %s is a %s, not a tuple", what, Py_TYPE(seq)->tp_name);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if ((uint64_t)n > L->lim.ndim || n > NPY_MAXDIMS)
        return tf_raise(L, L->st->LimitError, "tensor with %zd dimensions exceeds the limit of %llu", n,
                        (unsigned long long)L->lim.ndim);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++)
        if (get_index(L, items[i], what, &out[i]) < 0) return -1;
    *nd = (int)n;
    return 0;
}

static PyObject *helper_call(Loader *L, const char *name, PyObject *args) {
    return tf_call_helper(L, name, args);
}

/* The dtype value of a `torch <dtype>` GLOBAL back to its DtypeId. */
static int dtype_from_value(Loader *L, PyObject *v) {
    for (int i = 0; i < DT_COUNT; i++)
        if (L->st->dtype_value[i] == v || (L->torch_dtypes && PyTuple_GET_ITEM(L->torch_dtypes, i) == v)) return i;
    if (PyUnicode_Check(v)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(v, &n);
        if (s != NULL && n > 6 && memcmp(s, "torch.", 6) == 0) {
            DtypeId d = dtypes_by_name(s + 6, (size_t)n - 6);
            if (d != DT_NONE) return (int)d;
        }
        PyErr_Clear();
    }
    tf_raise(L, L->st->UnpicklingError, "tensor dtype %R is not a torch dtype", v);
    return -1;
}

/* A MetaArray (torchfree's own class) with shape and dtype set directly,
 * without running Python code per tensor. Steals shape. */
static PyObject *make_meta(Loader *L, PyObject *shape, int dt);

/* dtype of a MetaArray / TensorRef: what the array would have (complex32 -> complex64). */
static PyObject *dtype_object(ModuleState *st, int dt) {
    if (dt == DT_COMPLEX32) dt = DT_COMPLEX64;
    PyObject *d = tf_dtype_of(st, dt);
    return d ? Py_NewRef(d) : NULL;
}

static PyObject *make_meta(Loader *L, PyObject *shape, int dt) {
    ModuleState *st = L->st;
    PyTypeObject *tp = (PyTypeObject *)st->MetaArrayType;
    if (tf_load_need_dtype(L, dt == DT_COMPLEX32 ? DT_COMPLEX64 : dt) < 0) {
        Py_DECREF(shape);
        return NULL;
    }
    PyObject *obj = tp->tp_alloc(tp, 0);
    PyObject *dtype = obj ? dtype_object(st, dt) : NULL;
    if (dtype == NULL || PyObject_SetAttr(obj, st->str_shape, shape) < 0 ||
        PyObject_SetAttr(obj, st->str_dtype, dtype) < 0) {
        Py_XDECREF(obj);
        obj = NULL;
    }
    Py_DECREF(shape);
    Py_XDECREF(dtype);
    return obj;
}

/* ---- TensorRef: a validated tensor of a lazy archive, not read yet ---------- */

/* TensorRef (the struct) is in objects.h: scan reads it. */

static void TensorRef_dealloc(TensorRef *self) {
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(self->storage);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *int_tuple(const int64_t *v, int n, int64_t scale) {
    PyObject *t = PyTuple_New(n);
    if (t == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *x = PyLong_FromLongLong((long long)(v[i] * scale));
        if (x == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

static PyObject *TensorRef_get_shape(TensorRef *self, void *c) { return int_tuple(self->size, self->nd, 1); }
static PyObject *TensorRef_get_stride(TensorRef *self, void *c) { return int_tuple(self->stride, self->nd, 1); }
static PyObject *TensorRef_get_offset(TensorRef *self, void *c) { return PyLong_FromLongLong(self->offset); }
static PyObject *TensorRef_get_storage(TensorRef *self, void *c) { return Py_NewRef(self->storage); }
static PyObject *TensorRef_get_torch_dtype(TensorRef *self, void *c) {
    return PyUnicode_FromString(dtypes_table[self->dtype].name);
}
static PyObject *TensorRef_get_itemsize(TensorRef *self, void *c) {
    return PyLong_FromLong(dtypes_table[self->dtype].itemsize);
}
static PyObject *TensorRef_get_conj(TensorRef *self, void *c) { return PyBool_FromLong(self->conj); }
static PyObject *TensorRef_get_neg(TensorRef *self, void *c) { return PyBool_FromLong(self->neg); }

static PyObject *TensorRef_get_dtype(TensorRef *self, void *c) {
    ModuleState *st = tf_state_of_type(Py_TYPE(self));
    return st ? dtype_object(st, self->dtype) : NULL;
}

static PyGetSetDef TensorRef_getset[] = {
    {"storage", (getter)TensorRef_get_storage, NULL, "the torchfree.Storage it views", NULL},
    {"dtype", (getter)TensorRef_get_dtype, NULL, "dtype of the array it becomes", NULL},
    {"torch_dtype", (getter)TensorRef_get_torch_dtype, NULL, "torch's name of the dtype", NULL},
    {"itemsize", (getter)TensorRef_get_itemsize, NULL, "torch element size in bytes", NULL},
    {"shape", (getter)TensorRef_get_shape, NULL, "shape", NULL},
    {"stride", (getter)TensorRef_get_stride, NULL, "strides in elements (torch's)", NULL},
    {"storage_offset", (getter)TensorRef_get_offset, NULL, "offset in the storage, in elements", NULL},
    {"conj", (getter)TensorRef_get_conj, NULL, "conj bit", NULL},
    {"neg", (getter)TensorRef_get_neg, NULL, "neg bit", NULL},
    {NULL},
};

static PyType_Slot TensorRef_slots[] = {
    {Py_tp_dealloc, TensorRef_dealloc},
    {Py_tp_getset, TensorRef_getset},
    {Py_tp_doc, "A tensor of a checkpoint opened lazily: validated, not read yet."},
    {0, NULL},
};

PyType_Spec TensorRefSpec = {
    .name = "torchfree._core.TensorRef",
    .basicsize = offsetof(TensorRef, dims),
    .itemsize = sizeof(int64_t),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = TensorRef_slots,
};

/* Note a copy made from a storage whose bytes are not read yet (legacy stream:
 * they follow the pickle); legacy_fixups() redoes it once they are. Steals item. */
static int defer_fixup(Loader *L, PyObject *item) {
    if (item == NULL) return -1;
    int r = PyList_Append(L->fixups, item);
    Py_DECREF(item);
    return r;
}

/* Torch mode: torch["tensor"](storage, dtype id, offset, size, stride, conj, neg) makes the
 * torch tensor (one torch storage per Storage; a meta Storage gives a meta tensor). Its
 * errors are torch's (map_location, devices) and pass through unchanged. */
static PyObject *torch_view(Loader *L, StorageObject *s, int dt, int64_t offset, int nd, const int64_t *size,
                            const int64_t *stride, int conj, int neg) {
    PyObject *argv[7] = {(PyObject *)s, PyLong_FromLong(dt), PyLong_FromLongLong((long long)offset),
                         int_tuple(size, nd, 1), int_tuple(stride, nd, 1), PyBool_FromLong(conj),
                         PyBool_FromLong(neg)};
    PyObject *r = NULL;
    if (argv[1] && argv[2] && argv[3] && argv[4] && argv[5] && argv[6])
        r = PyObject_Vectorcall(L->torch_tensor, argv, 7, NULL);
    for (int i = 1; i < 7; i++) Py_XDECREF(argv[i]);
    return r;
}

/* An array over s with (offset, size, stride) in elements of dt, already
 * validated against s. Reads s first when it is still unread. */
static PyObject *make_view(Loader *L, StorageObject *s, int dt, int64_t offset, int nd, const int64_t *size,
                           const int64_t *stride, int conj, int neg) {
    ModuleState *st = L->st;
    const DtypeInfo *info = &dtypes_table[dt];
    uint64_t itemsize = info->itemsize;
    if (s->meta && L->torch) return torch_view(L, s, dt, offset, nd, size, stride, conj, neg);
    if (s->meta) {
        PyObject *shape = int_tuple(size, nd, 1);
        return shape ? make_meta(L, shape, dt) : NULL;
    }
    if ((L->big_endian || (L->legacy_be && s->dtype == DT_UINT8)) && !s->swap_unit && !s->swapped &&
        info->itemsize > 1)
        s->swap_unit = (info->flags & DTF_COMPLEX) ? info->itemsize / 2 : info->itemsize;
    if ((s->unread || !s->hooked) && storage_ready(L, s) < 0) return NULL;
    if (L->torch) return torch_view(L, s, dt, offset, nd, size, stride, conj, neg);
    if (s->meta) { /* the map_location callable turned it into a meta storage */
        PyObject *shape = int_tuple(size, nd, 1);
        return shape ? make_meta(L, shape, dt) : NULL;
    }
    if (tf_load_need_dtype(L, dt) < 0) return NULL; /* a lazy archive's first such array (scan defers it) */
    PyArray_Descr *descr = st->descr[dt];
    if (descr == NULL)
        return tf_raise(L, st->UnpicklingError, "dtype %s needs ml_dtypes, which is not available", info->name), NULL;
    npy_intp dims[NPY_MAXDIMS + 1], strides[NPY_MAXDIMS + 1];
    for (int i = 0; i < nd; i++) {
        uint64_t sb;
        if (tf_mul_u64((uint64_t)stride[i], itemsize, &sb) || sb > (uint64_t)NPY_MAX_INTP)
            return tf_raise(L, st->FormatError, "tensor stride overflows"), NULL;
        dims[i] = (npy_intp)size[i];
        strides[i] = (npy_intp)sb;
    }
    for (int i = 0; i < nd; i++)
        if (size[i] == 0) offset = 0; /* empty: its (unchecked) offset is never dereferenced */
    char *data = s->data + offset * (int64_t)itemsize;
    PyObject *base = (PyObject *)s;
    int64_t esize = (int64_t)itemsize; /* bytes per element of the memory viewed */
    if (dt == DT_COMPLEX32) {
        /* numpy has no complex32: the whole storage is upcast to complex64 once,
         * so every view of it still shares memory */
        if (s->upcast == NULL) {
            if (storage_ready(L, s) < 0 || storage_charge(L, 2 * (uint64_t)s->nbytes) < 0) return NULL;
            PyObject *hargs = Py_BuildValue("(O)", (PyObject *)s);
            if (hargs == NULL) return NULL;
            s->upcast = helper_call(L, "complex32_storage", hargs);
            Py_DECREF(hargs);
            if (s->upcast == NULL) return NULL;
            if (s->pending && defer_fixup(L, Py_BuildValue("(OO)", (PyObject *)s, s->upcast)) < 0) return NULL;
        }
        descr = PyArray_DESCR((PyArrayObject *)s->upcast);
        for (int i = 0; i < nd; i++) strides[i] *= 2;
        esize = 8;
        data = (char *)PyArray_DATA((PyArrayObject *)s->upcast) + offset * 8;
        base = s->upcast;
    }
    PyObject *own = NULL;
    if (conj || neg) {
        /* numpy has no lazy conj/neg bits: the span of storage the view covers is
         * copied once, the bits applied to the copy, and the view made over it
         * with torch's own strides (a broadcast view copies one element) */
        int64_t extent = 1;
        for (int i = 0; i < nd; i++) {
            if (size[i] == 0) extent = 0;
            if (extent && size[i] > 0) extent += (size[i] - 1) * stride[i]; /* checked when rebuilt */
        }
        npy_intp n = (npy_intp)extent;
        if (storage_ready(L, s) < 0 || storage_charge(L, (uint64_t)extent * (uint64_t)esize) < 0) return NULL;
        Py_INCREF(descr);
        own = PyArray_NewFromDescr(&PyArray_Type, descr, 1, &n, NULL, NULL, 0, NULL);
        if (own == NULL) return NULL;
        memcpy(PyArray_DATA((PyArrayObject *)own), data, (size_t)(extent * esize));
        PyObject *args = Py_BuildValue("(Oii)", own, conj, neg);
        PyObject *r = args ? helper_call(L, "fix_values", args) : NULL;
        Py_XDECREF(args);
        if (r == NULL) {
            Py_DECREF(own);
            return NULL;
        }
        Py_DECREF(r);
        if (s->pending &&
            defer_fixup(L, Py_BuildValue("(OOnii)", own, base, (Py_ssize_t)(data - (base == (PyObject *)s
                                                                                        ? s->data
                                                                                        : (char *)PyArray_DATA((PyArrayObject *)base))),
                                         conj, neg)) < 0) {
            Py_DECREF(own);
            return NULL;
        }
        data = PyArray_DATA((PyArrayObject *)own);
        base = own;
    }
    Py_INCREF(descr);
    PyObject *arr = PyArray_NewFromDescr(&PyArray_Type, descr, nd, dims, strides, data,
                                         (s->readonly && own == NULL) ? 0 : NPY_ARRAY_WRITEABLE, NULL);
    if (arr == NULL) {
        Py_XDECREF(own);
        return NULL;
    }
    if (PyArray_SetBaseObject((PyArrayObject *)arr, own ? own : Py_NewRef(base)) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

PyObject *tensor_materialize(Loader *L, PyObject *ref) {
    if (Py_TYPE(ref) != L->st->TensorRefType) {
        PyErr_Format(PyExc_TypeError, "expected a TensorRef, not %s", Py_TYPE(ref)->tp_name);
        return NULL;
    }
    TensorRef *t = (TensorRef *)ref;
    if (((StorageObject *)t->storage)->loader != L) {
        PyErr_SetString(PyExc_ValueError, "this tensor belongs to another checkpoint");
        return NULL;
    }
    return make_view(L, (StorageObject *)t->storage, t->dtype, t->offset, t->nd, t->size, t->stride, t->conj,
                     t->neg);
}

static PyObject *rebuild_dims(Loader *L, StorageObject *s, int dt, int64_t offset, int nd, const int64_t *size,
                              const int64_t *stride, PyObject *metadata, int quantized);

/* The heart of every dense rebuild: torch's (offset, size, stride) in
 * elements of dtype dt, checked to lie inside `storage`, then a numpy view
 * (or, in a lazy archive, a TensorRef to make one later). */
static PyObject *rebuild_strided(Loader *L, PyObject *storage, PyObject *offset_o, PyObject *size_o,
                                 PyObject *stride_o, int dt, PyObject *metadata, int quantized) {
    ModuleState *st = L->st;
    if (!is_storage(L, storage))
        return tf_raise(L, st->UnpicklingError, "tensor rebuilt over a %s, not a storage",
                        Py_TYPE(storage)->tp_name), NULL;
    StorageObject *s = (StorageObject *)storage;
    if (dt < 0) dt = s->dtype;
    const DtypeInfo *info = &dtypes_table[dt];
    if (quantized ? !(info->flags & DTF_QUANTIZED) : (info->flags & (DTF_QUANTIZED | DTF_NO_TENSOR)) != 0)
        return tf_raise(L, st->UnpicklingError, "dtype %s cannot be rebuilt as a %s tensor", info->name,
                        quantized ? "quantized" : "plain"), NULL;
    int64_t offset, size[NPY_MAXDIMS + 1], stride[NPY_MAXDIMS + 1];
    int nd, nds;
    if (get_index(L, offset_o, "storage offset", &offset) < 0 || get_dims(L, size_o, "size", size, &nd) < 0 ||
        get_dims(L, stride_o, "stride", stride, &nds) < 0)
        return NULL;
    if (nd != nds)
        return tf_raise(L, st->FormatError, "tensor has %d sizes but %d strides", nd, nds), NULL;
    return rebuild_dims(L, s, dt, offset, nd, size, stride, metadata, quantized);
}

/* rebuild_strided after its arguments became C integers (offset, sizes and strides >= 0,
 * nd <= the ndim limit and NPY_MAXDIMS). */
static PyObject *rebuild_dims(Loader *L, StorageObject *s, int dt, int64_t offset, int nd, const int64_t *size,
                              const int64_t *stride, PyObject *metadata, int quantized) {
    ModuleState *st = L->st;
    const DtypeInfo *info = &dtypes_table[dt];
    /* extent in elements: offset + sum((size-1)*stride) + 1, unless empty */
    uint64_t itemsize = info->itemsize, last = (uint64_t)offset, numel = 1;
    int empty = 0;
    for (int i = 0; i < nd; i++) {
        uint64_t t;
        if (size[i] == 0) empty = 1;
        if (tf_mul_u64(numel, (uint64_t)size[i], &numel))
            return tf_raise(L, st->FormatError, "tensor size overflows"), NULL;
        if (size[i] > 0 && (tf_mul_u64((uint64_t)(size[i] - 1), (uint64_t)stride[i], &t) || tf_add_u64(last, t, &last)))
            return tf_raise(L, st->FormatError, "tensor size x stride overflows"), NULL;
    }
    if (quantized && (dt == DT_QUINT4X2 || dt == DT_QUINT2X4)) {
        /* sub-byte: torch's int_repr() is the packed bytes of the numel elements,
         * read linearly from the data pointer (strides play no part) */
        uint64_t per = dt == DT_QUINT4X2 ? 2 : 4, packed = (numel + per - 1) / per;
        uint64_t end;
        if (tf_add_u64((uint64_t)offset, packed, &end) || end > (uint64_t)s->nbytes)
            return tf_raise(L, st->FormatError,
                            "quantized %s tensor of %llu elements at offset %lld reaches past the end of record "
                            "data/%U (%zd bytes)", info->name, (unsigned long long)numel, (long long)offset, s->key,
                            s->nbytes), NULL;
        int64_t psize = (int64_t)packed, pstride = 1;
        return make_view(L, s, dt, offset, 1, &psize, &pstride, 0, 0);
    }
    uint64_t end_bytes;
    if (empty) {
        /* no element is ever read: torch accepts any offset here (torch.zeros(4, 0, 4)[1:]
         * has offset 4 in a 0-byte storage); make_view points it at the storage's start */
    } else if (tf_add_u64(last, 1, &end_bytes) || tf_mul_u64(end_bytes, itemsize, &end_bytes) ||
               end_bytes > (uint64_t)s->nbytes) {
        return tf_raise(L, st->FormatError,
                        "tensor (offset %lld, %d dims) reaches past the end of record data/%U (%zd bytes)",
                        (long long)offset, nd, s->key, s->nbytes), NULL;
    }
    int conj = 0, neg = 0;
    if (metadata != NULL && metadata != Py_None) {
        if (!PyDict_Check(metadata))
            return tf_raise(L, st->UnpicklingError, "tensor metadata is not a dict"), NULL;
        PyObject *c = PyDict_GetItem(metadata, st->str_conj), *n = PyDict_GetItem(metadata, st->str_neg);
        conj = c != NULL && PyObject_IsTrue(c) == 1;
        neg = n != NULL && PyObject_IsTrue(n) == 1;
    }
    if (L->lazy && !quantized) {
        TensorRef *t = PyObject_NewVar(TensorRef, st->TensorRefType, 2 * (Py_ssize_t)nd);
        if (t == NULL) return NULL;
        t->size = t->dims;
        t->stride = t->dims + nd;
        t->storage = Py_NewRef((PyObject *)s);
        t->dtype = dt;
        t->nd = nd;
        t->conj = conj;
        t->neg = neg;
        t->offset = offset;
        memcpy(t->size, size, sizeof(int64_t) * (size_t)nd);
        memcpy(t->stride, stride, sizeof(int64_t) * (size_t)nd);
        return (PyObject *)t;
    }
    return make_view(L, s, dt, offset, nd, size, stride, conj, neg);
}

PyObject *tensor_strided(Loader *L, PyObject *storage, PyObject *offset, PyObject *size, PyObject *stride, int dt) {
    return rebuild_strided(L, storage, offset, size, stride, dt, NULL, 0);
}

PyObject *tensor_strided_dims(Loader *L, PyObject *storage, int64_t offset, int nd, const int64_t *size,
                              const int64_t *stride) {
    if (!is_storage(L, storage))
        return tf_raise(L, L->st->UnpicklingError, "tensor rebuilt over a %s, not a storage",
                        Py_TYPE(storage)->tp_name), NULL;
    StorageObject *s = (StorageObject *)storage;
    int dt = s->dtype;
    if ((dtypes_table[dt].flags & (DTF_QUANTIZED | DTF_NO_TENSOR)) != 0)
        return tf_raise(L, L->st->UnpicklingError, "dtype %s cannot be rebuilt as a %s tensor", dtypes_table[dt].name,
                        "plain"), NULL;
    return rebuild_dims(L, s, dt, offset, nd, size, stride, NULL, 0);
}

/* OrderedDict(), OrderedDict([(k, v), ...]), Counter(...) */
static PyObject *make_mapping(Loader *L, GlobalRef *g, PyObject *type, PyObject *args) {
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n > 1) return wrong_args(L, g, "at most 1 argument", args), NULL;
    if (n == 1) {
        PyObject *a = PyTuple_GET_ITEM(args, 0);
        if (!PyList_CheckExact(a) && !PyTuple_CheckExact(a) && !PyDict_CheckExact(a))
            return tf_raise(L, L->st->UnpicklingError, "%U argument is a %s", g->canon, Py_TYPE(a)->tp_name), NULL;
    }
    if (type != L->st->OrderedDict) loader_drop_off(L); /* Counter is Python code */
    PyObject *r = PyObject_Call(type, args, NULL);
    if (r == NULL) tf_raise_from(L, L->st->UnpicklingError, "%U(...) failed", g->canon);
    return r;
}

static PyObject *make_device(Loader *L, GlobalRef *g, PyObject *args) {
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n < 1 || n > 2 || !PyUnicode_Check(PyTuple_GET_ITEM(args, 0)))
        return wrong_args(L, g, "(type: str[, index: int])", args), NULL;
    PyObject *type = PyTuple_GET_ITEM(args, 0);
    if (n == 2 && PyTuple_GET_ITEM(args, 1) != Py_None) {
        PyObject *idx = PyTuple_GET_ITEM(args, 1);
        if (!PyLong_Check(idx)) return wrong_args(L, g, "(type: str[, index: int])", args), NULL;
        return PyUnicode_FromFormat("%U:%S", type, idx);
    }
    return Py_NewRef(type);
}

static PyObject *make_codecs_encode(Loader *L, GlobalRef *g, PyObject *args) {
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n < 1 || n > 2 || !PyUnicode_Check(PyTuple_GET_ITEM(args, 0)) ||
        (n == 2 && !PyUnicode_Check(PyTuple_GET_ITEM(args, 1))))
        return wrong_args(L, g, "(text: str, encoding: str)", args), NULL;
    const char *enc = n == 2 ? PyUnicode_AsUTF8(PyTuple_GET_ITEM(args, 1)) : "utf-8";
    if (enc == NULL) return NULL;
    static const char *const allowed[] = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii"};
    int ok = 0;
    for (size_t i = 0; i < sizeof(allowed) / sizeof(allowed[0]); i++) ok |= strcmp(enc, allowed[i]) == 0;
    if (!ok) return tf_raise(L, L->st->UnpicklingError, "%U with encoding %s is not supported", g->canon, enc), NULL;
    PyObject *r = PyUnicode_AsEncodedString(PyTuple_GET_ITEM(args, 0), enc, "strict");
    if (r == NULL) tf_raise_from(L, L->st->UnpicklingError, "%U(text, '%s') failed", g->canon, enc);
    return r;
}

/* Sequence argument of set()/frozenset(): exact list, tuple or set. */
static PyObject *make_set(Loader *L, GlobalRef *g, PyObject *args, int frozen) {
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *a = n == 1 ? PyTuple_GET_ITEM(args, 0) : NULL;
    if (n > 1 || (a && !PyList_CheckExact(a) && !PyTuple_CheckExact(a) && !PySet_CheckExact(a)))
        return wrong_args(L, g, "one list", args), NULL;
    PyObject *r = frozen ? PyFrozenSet_New(a) : PySet_New(a);
    if (r == NULL) tf_raise_from(L, L->st->UnpicklingError, "%U of unhashable items", g->canon);
    return r;
}

static int all_type(PyObject *args, int (*check)(PyObject *), Py_ssize_t lo, Py_ssize_t hi) {
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n < lo || n > hi) return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!check(PyTuple_GET_ITEM(args, i))) return 0;
    return 1;
}
static int check_number(PyObject *o) { return PyFloat_Check(o) || PyLong_Check(o); }
static int check_int_or_none(PyObject *o) { return PyLong_Check(o) || o == Py_None; }
static int check_int(PyObject *o) { return PyLong_Check(o); }

/* torch.jit._pickle helpers of TorchScript pickles. In torch they return their
 * first argument; the static type tags only matter to TorchScript's own types. */
static PyObject *jit_pickle_helper(Loader *L, GlobalRef *g, PyObject *args) {
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    PyObject *a = n >= 1 ? PyTuple_GET_ITEM(args, 0) : NULL;
    switch (g->id) {
    case G_JIT_BUILD_LIST: /* build_intlist([1, 2]) and friends */
        if (n != 1 || !PyList_CheckExact(a)) return wrong_args(L, g, "one list", args), NULL;
        return Py_NewRef(a);
    case G_JIT_BUILD_TENSOR_FROM_ID: /* only an id into a tensor table archives do not have */
        if (n != 1 || !PyLong_CheckExact(a)) return wrong_args(L, g, "one int", args), NULL;
        return Py_NewRef(a);
    default: /* restore_type_tag(value, "Dict[str, Tensor]") */
        if (n != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(args, 1)))
            return wrong_args(L, g, "(value, type: str)", args), NULL;
        return Py_NewRef(a);
    }
}

/* Finish the deferred reads and byte swaps of the storages seen so far: the
 * rare rebuilds below check and compute with their parts' values now. Returns 1
 * when those values are not there (a legacy stream's bytes follow its pickle; a
 * lazy scan of one reads none): the caller then leaves None in the object's place. */
static int ready_all(Loader *L) {
    if (L->format != FMT_ZIP && L->lazy) return 1; /* scan of a legacy stream or tar: no bytes at all */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(L->storage_list); i++) {
        StorageObject *s = (StorageObject *)PyList_GET_ITEM(L->storage_list, i);
        if (L->format == FMT_LEGACY && s->pending) {
            /* a legacy stream's bytes follow its pickle: this object is made on a second run */
            L->legacy_rerun = 1;
            return 1;
        }
        if ((s->pending || (s->swap_unit && !s->swapped)) && storage_ready(L, s) < 0) return -1;
    }
    return 0;
}

/* o with every TensorRef (of a lazy archive) made an array, looking into
 * tuples and lists down to `depth` levels: the rare rebuilds (quantized,
 * sparse, nested) need their parts' values. New reference. */
static PyObject *materialize_all(Loader *L, PyObject *o, int depth) {
    if (Py_TYPE(o) == L->st->TensorRefType) return tensor_materialize(L, o);
    if (depth <= 0 || !(PyTuple_CheckExact(o) || PyList_CheckExact(o))) return Py_NewRef(o);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = materialize_all(L, PySequence_Fast_GET_ITEM(o, i), depth - 1);
        if (x == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, x);
    }
    if (PyList_CheckExact(o)) return out;
    Py_SETREF(out, PyList_AsTuple(out));
    return out;
}

/* A MetaArray of a (dtype GLOBAL, size) pair of a storage-less rebuild. */
static PyObject *meta_of(Loader *L, PyObject *dtype, PyObject *size_o) {
    int dt = dtype_from_value(L, dtype);
    int64_t size[NPY_MAXDIMS + 1];
    int nd;
    if (dt < 0 || get_dims(L, size_o, "size", size, &nd) < 0) return NULL;
    PyObject *shape = PySequence_Tuple(size_o);
    return shape ? make_meta(L, shape, dt) : NULL;
}

/* Torch mode: tensor t (stolen) with requires_grad set when flag is true (torch["requires_grad"]),
 * and, as torch's _rebuild_tensor_v2/v3 do, hooks (the pickled backward_hooks) as its
 * _backward_hooks: torch's files always hold an empty OrderedDict there, which is set (each
 * tensor has its own, as in torch). A dict that is not empty would hold objects from the file
 * that autograd would call: it is left out, as is anything that is not a dict. */
static PyObject *torch_finish(Loader *L, PyObject *t, PyObject *flag, PyObject *hooks) {
    if (t == NULL || L->torch == NULL) return t;
    if (flag != Py_False) {
        PyObject *args = PyTuple_Pack(2, t, flag);
        Py_SETREF(t, args ? tf_call_helper(L, "requires_grad", args) : NULL);
        Py_XDECREF(args);
        if (t == NULL) return NULL;
    }
    if (PyDict_Check(hooks) && PyDict_GET_SIZE(hooks) == 0 && PyObject_SetAttrString(t, "_backward_hooks", hooks) < 0)
        Py_CLEAR(t);
    return t;
}

/* Torch mode: helper name(*args) (args borrowed). */
static PyObject *torch_helper(Loader *L, const char *name, PyObject *args) { return tf_call_helper(L, name, args); }

/* The rebuilds below and tensor_reduce read their call's arguments as ARG(i). */
#define ARG(i) PyTuple_GET_ITEM(args, i)

static PyObject *rebuild_from_type(Loader *L, GlobalRef *g, PyObject *args) {
    ModuleState *st = L->st;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n != 4) return wrong_args(L, g, "(func, type, args, state)", args), NULL;
    PyObject *func = ARG(0), *type = ARG(1), *fargs = ARG(2);
    if (Py_TYPE(func) != st->GlobalRefType || ((GlobalRef *)func)->obj != NULL || !PyTuple_Check(fargs))
        return tf_raise(L, st->UnpicklingError, "%U needs a torch rebuild function", g->canon), NULL;
    PyObject *inner = tensor_reduce(L, (GlobalRef *)func, fargs);
    if (inner == NULL) return NULL;
    if (Py_TYPE(type) == st->GlobalRefType &&
        (((GlobalRef *)type)->id == G_TENSOR || ((GlobalRef *)type)->id == G_PARAMETER)) {
        if (L->torch == NULL) return inner; /* plain tensor or Parameter with Python attributes */
        PyObject *targs = Py_BuildValue("(iNO)", ((GlobalRef *)type)->id == G_PARAMETER, inner, ARG(3));
        PyObject *r = targs ? torch_helper(L, "from_type", targs) : NULL;
        Py_XDECREF(targs);
        return r;
    }
    /* a wrapper subclass's inner is a storage-less placeholder: its data is in the state */
    int wrapper = ((GlobalRef *)func)->id == G_REBUILD_WRAPPER_SUBCLASS;
    PyObject *hargs = wrapper ? Py_BuildValue("(ONOO)", type, inner, ARG(3), Py_True)
                              : Py_BuildValue("(ONO)", type, inner, ARG(3));
    if (hargs == NULL) return NULL;
    PyObject *r = helper_call(L, "subclass", hargs);
    Py_DECREF(hargs);
    return r;
}

static PyObject *rebuild_meta_no_storage(Loader *L, GlobalRef *g, PyObject *args) {
    ModuleState *st = L->st;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n != 4) return wrong_args(L, g, "(dtype, size, stride, requires_grad)", args), NULL;
    if (L->torch) {
        int dt = dtype_from_value(L, ARG(0));
        int64_t size[NPY_MAXDIMS + 1], stride[NPY_MAXDIMS + 1];
        int nd, nds;
        if (dt < 0 || get_dims(L, ARG(1), "size", size, &nd) < 0 || get_dims(L, ARG(2), "stride", stride, &nds) < 0)
            return NULL;
        if (nds != nd) return tf_raise(L, st->FormatError, "tensor has %d sizes but %d strides", nd, nds), NULL;
        PyObject *targs = Py_BuildValue("(iOOO)", dt, ARG(1), ARG(2), ARG(3));
        PyObject *r = targs ? torch_helper(L, "meta_tensor", targs) : NULL;
        Py_XDECREF(targs);
        return r;
    }
    return meta_of(L, ARG(0), ARG(1));
}

static PyObject *make_bytes(Loader *L, GlobalRef *g, PyObject *args) {
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    /* (text, encoding): how Python 2 pickles a bytearray (latin-1 text and 'latin-1');
     * encoded as _codecs.encode would */
    if (n == 2 && PyUnicode_Check(ARG(0)) && PyUnicode_Check(ARG(1))) {
        PyObject *b = make_codecs_encode(L, g, args);
        if (b == NULL || g->id == G_BYTES) return b;
        PyObject *r = PyByteArray_FromObject(b);
        Py_DECREF(b);
        return r;
    }
    if (n > 1 || (n == 1 && !PyBytes_CheckExact(ARG(0)) && !PyByteArray_CheckExact(ARG(0))))
        return wrong_args(L, g, "at most one bytes, or (text: str, encoding: str)", args), NULL;
    const char *p = "";
    Py_ssize_t len = 0;
    if (n == 1) {
        p = PyBytes_Check(ARG(0)) ? PyBytes_AS_STRING(ARG(0)) : PyByteArray_AS_STRING(ARG(0));
        len = PyBytes_Check(ARG(0)) ? PyBytes_GET_SIZE(ARG(0)) : PyByteArray_GET_SIZE(ARG(0));
    }
    return g->id == G_BYTES ? PyBytes_FromStringAndSize(p, len) : PyByteArray_FromStringAndSize(p, len);
}

static PyObject *rebuild_qtensor(Loader *L, GlobalRef *g, PyObject *args) {
    ModuleState *st = L->st;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n != 7)
        return wrong_args(L, g, "(storage, offset, size, stride, quantizer_params, requires_grad, hooks)", args),
               NULL;
    if (!is_storage(L, ARG(0)))
        return tf_raise(L, st->UnpicklingError, "quantized tensor rebuilt over a %s, not a storage",
                        Py_TYPE(ARG(0))->tp_name), NULL;
    int dt = ((StorageObject *)ARG(0))->dtype;
    PyObject *view = rebuild_strided(L, ARG(0), ARG(1), ARG(2), ARG(3), dt, NULL, 1);
    if (view == NULL) return NULL;
    int ready = ready_all(L);
    if (ready != 0) {
        Py_DECREF(view);
        return ready < 0 ? NULL : Py_NewRef(Py_None);
    }
    PyObject *params = materialize_all(L, ARG(4), 2);
    PyObject *shape = params ? PySequence_Tuple(ARG(2)) : NULL;
    if (shape == NULL) {
        Py_DECREF(view);
        Py_XDECREF(params);
        return NULL;
    }
    PyObject *hargs = Py_BuildValue("(NsNN)", view, dtypes_table[dt].name, shape, params);
    PyObject *r = hargs ? helper_call(L, "qtensor", hargs) : NULL;
    Py_XDECREF(hargs);
    return r;
}

static PyObject *rebuild_valued(Loader *L, GlobalRef *g, PyObject *args) {
    ModuleState *st = L->st;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    const char *helper = g->id == G_REBUILD_NESTED_TENSOR ? "nested"
                         : g->id == G_REBUILD_SPARSE_TENSOR ? "sparse"
                         : g->id == G_REBUILD_SPARSE_CSR_TENSOR ? "sparse_csr"
                                                                : "device_tensor";
    if (g->id == G_REBUILD_NESTED_TENSOR && n != 4)
        return wrong_args(L, g, "(buffer, sizes, strides, storage_offsets)", args), NULL;
    if ((g->id == G_REBUILD_SPARSE_TENSOR || g->id == G_REBUILD_SPARSE_CSR_TENSOR) && n != 2)
        return wrong_args(L, g, "(layout, data)", args), NULL;
    PyObject *margs;
    int ready = ready_all(L);
    if (ready != 0) return ready < 0 ? NULL : Py_NewRef(Py_None);
    if (g->id == G_REBUILD_DEVICE_TENSOR_FROM_NUMPY || g->id == G_REBUILD_DEVICE_TENSOR_FROM_CPU_TENSOR) {
        if (n != 4) return wrong_args(L, g, "(data, dtype, device, requires_grad)", args), NULL;
        int dt = dtype_from_value(L, ARG(1));
        if (dt < 0 || tf_load_need_dtype(L, dt) < 0) return NULL;
        if (st->descr[dt] == NULL || (dtypes_table[dt].flags & (DTF_QUANTIZED | DTF_NO_TENSOR)) ||
            dt == DT_COMPLEX32)
            return tf_raise(L, st->UnpicklingError, "%U to dtype %s is not supported", g->canon,
                            dtypes_table[dt].name), NULL;
        PyObject *data = materialize_all(L, ARG(0), 0);
        margs = data ? Py_BuildValue("(NO)", data, (PyObject *)st->descr[dt]) : NULL;
    } else {
        margs = materialize_all(L, args, 2);
    }
    if (margs == NULL) return NULL;
    PyObject *r = helper_call(L, helper, margs);
    Py_DECREF(margs);
    return r;
}

static PyObject *make_empty_tensor(Loader *L, GlobalRef *g, PyObject *args) {
    ModuleState *st = L->st;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    /* torch.Tensor() / torch.FloatTensor(): an empty tensor, which a pre-0.4 pickle
     * then BUILDs with (storage, offset, size, stride) */
    if (n != 0)
        return tf_raise(L, st->UnpicklingError, "%U called with arguments is not supported", g->canon), NULL;
    int dt = g->id == G_TENSOR ? DT_FLOAT32 : g->arg;
    if (dt >= 0 && tf_load_need_dtype(L, dt) < 0) return NULL;
    if (dt < 0 || st->descr[dt] == NULL)
        return tf_raise(L, st->UnpicklingError, "%U has no array dtype", g->canon), NULL;
    /* numpy gives a fresh empty array stride 0; torch's is (1,): view a 1-element buffer */
    npy_intp one = 1, zero = 0, stride = (npy_intp)dtypes_table[dt].np_itemsize;
    Py_INCREF(st->descr[dt]);
    PyObject *buf = PyArray_NewFromDescr(&PyArray_Type, st->descr[dt], 1, &one, NULL, NULL, 0, NULL);
    if (buf == NULL) return NULL;
    Py_INCREF(st->descr[dt]);
    PyObject *arr = PyArray_NewFromDescr(&PyArray_Type, st->descr[dt], 1, &zero, &stride,
                                         PyArray_DATA((PyArrayObject *)buf), NPY_ARRAY_WRITEABLE, NULL);
    if (arr == NULL || PyArray_SetBaseObject((PyArrayObject *)arr, buf) < 0) {
        if (arr == NULL) Py_DECREF(buf);
        Py_XDECREF(arr);
        return NULL;
    }
    return arr;
}

PyObject *tensor_reduce(Loader *L, GlobalRef *g, PyObject *args) {
    ModuleState *st = L->st;
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    switch (g->id) {
    case G_REBUILD_TENSOR_V2:
        if (n < 6 || n > 7) return wrong_args(L, g, "6 or 7 arguments", args), NULL;
        return torch_finish(L, rebuild_strided(L, ARG(0), ARG(1), ARG(2), ARG(3), -1, n == 7 ? ARG(6) : NULL, 0),
                            ARG(4), ARG(5));
    case G_REBUILD_TENSOR:
        if (n != 4) return wrong_args(L, g, "4 arguments", args), NULL;
        return rebuild_strided(L, ARG(0), ARG(1), ARG(2), ARG(3), -1, NULL, 0);
    case G_REBUILD_TENSOR_V3: {
        if (n < 7 || n > 8) return wrong_args(L, g, "7 or 8 arguments", args), NULL;
        int dt = dtype_from_value(L, ARG(6));
        if (dt < 0) return NULL;
        return torch_finish(L, rebuild_strided(L, ARG(0), ARG(1), ARG(2), ARG(3), dt, n == 8 ? ARG(7) : NULL, 0),
                            ARG(4), ARG(5));
    }
    case G_REBUILD_PARAMETER:
    case G_REBUILD_PARAMETER_WITH_STATE:
    case G_PARAMETER:
        /* a Parameter is its data (numpy arrays carry no requires_grad) */
        if (n < 1 || n > 4) return wrong_args(L, g, "(data, requires_grad, hooks[, state])", args), NULL;
        if (L->torch) return torch_helper(L, g->id == G_PARAMETER ? "Parameter" : "parameter", args);
        return Py_NewRef(ARG(0));
    case G_REBUILD_FROM_TYPE:
    case G_REBUILD_FROM_TYPE_V2:
        return rebuild_from_type(L, g, args);
    case G_REBUILD_META_TENSOR_NO_STORAGE:
        return rebuild_meta_no_storage(L, g, args);
    case G_ORDERED_DICT:
        return make_mapping(L, g, st->OrderedDict, args);
    case G_COUNTER:
        return make_mapping(L, g, st->Counter, args);
    case G_SIZE:
        if (n != 1 || (!PyTuple_Check(ARG(0)) && !PyList_Check(ARG(0)))) return wrong_args(L, g, "one tuple", args), NULL;
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(ARG(0)); i++)
            if (!PyLong_Check(PySequence_Fast_ITEMS(ARG(0))[i]))
                return tf_raise(L, st->UnpicklingError, "torch.Size of a non-int"), NULL;
        if (L->torch) return torch_helper(L, "Size", args);
        return PySequence_Tuple(ARG(0));
    case G_DEVICE: {
        PyObject *d = make_device(L, g, args);
        if (d == NULL || L->torch == NULL) return d;
        PyObject *targs = PyTuple_Pack(1, d);
        Py_DECREF(d);
        PyObject *r = targs ? torch_helper(L, "device", targs) : NULL;
        Py_XDECREF(targs);
        return r;
    }
    case G_GET_LAYOUT:
        if (n != 1 || !PyUnicode_Check(ARG(0))) return wrong_args(L, g, "one str", args), NULL;
        return Py_NewRef(ARG(0));
    case G_CODECS_ENCODE:
        return make_codecs_encode(L, g, args);
    case G_BYTES:
    case G_BYTEARRAY:
        return make_bytes(L, g, args);
    case G_SET:
        return make_set(L, g, args, 0);
    case G_FROZENSET:
        return make_set(L, g, args, 1);
    case G_COMPLEX:
        if (!all_type(args, check_number, 0, 2)) return wrong_args(L, g, "(real, imag) numbers", args), NULL;
        return PyObject_Call((PyObject *)&PyComplex_Type, args, NULL);
    case G_SLICE:
        if (!all_type(args, check_int_or_none, 1, 3)) return wrong_args(L, g, "1 to 3 ints", args), NULL;
        return PyObject_Call((PyObject *)&PySlice_Type, args, NULL);
    case G_RANGE:
        if (!all_type(args, check_int, 1, 3)) return wrong_args(L, g, "1 to 3 ints", args), NULL;
        {
            PyObject *r = PyObject_Call((PyObject *)&PyRange_Type, args, NULL);
            if (r == NULL) tf_raise_from(L, st->UnpicklingError, "bad range arguments");
            return r;
        }
    case G_NAMESPACE:
        if (n != 0) return wrong_args(L, g, "no arguments", args), NULL;
        return helper_call(L, "namespace", args);
    case G_NP_RECONSTRUCT:
        return helper_call(L, "np_reconstruct", args);
    case G_NP_DTYPE:
        return helper_call(L, "np_dtype", args);
    case G_NP_SCALAR:
        return helper_call(L, "np_scalar", args);
    case G_REBUILD_QTENSOR:
        return rebuild_qtensor(L, g, args);
    case G_REBUILD_SPARSE_TENSOR:
    case G_REBUILD_SPARSE_CSR_TENSOR:
    case G_REBUILD_NESTED_TENSOR:
    case G_REBUILD_DEVICE_TENSOR_FROM_NUMPY:
    case G_REBUILD_DEVICE_TENSOR_FROM_CPU_TENSOR:
        return rebuild_valued(L, g, args);
    case G_REBUILD_WRAPPER_SUBCLASS: {
        /* storage-less: the real tensors are in the state _rebuild_from_type_v2 passes on */
        if (n != 8)
            return wrong_args(L, g, "(cls, dtype, size, stride, storage_offset, layout, device, requires_grad)",
                              args), NULL;
        return meta_of(L, ARG(1), ARG(2));
    }
    case G_JIT_BUILD_LIST:
    case G_JIT_BUILD_TENSOR_FROM_ID:
    case G_JIT_RESTORE_TYPE_TAG:
        return jit_pickle_helper(L, g, args);
    case G_TENSOR:
    case G_LEGACY_TENSOR:
        return make_empty_tensor(L, g, args);
    default:
        return tf_raise(L, st->UnpicklingError, "%U cannot be called", g->canon), NULL;
    }
}
#undef ARG

PyObject *tensor_build(Loader *L, PyObject *obj, PyObject *state) {
    int arr = tf_is_ndarray(L->st, obj, 1);
    if (arr < 0) return NULL;
    if ((arr || Py_TYPE(obj) == L->st->TensorRefType || Py_TYPE(obj) == (PyTypeObject *)L->st->MetaArrayType) &&
        PyTuple_CheckExact(state)) {
        /* BUILD on a tensor: Tensor.__setstate__ of pre-0.4 pickles */
        Py_ssize_t n = PyTuple_GET_SIZE(state);
        if (n == 4) /* set_(storage, offset, size, stride) */
            return rebuild_strided(L, PyTuple_GET_ITEM(state, 0), PyTuple_GET_ITEM(state, 1),
                                   PyTuple_GET_ITEM(state, 2), PyTuple_GET_ITEM(state, 3), -1, NULL, 0);
        if (n == 5) { /* a Variable: (data, _, backward_hooks, requires_grad, _) */
            PyObject *data = PyTuple_GET_ITEM(state, 0);
            int data_arr = tf_is_ndarray(L->st, data, 0);
            if (data_arr < 0) return NULL;
            if (!data_arr && Py_TYPE(data) != L->st->TensorRefType &&
                Py_TYPE(data) != (PyTypeObject *)L->st->MetaArrayType)
                return tf_raise(L, L->st->UnpicklingError, "Variable state holds a %s, not a tensor",
                                Py_TYPE(data)->tp_name), NULL;
            return Py_NewRef(data);
        }
        if (n == 3) /* (requires_grad, _, backward_hooks): the data stays */
            return Py_NewRef(obj);
        return tf_raise(L, L->st->UnpicklingError, "BUILD on a tensor with a state of %zd items (expected 3, 4 or 5)",
                        n), NULL;
    }
    PyObject *args = PyTuple_Pack(2, obj, state);
    PyObject *r = tf_call_helper(L, "build", args);
    Py_XDECREF(args);
    if (r == Py_NotImplemented) {
        Py_DECREF(r);
        return NULL;
    }
    return r;
}

PyObject *tensor_global_value(Loader *L, const GlobalHit *hit, const char *canon) {
    if (hit->id == G_DTYPE && L->torch_dtypes) return Py_NewRef(PyTuple_GET_ITEM(L->torch_dtypes, hit->arg));
    if (hit->id == G_DTYPE) return Py_NewRef(L->st->dtype_value[hit->arg]);
    if (hit->id == G_QSCHEME) return PyUnicode_FromString(canon);
    return NULL;
}
