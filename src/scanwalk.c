/* scanwalk.c - walk(): the dotted names of every tensor in the object a pickle gave, for scan(),
 * open() and flatten(), in the order of a depth-first walk (dict order, list order; an Opaque's
 * children come from a Python callback, _scan._children). A container met twice (shared, or a
 * cycle) is walked once; a tensor met twice is reported under each name. The walk keeps its own
 * stack (no C recursion), and stops with LimitError at a nesting depth past the loader's `marks`
 * limit, or when the names it builds (every tensor's and container's, which is also the memory
 * they can take) pass WALK_NAME_CHARS in all. TensorRefs become TensorInfos (scaninfo.c). */
#include "rebuild.h"
#include "scaninfo.h"

/* chars of all names one walk builds (a name per tensor and container): 256 Mi, far above a
 * million tensors with 100-character names; a pickle of long keys nested deep is refused */
#define WALK_NAME_CHARS ((Py_ssize_t)1 << 28)

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
    return tensorinfo_from_ref(w->st, (PyTypeObject *)w->info_type, name, r, w->torch_names);
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

