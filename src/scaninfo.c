/* scaninfo.c - the per-tensor work of scan(), open() and flatten() in C.
 *
 * walk(): the dotted names of every tensor in the object a pickle gave, in
 * the order of a depth-first walk (dict order, list order; an Opaque's
 * children come from a Python callback, _scan._children). A container met
 * twice (shared, or a cycle) is walked once; a tensor met twice is reported
 * under each name. The walk keeps its own stack (no C recursion), and stops
 * with LimitError at a nesting depth past the loader's `marks` limit, or when
 * the names it builds (every tensor's and container's, which is also the
 * memory they can take) pass WALK_NAME_CHARS in all.
 *
 * TensorInfo: what scan() reports of one tensor. Made from a TensorRef it
 * copies the few numbers it needs and builds its shape and stride tuples on
 * first access; made from Python (TensorInfo(name, dtype, ...)) it holds the
 * values given. torchfree.TensorInfo (_scan.py) subclasses it. */
#include "rebuild.h"
#include "scaninfo.h"

/* chars of all names one walk builds (a name per tensor and container): 256 Mi, far above a
 * million tensors with 100-character names; a pickle of long keys nested deep is refused */
#define WALK_NAME_CHARS ((Py_ssize_t)1 << 28)

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

/* ---- walk ------------------------------------------------------------------------ */

/* A set of object addresses (the containers already walked): open addressing. */
typedef struct {
    uintptr_t *slot;
    size_t cap, n;
} PtrSet;

static size_t ptr_hash(uintptr_t p) {
    uint64_t x = (uint64_t)p >> 4;
    x *= UINT64_C(0x9E3779B97F4A7C15);
    return (size_t)(x ^ (x >> 29));
}

/* 1 added, 0 already there, -1 no memory */
static int ptrset_add(PtrSet *s, const void *obj) {
    uintptr_t p = (uintptr_t)obj;
    if (2 * (s->n + 1) > s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 64;
        uintptr_t *ns = PyMem_Calloc(cap, sizeof(uintptr_t));
        if (ns == NULL) return -1;
        for (size_t i = 0; i < s->cap; i++) {
            uintptr_t q = s->slot[i];
            if (q == 0) continue;
            size_t j = ptr_hash(q) & (cap - 1);
            while (ns[j] != 0) j = (j + 1) & (cap - 1);
            ns[j] = q;
        }
        PyMem_Free(s->slot);
        s->slot = ns;
        s->cap = cap;
    }
    size_t j = ptr_hash(p) & (s->cap - 1);
    while (s->slot[j] != 0) {
        if (s->slot[j] == p) return 0;
        j = (j + 1) & (s->cap - 1);
    }
    s->slot[j] = p;
    s->n++;
    return 1;
}

typedef struct {
    PyObject *obj;      /* owned */
    PyObject *parent;   /* name of the container it is in (owned); NULL for the root */
    PyObject *key;      /* its key as given (owned), or NULL: index */
    Py_ssize_t index;
    Py_ssize_t depth;
    Py_ssize_t plen;    /* find mode: length of the parent's name when it is where the target's
                         * path runs through (target starts with it and a separator, or it is
                         * ""), else -1 */
} WalkItem;

/* PAIRS: [(name, leaf)]; INDEX: {name: leaf}; INFOS: [TensorInfo]; FIND: the leaf named
 * target (the last one so named, as INDEX would keep), building no name */
enum { WALK_PAIRS = 0, WALK_INDEX = 1, WALK_INFOS = 2, WALK_FIND = 3 };

typedef struct {
    ModuleState *st;
    int mode;
    int refs;           /* TensorRefs are tensors (lazy archives) */
    PyObject *sep;
    PyObject *children; /* callable: Opaque -> [(str, child)] or None */
    PyObject *info_type;
    PyObject *other;    /* callable (name, leaf) -> TensorInfo for arrays and MetaArrays */
    Py_ssize_t max_depth;
    PyObject *out;      /* list or dict */
    PyObject *keep;     /* list: what the children callback returned */
    PyObject *torch_names[DT_COUNT];
    WalkItem *stack;
    Py_ssize_t sp, cap;
    PtrSet seen;
    Py_ssize_t name_chars;
    PyObject *target;   /* find mode: the name looked for */
    PyObject *found;    /* borrowed from the walked object (kept alive by it) */
} Walk;

static int walk_push(Walk *w, PyObject *obj, PyObject *parent, PyObject *key, Py_ssize_t index, Py_ssize_t depth,
                     Py_ssize_t plen) {
    if (w->sp == w->cap) {
        Py_ssize_t cap = w->cap ? 2 * w->cap : 64;
        WalkItem *ns = PyMem_Realloc(w->stack, (size_t)cap * sizeof(WalkItem));
        if (ns == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        w->stack = ns;
        w->cap = cap;
    }
    WalkItem *it = &w->stack[w->sp++];
    it->obj = Py_NewRef(obj);
    it->parent = Py_XNewRef(parent);
    it->key = Py_XNewRef(key);
    it->index = index;
    it->depth = depth;
    it->plen = plen;
    return 0;
}

static void item_clear(WalkItem *it) {
    Py_DECREF(it->obj);
    Py_XDECREF(it->parent);
    Py_XDECREF(it->key);
}

/* An item's key as a str (new reference). */
static PyObject *item_key(WalkItem *it) {
    if (it->key == NULL) return PyUnicode_FromFormat("%zd", it->index);
    if (PyUnicode_CheckExact(it->key)) return Py_NewRef(it->key);
    return PyObject_Str(it->key);
}

/* The dotted name of an item (new reference). */
static PyObject *item_name(Walk *w, WalkItem *it) {
    PyObject *k = item_key(it);
    if (k == NULL || it->parent == NULL || PyUnicode_GET_LENGTH(it->parent) == 0) return k;
    Py_ssize_t n = PyUnicode_GET_LENGTH(it->parent) + PyUnicode_GET_LENGTH(w->sep) + PyUnicode_GET_LENGTH(k);
    if (w->name_chars + n > WALK_NAME_CHARS) {
        Py_DECREF(k);
        PyErr_Format(w->st->LimitError, "the names of the tensors under '%.200U' exceed %zd characters in all",
                     it->parent, WALK_NAME_CHARS);
        return NULL;
    }
    w->name_chars += n;
    PyObject *parts[3] = {it->parent, w->sep, k};
    PyObject *name;
    if (PyUnicode_IS_ASCII(it->parent) && PyUnicode_IS_ASCII(w->sep) && PyUnicode_IS_ASCII(k)) {
        name = PyUnicode_New(n, 127);
        if (name != NULL) {
            char *d = (char *)PyUnicode_DATA(name);
            for (int j = 0; j < 3; j++) {
                memcpy(d, PyUnicode_DATA(parts[j]), (size_t)PyUnicode_GET_LENGTH(parts[j]));
                d += PyUnicode_GET_LENGTH(parts[j]);
            }
        }
    } else {
        PyObject *a = PyUnicode_Concat(it->parent, w->sep);
        name = a ? PyUnicode_Concat(a, k) : NULL;
        Py_XDECREF(a);
    }
    Py_DECREF(k);
    return name;
}

static PyObject *ref_info(Walk *w, PyObject *name, TensorRef *r) {
    ModuleState *st = w->st;
    StorageObject *s = (StorageObject *)r->storage;
    int dt = r->dtype, adt = dt == DT_COMPLEX32 ? DT_COMPLEX64 : dt;
    /* allocated untracked: it holds strings, a dtype and ints, never part of a cycle, so the
     * collector need not look at it (as CPython does for tuples of atoms) */
    TensorInfoObject *t = PyObject_GC_NewVar(TensorInfoObject, (PyTypeObject *)w->info_type, 2 * (Py_ssize_t)r->nd);
    if (t == NULL) return NULL;
    memset(t->v, 0, sizeof t->v);
    if (w->torch_names[dt] == NULL && (w->torch_names[dt] = PyUnicode_FromString(dtypes_table[dt].name)) == NULL) {
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
    t->v[TI_TORCH_DTYPE] = Py_NewRef(w->torch_names[dt]);
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

static int walk_leaf(Walk *w, PyObject *name, PyObject *leaf) {
    if (w->mode == WALK_INDEX) return PyDict_SetItem(w->out, name, leaf);
    PyObject *x;
    if (w->mode == WALK_PAIRS)
        x = PyTuple_Pack(2, name, leaf);
    else if (Py_TYPE(leaf) == w->st->TensorRefType)
        x = ref_info(w, name, (TensorRef *)leaf);
    else
        x = PyObject_CallFunctionObjArgs(w->other, name, leaf, NULL);
    if (x == NULL) return -1;
    int r = PyList_Append(w->out, x);
    Py_DECREF(x);
    return r;
}

enum { K_ERROR = -1, K_SKIP, K_LEAF, K_DICT, K_SEQ, K_OPAQUE };

static int kind_of(Walk *w, PyObject *o) {
    PyTypeObject *tp = Py_TYPE(o);
    ModuleState *st = w->st;
    if (tp == &PyDict_Type) return PyDict_GET_SIZE(o) ? K_DICT : K_SKIP;
    if (tp == st->TensorRefType) return w->refs ? K_LEAF : K_SKIP;
    if (tp == &PyList_Type || tp == &PyTuple_Type) return PySequence_Fast_GET_SIZE(o) ? K_SEQ : K_SKIP;
    if (tp == &PyUnicode_Type || tp == &PyLong_Type || tp == &PyFloat_Type || o == Py_None || tp == &PyBool_Type)
        return K_SKIP;
    if (PyDict_Check(o)) return PyDict_GET_SIZE(o) ? K_DICT : K_SKIP; /* OrderedDict: before numpy's check */
    int arr = tf_is_ndarray(st, o, 0);
    if (arr < 0) return K_ERROR;
    if (arr || PyObject_TypeCheck(o, (PyTypeObject *)st->MetaArrayType)) return K_LEAF;
    if (PyList_Check(o) || PyTuple_Check(o)) return PySequence_Fast_GET_SIZE(o) ? K_SEQ : K_SKIP;
    /* quantized and sparse tensors are tensors: one leaf each (their parts are not listed apart) */
    if ((st->QuantizedArrayType != NULL && PyObject_TypeCheck(o, (PyTypeObject *)st->QuantizedArrayType)) ||
        (st->SparseArrayType != NULL && PyObject_TypeCheck(o, (PyTypeObject *)st->SparseArrayType)))
        return K_LEAF;
    if (PyObject_TypeCheck(o, (PyTypeObject *)st->OpaqueType)) return K_OPAQUE;
    return K_SKIP;
}

static int walk_container(Walk *w, WalkItem *it, PyObject *name, Py_ssize_t plen, int kind) {
    PyObject *o = it->obj;
    Py_ssize_t depth = it->depth + 1;
    if (depth > w->max_depth) {
        if (name != NULL)
            PyErr_Format(w->st->LimitError, "containers nested deeper than %zd levels (at '%.200U')", w->max_depth,
                         name);
        else
            PyErr_Format(w->st->LimitError, "containers nested deeper than %zd levels", w->max_depth);
        return -1;
    }
    if (kind == K_SEQ) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
        PyObject **items = PySequence_Fast_ITEMS(o);
        for (Py_ssize_t i = n - 1; i >= 0; i--)
            if (walk_push(w, items[i], name, NULL, i, depth, plen) < 0) return -1;
        return 0;
    }
    if (kind == K_DICT && PyDict_CheckExact(o)) {
        /* pushed in order, then the pushed run reversed: popped in dict order */
        Py_ssize_t pos = 0, sp0 = w->sp;
        PyObject *k, *v;
        while (PyDict_Next(o, &pos, &k, &v))
            if (walk_push(w, v, name, k, 0, depth, plen) < 0) return -1;
        for (Py_ssize_t a = sp0, b = w->sp - 1; a < b; a++, b--) {
            WalkItem t = w->stack[a];
            w->stack[a] = w->stack[b];
            w->stack[b] = t;
        }
        return 0;
    }
    PyObject *kids;
    if (kind == K_DICT)
        kids = PyMapping_Items(o); /* OrderedDict and other subclasses: their own order */
    else
        kids = PyObject_CallOneArg(w->children, o);
    if (kids == NULL) return -1;
    if (kids == Py_None) {
        Py_DECREF(kids);
        return 0;
    }
    if (!PyList_CheckExact(kids)) {
        Py_DECREF(kids);
        PyErr_SetString(PyExc_TypeError, "children() must return a list of (name, child) pairs");
        return -1;
    }
    int r = 0;
    for (Py_ssize_t i = PyList_GET_SIZE(kids) - 1; i >= 0 && r == 0; i--) {
        PyObject *kv = PyList_GET_ITEM(kids, i);
        if (!PyTuple_CheckExact(kv) || PyTuple_GET_SIZE(kv) != 2) {
            PyErr_SetString(PyExc_TypeError, "children() must return a list of (name, child) pairs");
            r = -1;
            break;
        }
        r = walk_push(w, PyTuple_GET_ITEM(kv, 1), name, PyTuple_GET_ITEM(kv, 0), 0, depth, plen);
    }
    /* Opaque children may be made by the callback (and a mapping's items() by its class): kept
     * until the walk ends, so that no address in `seen` is reused */
    if (r == 0) r = PyList_Append(w->keep, kids);
    Py_DECREF(kids);
    return r;
}

/* Find mode: whether the item lies on the target's path. Sets *len to the length of its name
 * when it does (the name is then target[:len]), -1 when not. */
static int find_step(Walk *w, WalkItem *it, Py_ssize_t *len) {
    *len = -1;
    if (it->plen < 0) return 0;
    if (PyUnicode_IS_ASCII(w->target)) {
        /* the common keys compared in place, making no str: ASCII str keys, ints, list indices */
        Py_ssize_t o = it->plen == 0 ? 0 : it->plen + PyUnicode_GET_LENGTH(w->sep);
        Py_ssize_t tl = PyUnicode_GET_LENGTH(w->target);
        const char *t = (const char *)PyUnicode_1BYTE_DATA(w->target);
        char buf[32];
        const char *kd = NULL;
        Py_ssize_t kn = -1;
        if (it->key == NULL) {
            kn = snprintf(buf, sizeof buf, "%zd", it->index);
            kd = buf;
        } else if (PyUnicode_CheckExact(it->key)) {
            if (!PyUnicode_IS_ASCII(it->key)) return 0; /* cannot be part of an ASCII name */
            kd = (const char *)PyUnicode_1BYTE_DATA(it->key);
            kn = PyUnicode_GET_LENGTH(it->key);
        } else if (PyLong_CheckExact(it->key)) {
            int overflow = 0;
            long long v = PyLong_AsLongLongAndOverflow(it->key, &overflow);
            if (v == -1 && PyErr_Occurred()) return -1;
            if (!overflow) { /* a bigger int goes the general way */
                kn = snprintf(buf, sizeof buf, "%lld", v);
                kd = buf;
            }
        }
        if (kd != NULL) {
            if (o + kn <= tl && memcmp(t + o, kd, (size_t)kn) == 0) *len = o + kn;
            return 0;
        }
    }
    PyObject *k = item_key(it);
    if (k == NULL) return -1;
    Py_ssize_t o = it->plen == 0 ? 0 : it->plen + PyUnicode_GET_LENGTH(w->sep);
    Py_ssize_t end = o + PyUnicode_GET_LENGTH(k), tl = PyUnicode_GET_LENGTH(w->target);
    if (end <= tl) {
        Py_ssize_t m = PyUnicode_Tailmatch(w->target, k, o, end, -1);
        if (m < 0) {
            Py_DECREF(k);
            return -1;
        }
        if (m) *len = end;
    }
    Py_DECREF(k);
    return 0;
}

/* Find mode: the plen its children get (a container named target[:len]). */
static Py_ssize_t find_children_plen(Walk *w, Py_ssize_t len) {
    Py_ssize_t tl = PyUnicode_GET_LENGTH(w->target);
    if (len < 0) return -1;
    if (len == 0) return 0;
    if (len >= tl) return -1;
    return PyUnicode_Tailmatch(w->target, w->sep, len, tl, -1) == 1 ? len : -1;
}

static int walk_run(Walk *w, PyObject *root, PyObject *prefix) {
    if (walk_push(w, root, NULL, prefix, 0, 0, 0) < 0) return -1;
    while (w->sp > 0) {
        WalkItem it = w->stack[--w->sp];
        int kind = kind_of(w, it.obj), r = kind == K_ERROR ? -1 : 0;
        if (kind > K_SKIP) {
            int fresh = kind == K_LEAF ? 1 : ptrset_add(&w->seen, it.obj);
            if (fresh < 0) {
                PyErr_NoMemory();
                r = -1;
            } else if (fresh && w->mode == WALK_FIND) {
                Py_ssize_t len;
                r = find_step(w, &it, &len);
                if (r == 0 && kind == K_LEAF && len >= 0 && len == PyUnicode_GET_LENGTH(w->target))
                    w->found = it.obj;
                else if (r == 0 && kind != K_LEAF)
                    r = walk_container(w, &it, NULL, find_children_plen(w, len), kind);
            } else if (fresh) {
                PyObject *name = item_name(w, &it);
                if (name == NULL)
                    r = -1;
                else
                    r = kind == K_LEAF ? walk_leaf(w, name, it.obj) : walk_container(w, &it, name, -1, kind);
                Py_XDECREF(name);
            }
        }
        item_clear(&it);
        if (r < 0) return -1;
    }
    return 0;
}

static void walk_free(Walk *w) {
    while (w->sp > 0) item_clear(&w->stack[--w->sp]);
    PyMem_Free(w->stack);
    PyMem_Free(w->seen.slot);
    Py_XDECREF(w->keep);
    for (int i = 0; i < DT_COUNT; i++) Py_XDECREF(w->torch_names[i]);
}

PyObject *mod_walk(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"obj", "mode", "sep", "children", "refs", "info_type", "other", "max_depth", "target",
                             NULL};
    Walk w;
    memset(&w, 0, sizeof w);
    PyObject *obj, *info_type = NULL, *other = NULL;
    Py_ssize_t max_depth = (Py_ssize_t)TF_LIMIT_MARKS;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiUO|pOOnU:walk", kwlist, &obj, &w.mode, &w.sep, &w.children,
                                     &w.refs, &info_type, &other, &max_depth, &w.target))
        return NULL;
    w.st = PyModule_GetState(module);
    w.max_depth = max_depth;
    if (w.st->OpaqueType == NULL || w.st->MetaArrayType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "torchfree helpers are not registered");
        return NULL;
    }
    if (w.mode == WALK_INFOS) {
        if (info_type == NULL || !PyType_Check(info_type) ||
            !PyType_IsSubtype((PyTypeObject *)info_type, w.st->TensorInfoType) || other == NULL) {
            PyErr_SetString(PyExc_TypeError, "walk(mode=2) needs a TensorInfo subclass and other");
            return NULL;
        }
        w.info_type = info_type;
        w.other = other;
    } else if (w.mode == WALK_FIND && w.target == NULL) {
        PyErr_SetString(PyExc_TypeError, "walk(mode=3) needs a target");
        return NULL;
    } else if (w.mode != WALK_PAIRS && w.mode != WALK_INDEX && w.mode != WALK_FIND) {
        PyErr_SetString(PyExc_ValueError, "walk: unknown mode");
        return NULL;
    }
    w.out = w.mode == WALK_INDEX ? PyDict_New() : PyList_New(0);
    w.keep = PyList_New(0);
    PyObject *prefix = PyUnicode_FromStringAndSize("", 0);
    /* the walk makes no cycles: no collection pass over what it builds */
    int gc_was_enabled = PyGC_Disable();
    int r = w.out && w.keep && prefix ? walk_run(&w, obj, prefix) : -1;
    if (gc_was_enabled) PyGC_Enable();
    Py_XDECREF(prefix);
    walk_free(&w);
    if (r < 0) Py_CLEAR(w.out);
    if (r == 0 && w.mode == WALK_FIND) {
        Py_SETREF(w.out, Py_XNewRef(w.found));
        if (w.out == NULL) PyErr_SetObject(PyExc_KeyError, w.target);
    }
    return w.out;
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
