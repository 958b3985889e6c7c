/* scaninfo.c - what scan() reports, in C: TensorInfo (one tensor: made from a TensorRef it copies
 * the few numbers it needs and builds its shape and stride tuples on first access; made from
 * Python (TensorInfo(name, dtype, ...)) it holds the values given; torchfree.TensorInfo in
 * _scan.py subclasses it), the StorageInfo and RecordInfo tables, and the text table of
 * CheckpointInfo.__str__. The walk that finds the tensors is scanwalk.c. */
#include "rebuild.h"
#include "scaninfo.h"

/* ---- TensorInfo ----------------------------------------------------------------- */

enum {
    TI_NAME, TI_DTYPE, TI_SHAPE, TI_STRIDES, TI_STRIDE, TI_KEY, TI_OFFSET, TI_NBYTES, TI_LOCATION,
    TI_TORCH_DTYPE, TI_CONJ, TI_NEG, TI_LAYOUT, TI_QUANT, TI_NNZ, TI_PARTS, TI_N
};

static char *ti_fields[] = {"name", "dtype", "shape", "strides", "stride", "storage_key", "storage_offset",
                            "nbytes", "location", "torch_dtype", "conj", "neg", "layout", "quant", "nnz", "parts",
                            NULL};

typedef struct {
    PyObject_VAR_HEAD     /* ob_size: 2 * nd numbers in dims (0 when made from Python) */
    PyObject *v[TI_N];    /* the fields; NULL: made from dims (or storage) on first access */
    PyObject *storage;    /* made from a TensorRef: its StorageObject, from whose key v[TI_KEY] is made
                           * on first access (a scan of 50,000 tensors would otherwise touch 50,000
                           * cold key strings, ~15% of its time) */
    int64_t offset;       /* storage offset, elements */
    int64_t item;         /* bytes per element of the array load returns */
    int nd;
    int compact;          /* made from a TensorRef: dims hold its sizes and strides */
    int dt;               /* made from a TensorRef: the array's dtype (v[TI_DTYPE] may wait for ml_dtypes) */
    int64_t dims[1];      /* size[nd], then stride[nd] (elements) */
} TensorInfoObject;

static int TensorInfo_traverse(TensorInfoObject *self, visitproc visit, void *arg) {
    for (int i = 0; i < TI_N; i++) Py_VISIT(self->v[i]);
    Py_VISIT(self->storage);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int TensorInfo_clear(TensorInfoObject *self) {
    for (int i = 0; i < TI_N; i++) Py_CLEAR(self->v[i]);
    Py_CLEAR(self->storage);
    return 0;
}

static void TensorInfo_dealloc(TensorInfoObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    TensorInfo_clear(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *TensorInfo_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *a[TI_N] = {NULL};
    a[TI_CONJ] = Py_False;
    a[TI_NEG] = Py_False;
    a[TI_QUANT] = Py_None;
    a[TI_NNZ] = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOO|OOOOOO:TensorInfo", ti_fields, &a[0], &a[1], &a[2],
                                     &a[3], &a[4], &a[5], &a[6], &a[7], &a[8], &a[9], &a[10], &a[11], &a[12],
                                     &a[13], &a[14], &a[15]))
        return NULL;
    /* layout and parts left out: made on first access, as for a TensorInfo made from a TensorRef */
    TensorInfoObject *self = (TensorInfoObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    for (int i = 0; i < TI_N; i++) self->v[i] = Py_XNewRef(a[i]);
    return (PyObject *)self;
}

/* a * b as a Python int, exact however big */
static PyObject *mul_obj(int64_t a, int64_t b) {
    int64_t r;
    if (!__builtin_mul_overflow(a, b, &r)) return PyLong_FromLongLong((long long)r);
    PyObject *x = PyLong_FromLongLong((long long)a), *y = PyLong_FromLongLong((long long)b);
    PyObject *p = x && y ? PyNumber_Multiply(x, y) : NULL;
    Py_XDECREF(x);
    Py_XDECREF(y);
    return p;
}

static PyObject *dims_tuple(const int64_t *d, int n, int64_t scale) {
    PyObject *t = PyTuple_New(n);
    if (t == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *x = mul_obj(d[i], scale);
        if (x == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

/* product of the shape times the element size (exact) */
static PyObject *numel_times(TensorInfoObject *self, int64_t item) {
    int64_t n = item;
    int i = 0;
    for (; i < self->nd; i++)
        if (__builtin_mul_overflow(n, self->dims[i], &n)) break;
    if (i == self->nd) return PyLong_FromLongLong((long long)n);
    PyObject *acc = PyLong_FromLongLong((long long)item);
    for (int j = 0; acc != NULL && j < self->nd; j++) {
        PyObject *x = PyLong_FromLongLong((long long)self->dims[j]);
        PyObject *p = x ? PyNumber_Multiply(acc, x) : NULL;
        Py_XDECREF(x);
        Py_SETREF(acc, p);
    }
    return acc;
}

static PyObject *field_get(TensorInfoObject *self, int i) {
    if (self->v[i] == NULL) {
        PyObject *x = NULL;
        switch (i) {
        case TI_SHAPE: x = dims_tuple(self->dims, self->nd, 1); break;
        case TI_STRIDE: x = dims_tuple(self->dims + self->nd, self->nd, 1); break;
        case TI_STRIDES: x = dims_tuple(self->dims + self->nd, self->nd, self->item); break;
        case TI_OFFSET: x = PyLong_FromLongLong((long long)self->offset); break;
        case TI_KEY:
            if (self->storage != NULL) x = Py_NewRef(((StorageObject *)self->storage)->key);
            else PyErr_SetString(PyExc_SystemError, "TensorInfo storage missing");
            break;
        case TI_NBYTES: x = numel_times(self, self->item); break;
        case TI_DTYPE: { /* bfloat16, float8: ml_dtypes is imported on first access */
            ModuleState *st = self->compact ? tf_state_of_type(Py_TYPE(self)) : NULL;
            x = st ? Py_XNewRef(tf_dtype_of(st, self->dt)) : NULL;
            if (st == NULL && !PyErr_Occurred()) PyErr_SetString(PyExc_SystemError, "TensorInfo dtype missing");
            break;
        }
        case TI_LAYOUT: x = PyUnicode_FromString("torch.strided"); break;
        case TI_QUANT:
        case TI_NNZ: x = Py_NewRef(Py_None); break;
        case TI_PARTS: x = PyTuple_New(0); break;
        default: PyErr_SetString(PyExc_SystemError, "TensorInfo field missing"); break;
        }
        if (x == NULL) return NULL;
        self->v[i] = x;
    }
    return Py_NewRef(self->v[i]);
}

static PyObject *TensorInfo_field(TensorInfoObject *self, void *closure) {
    PyObject *r;
#ifdef Py_GIL_DISABLED /* a field made on first access is made once */
    Py_BEGIN_CRITICAL_SECTION(self);
#endif
    r = field_get(self, (int)(intptr_t)closure);
#ifdef Py_GIL_DISABLED
    Py_END_CRITICAL_SECTION();
#endif
    return r;
}

static PyObject *TensorInfo_numel(TensorInfoObject *self, void *closure) {
    if (self->compact) return numel_times(self, 1);
    /* made from Python: the product of whatever shape was given */
    PyObject *shape = PySequence_Fast(self->v[TI_SHAPE], "TensorInfo.shape must be a sequence");
    if (shape == NULL) return NULL;
    PyObject *acc = PyLong_FromLong(1);
    for (Py_ssize_t j = 0; acc != NULL && j < PySequence_Fast_GET_SIZE(shape); j++)
        Py_SETREF(acc, PyNumber_Multiply(acc, PySequence_Fast_GET_ITEM(shape, j)));
    Py_DECREF(shape);
    return acc;
}

static PyGetSetDef TensorInfo_getset[] = {
    {"name", (getter)TensorInfo_field, NULL, "dotted name (flatten's)", (void *)(intptr_t)TI_NAME},
    {"dtype", (getter)TensorInfo_field, NULL, "numpy dtype of the array load returns (or 'torch.<name>')",
     (void *)(intptr_t)TI_DTYPE},
    {"shape", (getter)TensorInfo_field, NULL, "shape", (void *)(intptr_t)TI_SHAPE},
    {"strides", (getter)TensorInfo_field, NULL, "strides in bytes, as the array's .strides",
     (void *)(intptr_t)TI_STRIDES},
    {"stride", (getter)TensorInfo_field, NULL, "strides in elements, as torch's .stride()",
     (void *)(intptr_t)TI_STRIDE},
    {"storage_key", (getter)TensorInfo_field, NULL, "key of the storage it views (None for arrays pickled inline)",
     (void *)(intptr_t)TI_KEY},
    {"storage_offset", (getter)TensorInfo_field, NULL, "offset in the storage, in elements",
     (void *)(intptr_t)TI_OFFSET},
    {"nbytes", (getter)TensorInfo_field, NULL, "bytes of the tensor's own elements", (void *)(intptr_t)TI_NBYTES},
    {"location", (getter)TensorInfo_field, NULL, "location tag of its storage", (void *)(intptr_t)TI_LOCATION},
    {"torch_dtype", (getter)TensorInfo_field, NULL, "torch's name of the dtype", (void *)(intptr_t)TI_TORCH_DTYPE},
    {"conj", (getter)TensorInfo_field, NULL, "torch's lazy conj bit (load applies it to a copy)",
     (void *)(intptr_t)TI_CONJ},
    {"neg", (getter)TensorInfo_field, NULL, "torch's lazy neg bit (load applies it to a copy)",
     (void *)(intptr_t)TI_NEG},
    {"layout", (getter)TensorInfo_field, NULL,
     "torch's layout: 'torch.strided', or 'torch.sparse_coo' / '_csr' / '_csc' / '_bsr' / '_bsc'",
     (void *)(intptr_t)TI_LAYOUT},
    {"quant", (getter)TensorInfo_field, NULL, "a quantized tensor's QuantInfo (qscheme, scale, zero_point, axis); None",
     (void *)(intptr_t)TI_QUANT},
    {"nnz", (getter)TensorInfo_field, NULL, "a sparse tensor's number of specified elements; None", (void *)(intptr_t)TI_NNZ},
    {"parts", (getter)TensorInfo_field, NULL,
     "TensorInfos of the arrays a sparse or per-channel quantized tensor is made of (torch's accessor names)",
     (void *)(intptr_t)TI_PARTS},
    {"numel", (getter)TensorInfo_numel, NULL, "number of elements", NULL},
    {NULL},
};

static PyType_Slot TensorInfo_slots[] = {
    {Py_tp_new, TensorInfo_new},
    {Py_tp_dealloc, TensorInfo_dealloc},
    {Py_tp_traverse, TensorInfo_traverse},
    {Py_tp_clear, TensorInfo_clear},
    {Py_tp_getset, TensorInfo_getset},
    {Py_tp_doc, "Base of torchfree.TensorInfo (internal)."},
    {0, NULL},
};

PyType_Spec TensorInfoSpec = {
    .name = "torchfree._core.TensorInfoBase",
    .basicsize = offsetof(TensorInfoObject, dims),
    .itemsize = sizeof(int64_t),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = TensorInfo_slots,
};

/* ---- TensorInfo of a TensorRef (for walk) ---------------------------------------- */

PyObject *tensorinfo_from_ref(ModuleState *st, PyTypeObject *type, PyObject *name, TensorRef *r, PyObject **torch_names) {
    StorageObject *s = (StorageObject *)r->storage;
    int dt = r->dtype, adt = dt == DT_COMPLEX32 ? DT_COMPLEX64 : dt;
    /* allocated untracked: it holds strings, a dtype and ints, never part of a cycle, so the
     * collector need not look at it (as CPython does for tuples of atoms) */
    TensorInfoObject *t = PyObject_GC_NewVar(TensorInfoObject, type, 2 * (Py_ssize_t)r->nd);
    if (t == NULL) return NULL;
    memset(t->v, 0, sizeof t->v);
    if (torch_names[dt] == NULL && (torch_names[dt] = PyUnicode_FromString(dtypes_table[dt].name)) == NULL) {
        Py_DECREF(t);
        return NULL;
    }
    PyArray_Descr *d = st->descr[adt];
    int later = tf_dtype_needs_import(st, adt); /* made on first access: scan needs no ml_dtypes */
    t->v[TI_NAME] = Py_NewRef(name);
    t->v[TI_DTYPE] = later ? NULL : Py_NewRef(d ? (PyObject *)d : st->dtype_value[adt]);
    t->dt = adt;
    t->storage = Py_NewRef((PyObject *)s);
    t->v[TI_LOCATION] = Py_NewRef(s->location);
    t->v[TI_TORCH_DTYPE] = Py_NewRef(torch_names[dt]);
    t->v[TI_CONJ] = Py_NewRef(r->conj ? Py_True : Py_False);
    t->v[TI_NEG] = Py_NewRef(r->neg ? Py_True : Py_False);
    t->item = d ? (int64_t)PyDataType_ELSIZE(d)
                : later ? (int64_t)dtypes_table[adt].np_itemsize : (int64_t)dtypes_table[dt].itemsize;
    t->offset = r->offset;
    t->nd = r->nd;
    t->compact = 1;
    memcpy(t->dims, r->size, (size_t)r->nd * sizeof(int64_t));
    memcpy(t->dims + r->nd, r->stride, (size_t)r->nd * sizeof(int64_t));
    return (PyObject *)t;
}

/* ---- records and storages --------------------------------------------------------- */

/* info_type(*values) for a tuple subclass (a namedtuple), filled here. Steals the values. */
static PyObject *tuple_of(PyTypeObject *tp, PyObject **v, Py_ssize_t n) {
    PyObject *t = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (v[i] == NULL) goto fail;
    t = tp->tp_alloc(tp, n);
    if (t == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(t, i, v[i]);
    return t;
fail:
    for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(v[i]);
    return NULL;
}

static int check_tuple_type(PyObject *tp) {
    if (!PyType_Check(tp) || !PyType_IsSubtype((PyTypeObject *)tp, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "expected a tuple subclass");
        return -1;
    }
    return 0;
}

/* storage_infos(storages, record_prefix, type): [type(key, dtype, nbytes, location, prefix + key)] */
PyObject *mod_storage_infos(PyObject *module, PyObject *args) {
    PyObject *list, *prefix, *tp;
    if (!PyArg_ParseTuple(args, "O!UO:storage_infos", &PyList_Type, &list, &prefix, &tp) || check_tuple_type(tp) < 0)
        return NULL;
    ModuleState *st = PyModule_GetState(module);
    Py_ssize_t n = PyList_GET_SIZE(list);
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PyList_GET_ITEM(list, i);
        if (Py_TYPE(o) != st->StorageType) {
            PyErr_SetString(PyExc_TypeError, "expected torchfree.Storage objects");
            Py_DECREF(out);
            return NULL;
        }
        StorageObject *s = (StorageObject *)o;
        int dt = s->dtype;
        PyObject *d = tf_dtype_of(st, dt);
        if (d == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyObject *v[5] = {Py_NewRef(s->key), Py_NewRef(d),
                          PyLong_FromSsize_t(s->nbytes), Py_NewRef(s->location), PyUnicode_Concat(prefix, s->key)};
        PyObject *t = tuple_of((PyTypeObject *)tp, v, 5);
        if (t == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, t);
    }
    return out;
}

/* The zip directory, packed (Archive.record_table) so that scan() can list the records
 * after the archive is closed, and only if asked: per entry 4 little u64 (method, compressed
 * size, size, offset), a u64 name length, the name. */
PyObject *records_pack(const ZipReader *z) {
    size_t total = 0;
    for (size_t i = 0; i < z->n_entries; i++) total += 40 + z->entries[i].name_len;
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (b == NULL) return NULL;
    char *d = PyBytes_AS_STRING(b);
    for (size_t i = 0; i < z->n_entries; i++) {
        const ZipEntry *e = &z->entries[i];
        uint64_t h[5] = {e->method, e->csize, e->usize, e->header_offset - z->base, e->name_len};
        memcpy(d, h, sizeof h);
        memcpy(d + sizeof h, e->name, e->name_len);
        d += sizeof h + e->name_len;
    }
    return b;
}

/* record_infos(packed, type): [type(name, compressed, compressed_size, size, offset)] */
PyObject *mod_record_infos(PyObject *module, PyObject *args) {
    Py_buffer b;
    PyObject *tp;
    if (!PyArg_ParseTuple(args, "y*O:record_infos", &b, &tp)) return NULL;
    PyObject *out = check_tuple_type(tp) < 0 ? NULL : PyList_New(0);
    const char *p = b.buf, *end = p + b.len;
    while (out != NULL && p < end) {
        uint64_t h[5];
        if ((size_t)(end - p) < sizeof h) goto bad;
        memcpy(h, p, sizeof h);
        p += sizeof h;
        if (h[4] > (uint64_t)(end - p)) goto bad;
        PyObject *v[5] = {PyUnicode_DecodeUTF8(p, (Py_ssize_t)h[4], "replace"), PyBool_FromLong(h[0] != 0),
                          PyLong_FromUnsignedLongLong(h[1]), PyLong_FromUnsignedLongLong(h[2]),
                          PyLong_FromUnsignedLongLong(h[3])};
        p += h[4];
        PyObject *t = tuple_of((PyTypeObject *)tp, v, 5);
        if (t == NULL || PyList_Append(out, t) < 0) Py_CLEAR(out);
        Py_XDECREF(t);
    }
    PyBuffer_Release(&b);
    return out;
bad:
    PyBuffer_Release(&b);
    Py_DECREF(out);
    PyErr_SetString(PyExc_ValueError, "record_infos: not a packed record table");
    return NULL;
}

/* ---- the table of CheckpointInfo.__str__ ------------------------------------------- */

enum { TC_NAME, TC_DTYPE, TC_SHAPE, TC_STORAGE, TC_OFFSET, TC_SIZE, TC_LOCATION, TC_N };
static const char *const tc_head[TC_N] = {"name", "dtype", "shape", "storage", "offset", "size", "location"};
static const int tc_left[TC_N] = {1, 1, 0, 1, 0, 0, 1};

/* _scan._human(n) for 0 <= n < 2**53: "512 B", "1.5 KiB", ... "3.0 TiB" (%.1f rounds the exact
 * binary value half to even, as Python's format does; n / 1024**k is exact in a double) */
static int human_bytes(char *buf, size_t cap, int64_t n) {
    static const char *const units[] = {"KiB", "MiB", "GiB", "TiB"};
    if (n < 1024) return snprintf(buf, cap, "%lld B", (long long)n);
    double x = (double)n / 1024.0;
    int u = 0;
    while (x >= 1024.0 && u < 3) {
        x /= 1024.0;
        u++;
    }
    return snprintf(buf, cap, "%.1f %s", x, units[u]);
}

#define TC_CELL 1400 /* 64 dims of 20 digits and an 'x' each */

/* n in decimal at d (n >= 0, as sizes and offsets of a TensorRef are); its length */
static int put_dec(char *d, int64_t n) {
    char tmp[20];
    int k = 0;
    do {
        tmp[k++] = (char)('0' + n % 10);
        n /= 10;
    } while (n);
    for (int i = 0; i < k; i++) d[i] = tmp[k - 1 - i];
    return k;
}

/* human_bytes of the sizes met so far: a table's tensors have few distinct sizes */
typedef struct {
    int64_t n[256];
    char text[256][24];
    int len[256];
} HumanCache;

/* The text of a computed column (shape, offset, size) of a TensorInfo made from a TensorRef, in
 * buf; its length, or -1 when its size is not exact in a double (the Python table makes it). */
static int tc_computed(const TensorInfoObject *t, int col, char *buf, HumanCache *hc) {
    if (col == TC_OFFSET) return t->offset < 0 ? -1 : put_dec(buf, t->offset);
    if (col == TC_SHAPE) {
        if (t->nd == 0) return (int)(memcpy(buf, "()", 2), 2);
        if (t->nd > 64) return -1; /* more than TC_CELL holds (loads allow numpy's 64) */
        int len = 0;
        for (int i = 0; i < t->nd; i++) {
            if (t->dims[i] < 0) return -1;
            if (i) buf[len++] = 'x';
            len += put_dec(buf + len, t->dims[i]);
        }
        return len;
    }
    int64_t n = t->item;
    for (int i = 0; i < t->nd; i++)
        if (__builtin_mul_overflow(n, t->dims[i], &n)) return -1;
    if (n < 0 || n >= ((int64_t)1 << 53)) return -1;
    unsigned h = (unsigned)(((uint64_t)n * 0x9E3779B97F4A7C15ull) >> 56);
    if (hc->n[h] != n) {
        hc->len[h] = human_bytes(hc->text[h], sizeof hc->text[h], n);
        hc->n[h] = n;
    }
    memcpy(buf, hc->text[h], (size_t)hc->len[h]);
    return hc->len[h];
}

/* The str cell of a column (borrowed), or NULL when it is not an ASCII str. */
static PyObject *tc_text(const TensorInfoObject *t, int col, PyObject *root, PyObject *dash) {
    PyObject *x = col == TC_NAME ? t->v[TI_NAME] : col == TC_DTYPE ? t->v[TI_TORCH_DTYPE]
                  : col == TC_STORAGE ? (t->v[TI_KEY] ? t->v[TI_KEY] : ((StorageObject *)t->storage)->key)
                                      : t->v[TI_LOCATION];
    if (col == TC_STORAGE && x == Py_None) return dash;
    if (x == NULL || !PyUnicode_CheckExact(x) || !PyUnicode_IS_ASCII(x)) return NULL;
    if (col == TC_NAME && PyUnicode_GET_LENGTH(x) == 0) return root;
    return x;
}

static int tc_ws(char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= '\x1c' && c <= '\x1f'); }

/* info_table(tensors): the rows of CheckpointInfo's table (header, dashes, a row per tensor,
 * each stripped of trailing whitespace, joined by newlines), or None when a tensor is not one
 * scan made from a TensorRef or a cell is not ASCII: _scan makes those tables itself. The first
 * pass finds the column widths, the second writes; computed cells are formatted in both (cheaper
 * than keeping 3 strings per tensor). */
PyObject *mod_info_table(PyObject *module, PyObject *list) {
    ModuleState *st = PyModule_GetState(module);
    if (!PyList_Check(list)) Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(list), width[TC_N];
    PyObject *root = PyUnicode_FromString("<root>"), *dash = PyUnicode_FromString("-");
    char cell[TC_CELL];
    PyObject *out = NULL;
    char *buf = NULL;
    HumanCache *hc = PyMem_Malloc(sizeof *hc);
    if (root == NULL || dash == NULL || hc == NULL) goto done;
    for (int i = 0; i < 256; i++) hc->n[i] = -1;
    for (int c = 0; c < TC_N; c++) width[c] = (Py_ssize_t)strlen(tc_head[c]);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PyList_GET_ITEM(list, i);
        if (!PyObject_TypeCheck(o, st->TensorInfoType) || !((TensorInfoObject *)o)->compact) {
            out = Py_NewRef(Py_None);
            goto done;
        }
        const TensorInfoObject *t = (const TensorInfoObject *)o;
        for (int c = 0; c < TC_N; c++) {
            Py_ssize_t len;
            if (c == TC_SHAPE || c == TC_OFFSET || c == TC_SIZE) {
                len = tc_computed(t, c, cell, hc);
            } else {
                PyObject *x = tc_text(t, c, root, dash);
                len = x ? PyUnicode_GET_LENGTH(x) : -1;
            }
            if (len < 0) {
                out = Py_NewRef(Py_None);
                goto done;
            }
            if (len > width[c]) width[c] = len;
        }
    }
    Py_ssize_t line = 2 * (TC_N - 1) + 1; /* separators and the newline */
    for (int c = 0; c < TC_N; c++) line += width[c];
    if (n + 2 > PY_SSIZE_T_MAX / line) {
        PyErr_NoMemory();
        goto done;
    }
    buf = PyMem_Malloc((size_t)(line * (n + 2)));
    if (buf == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    char *d = buf;
    for (Py_ssize_t i = -2; i < n; i++) {
        const TensorInfoObject *t = i >= 0 ? (const TensorInfoObject *)PyList_GET_ITEM(list, i) : NULL;
        char *row = d;
        for (int c = 0; c < TC_N; c++) {
            const char *s;
            Py_ssize_t len;
            if (c) {
                memcpy(d, "  ", 2);
                d += 2;
            }
            if (i == -1) {
                memset(d, '-', (size_t)width[c]);
                d += width[c];
                continue;
            }
            if (i == -2) {
                s = tc_head[c];
                len = (Py_ssize_t)strlen(s);
            } else if (c == TC_SHAPE || c == TC_OFFSET || c == TC_SIZE) {
                len = tc_computed(t, c, cell, hc);
                s = cell;
            } else {
                PyObject *x = tc_text(t, c, root, dash);
                s = (const char *)PyUnicode_DATA(x);
                len = PyUnicode_GET_LENGTH(x);
            }
            Py_ssize_t pad = width[c] - len;
            if (!tc_left[c]) {
                memset(d, ' ', (size_t)pad);
                d += pad;
            }
            memcpy(d, s, (size_t)len);
            d += len;
            if (tc_left[c]) {
                memset(d, ' ', (size_t)pad);
                d += pad;
            }
        }
        while (d > row && tc_ws(d[-1])) d--;
        *d++ = '\n';
    }
    out = PyUnicode_DecodeASCII(buf, d - buf - 1, NULL);
done:
    if (hc == NULL && out == NULL && !PyErr_Occurred()) PyErr_NoMemory();
    PyMem_Free(hc);
    PyMem_Free(buf);
    Py_XDECREF(root);
    Py_XDECREF(dash);
    return out;
}
