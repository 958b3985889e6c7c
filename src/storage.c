/* storage.c - persistent ids, storage records and the Storage type.
 *
 * A zip persistent id ('storage', <type>, key, location, numel) names the
 * record data/<key>. Each record is materialised once: a slice of the
 * mapping (zero-copy), a fresh buffer filled by pread (deferred: read in
 * batches on a thread of their own while unpickling goes on, the rest in
 * parallel at the end, without the GIL; see "read batches" below), or a
 * fresh buffer inflated from a deflated record. map_location decides the
 * target tag; "meta" reads nothing. */
#include "pagedrop.h"
#include "rebuild.h"
#include "platform.h"

#include <errno.h>
#include <pthread.h>
#include <unistd.h>

/* ---- GlobalRef ------------------------------------------------------------ */

static void GlobalRef_dealloc(GlobalRef *self) {
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(self->canon);
    Py_XDECREF(self->obj);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *GlobalRef_repr(GlobalRef *self) {
    return PyUnicode_FromFormat("<torchfree global %U>", self->canon);
}

static PyType_Slot GlobalRef_slots[] = {
    {Py_tp_dealloc, GlobalRef_dealloc},
    {Py_tp_repr, GlobalRef_repr},
    {Py_tp_doc, "A GLOBAL of a checkpoint, resolved to torchfree's own code (never imported)."},
    {0, NULL},
};

PyType_Spec GlobalRefSpec = {
    .name = "torchfree._core.GlobalRef",
    .basicsize = sizeof(GlobalRef),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = GlobalRef_slots,
};

/* ---- Storage -------------------------------------------------------------- */

/* Not tracked by the cyclic GC: a Storage refers only to buffer owners
 * (memoryviews, ndarrays, the user's buffers), which never refer back, and a
 * checkpoint can hold hundreds of thousands of them. */
static void Storage_dealloc(StorageObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    if (self->has_view) PyBuffer_Release(&self->view);
    Py_XDECREF(self->key);
    Py_XDECREF(self->location);
    Py_XDECREF(self->owner);
    Py_XDECREF(self->upcast);
    Py_XDECREF(self->saved);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* A storage of a lazy archive (torchfree.open) whose record is not read yet has no bytes to show
 * (a load's own storages whose reads are deferred have their buffer: it may be seen before). */
static int storage_unread(StorageObject *self, PyObject *exc) {
    if (!self->unread && (self->data != NULL || self->nbytes == 0)) return 0;
    PyErr_Format(exc, "storage %R is not read yet: Checkpoint.read_storage(storage) reads it (as does "
                      "reading a tensor that views it)", self->key);
    return -1;
}

static int Storage_getbuffer(StorageObject *self, Py_buffer *view, int flags) {
    if (self->meta) {
        PyErr_SetString(PyExc_BufferError, "a meta storage has no bytes");
        return -1;
    }
    if (storage_unread(self, PyExc_BufferError) < 0) return -1;
    return PyBuffer_FillInfo(view, (PyObject *)self, self->data ? self->data : (char *)"",
                             self->nbytes, self->readonly, flags);
}

static PyObject *Storage_repr(StorageObject *self) {
    return PyUnicode_FromFormat("torchfree.Storage(key=%R, location=%R, nbytes=%zd, dtype=%s)",
                                self->key, self->location, self->nbytes,
                                dtypes_table[self->dtype].name);
}

static PyObject *Storage_numpy(StorageObject *self, PyObject *Py_UNUSED(ignored)) {
    ModuleState *st = tf_state_of_type(Py_TYPE(self));
    if (st == NULL || tf_numpy(st) < 0) return NULL;
    if (self->meta) {
        PyErr_SetString(PyExc_ValueError, "a meta storage has no bytes");
        return NULL;
    }
    if (storage_unread(self, PyExc_ValueError) < 0) return NULL;
    npy_intp dims[1] = {self->nbytes};
    PyObject *arr = PyArray_NewFromDescr(&PyArray_Type, PyArray_DescrFromType(NPY_UINT8), 1, dims,
                                         NULL, self->data, self->readonly ? 0 : NPY_ARRAY_WRITEABLE,
                                         NULL);
    if (arr == NULL) return NULL;
    if (PyArray_SetBaseObject((PyArrayObject *)arr, Py_NewRef(self)) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

static PyObject *Storage_get_dtype(StorageObject *self, void *closure) {
    ModuleState *st = tf_state_of_type(Py_TYPE(self));
    if (st == NULL) return NULL;
    PyObject *d = tf_dtype_of(st, self->dtype);
    return d ? Py_NewRef(d) : NULL;
}

static PyObject *Storage_get_nbytes(StorageObject *self, void *closure) {
    return PyLong_FromSsize_t(self->nbytes);
}

static PyObject *Storage_get_key(StorageObject *self, void *closure) { return Py_NewRef(self->key); }

static PyObject *Storage_get_location(StorageObject *self, void *closure) {
    return Py_NewRef(self->location);
}

static int Storage_set_location(StorageObject *self, PyObject *value, void *closure) {
    if (value == NULL || !PyUnicode_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "location must be a str");
        return -1;
    }
    Py_SETREF(self->location, Py_NewRef(value));
    return 0;
}

static PyObject *Storage_get_is_meta(StorageObject *self, void *closure) {
    return PyBool_FromLong(self->meta);
}

static PyGetSetDef Storage_getset[] = {
    {"key", (getter)Storage_get_key, NULL, "record key (the name after data/)", NULL},
    {"location", (getter)Storage_get_location, (setter)Storage_set_location,
     "location tag: the saved one, or the target after map_location", NULL},
    {"nbytes", (getter)Storage_get_nbytes, NULL, "size in bytes", NULL},
    {"dtype", (getter)Storage_get_dtype, NULL, "dtype of its first use", NULL},
    {"is_meta", (getter)Storage_get_is_meta, NULL, "True for storages mapped to 'meta' (no bytes)", NULL},
    {NULL},
};

static PyMethodDef Storage_methods[] = {
    {"numpy", (PyCFunction)Storage_numpy, METH_NOARGS,
     "numpy($self, /)\n--\n\nA 1-D uint8 array over the storage's bytes (no copy)."},
    {NULL},
};

static PyType_Slot Storage_slots[] = {
    {Py_tp_dealloc, Storage_dealloc},
    {Py_tp_repr, Storage_repr},
    {Py_tp_getset, Storage_getset},
    {Py_tp_methods, Storage_methods},
    {Py_bf_getbuffer, Storage_getbuffer},
    {Py_tp_doc, "The bytes of one storage record of a checkpoint (torchfree.Storage)."},
    {0, NULL},
};

PyType_Spec StorageSpec = {
    .name = "torchfree.Storage",
    .basicsize = sizeof(StorageObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Storage_slots,
};

/* A fresh Storage of L (NULL: made outside a load), no data yet. New reference. */
static StorageObject *storage_alloc(ModuleState *st, Loader *L, PyObject *key, PyObject *location,
                                    Py_ssize_t nbytes, int dtype) {
    StorageObject *s = PyObject_New(StorageObject, st->StorageType);
    if (s == NULL) return NULL;
    s->key = Py_NewRef(key);
    s->location = Py_NewRef(location);
    s->nbytes = nbytes;
    s->dtype = dtype;
    s->data = NULL;
    s->owner = NULL;
    s->has_view = 0;
    s->readonly = 0;
    s->meta = 0;
    s->swap_unit = 0;
    s->swapped = 0;
    s->pending = 0;
    s->rec.entry = NULL;
    s->loader = L;
    s->upcast = NULL;
    s->unread = 0;
    s->hooked = 1;
    s->write_location = 0;
    s->saved = NULL;
    return s;
}

StorageObject *storage_new(Loader *L, PyObject *key, PyObject *location, Py_ssize_t nbytes, int dtype) {
    return storage_alloc(L->st, L, key, location, nbytes, dtype);
}

/* storage_over(buffer, dtype_id, location=None, /): a Storage over the bytes of any buffer
 * (held exported while it lives), key "", tagged "cpu" or `location` (which the writer then
 * writes: a device tensor's tag). torchfree.torch.save gives each torch storage's bytes to the
 * writer so: the writer writes a Storage whole, as torch writes a storage (internal). */
PyObject *mod_storage_over(PyObject *module, PyObject *args) {
    PyObject *buf, *location = Py_None;
    int dtype;
    if (!PyArg_ParseTuple(args, "Oi|O:storage_over", &buf, &dtype, &location)) return NULL;
    if (location != Py_None && !PyUnicode_Check(location)) {
        PyErr_SetString(PyExc_TypeError, "storage_over: location must be a str or None");
        return NULL;
    }
    if (dtype < 0 || dtype >= DT_COUNT || (dtypes_table[dtype].flags & (DTF_QUANTIZED | DTF_NO_TENSOR))) {
        PyErr_Format(PyExc_ValueError, "storage_over: bad dtype id %d", dtype);
        return NULL;
    }
    ModuleState *st = PyModule_GetState(module);
    Py_buffer view;
    if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0) return NULL;
    if (view.len % dtypes_table[dtype].itemsize != 0) {
        PyErr_Format(PyExc_ValueError, "storage_over: %zd bytes are not a whole number of %s elements", view.len,
                     dtypes_table[dtype].name);
        PyBuffer_Release(&view);
        return NULL;
    }
    int tagged = location != Py_None && PyUnicode_CompareWithASCIIString(location, "cpu") != 0;
    PyObject *key = PyUnicode_FromString("");
    PyObject *loc = key == NULL ? NULL : tagged ? Py_NewRef(location) : PyUnicode_InternFromString("cpu");
    StorageObject *s = loc ? storage_alloc(st, NULL, key, loc, view.len, dtype) : NULL;
    Py_XDECREF(key);
    Py_XDECREF(loc);
    if (s == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    s->write_location = tagged;
    s->data = view.buf;
    s->owner = Py_NewRef(buf);
    s->view = view; /* released by Storage_dealloc */
    s->has_view = 1;
    s->readonly = view.readonly;
    s->swapped = 1;
    return (PyObject *)s;
}

/* storage_at(owner, address, nbytes, dtype_id, /): a Storage over nbytes of memory at address,
 * kept alive by owner (a torch UntypedStorage: torchfree.torch.save gives the writer a CPU
 * tensor's storage so, without the three torch calls a numpy view of it costs). The caller
 * vouches for the memory: internal, for torchfree.torch only. */
PyObject *mod_storage_at(PyObject *module, PyObject *args) {
    PyObject *owner;
    unsigned long long addr, nbytes;
    int dtype;
    if (!PyArg_ParseTuple(args, "OKKi:storage_at", &owner, &addr, &nbytes, &dtype)) return NULL;
    if (dtype < 0 || dtype >= DT_COUNT || (dtypes_table[dtype].flags & (DTF_QUANTIZED | DTF_NO_TENSOR)) ||
        nbytes > (unsigned long long)PY_SSIZE_T_MAX || nbytes % dtypes_table[dtype].itemsize != 0 ||
        (addr == 0 && nbytes != 0)) {
        PyErr_Format(PyExc_ValueError, "storage_at: bad dtype id %d, address or size %llu", dtype, nbytes);
        return NULL;
    }
    ModuleState *st = PyModule_GetState(module);
    PyObject *key = PyUnicode_FromString("");
    PyObject *cpu = key ? PyUnicode_InternFromString("cpu") : NULL;
    StorageObject *s = cpu ? storage_alloc(st, NULL, key, cpu, (Py_ssize_t)nbytes, dtype) : NULL;
    Py_XDECREF(key);
    Py_XDECREF(cpu);
    if (s == NULL) return NULL;
    static char no_bytes[1]; /* an empty storage (address 0): bytes, none of them, not a meta one */
    s->data = addr != 0 ? (char *)(uintptr_t)addr : no_bytes;
    s->owner = Py_NewRef(owner);
    s->swapped = 1;
    return (PyObject *)s;
}

/* ---- persistent_load ---------------------------------------------------------- */

/* a == b for two str objects, without PyUnicode_Compare's generality (a hot path: twice per tensor) */
static inline int str_equal(PyObject *a, PyObject *b) {
    if (a == b) return 1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    return n == PyUnicode_GET_LENGTH(b) && PyUnicode_KIND(a) == PyUnicode_KIND(b) &&
           memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * PyUnicode_KIND(a)) == 0;
}

static PyObject *as_str(PyObject *o) {
    if (PyUnicode_Check(o)) return Py_NewRef(o);
    if (PyBytes_Check(o)) return PyUnicode_DecodeASCII(PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o), "strict");
    return NULL;
}

PyObject *storage_key_str(PyObject *key) {
    if (PyLong_CheckExact(key)) return PyObject_Str(key);
    PyObject *r = as_str(key);
    if (r == NULL) PyErr_Clear();
    return r;
}

int storage_type_dtype(Loader *L, PyObject *type) {
    ModuleState *st = L->st;
    if (Py_TYPE(type) == st->GlobalRefType) {
        GlobalRef *g = (GlobalRef *)type;
        if (g->id == G_STORAGE) return g->arg;
        if (g->id == G_UNTYPED_STORAGE || g->id == G_TYPED_STORAGE) return DT_UINT8;
    }
    return tf_raise(L, st->UnpicklingError, "persistent id names a storage type that is not a torch storage class");
}

PyObject *storage_retyped(Loader *L, StorageObject *old, uint64_t nbytes, int dtype) {
    if ((uint64_t)old->nbytes != nbytes && !old->meta)
        return tf_raise(L, L->st->FormatError, "storage %U is referenced with conflicting sizes (%zd and %llu bytes)",
                        old->key, old->nbytes, (unsigned long long)nbytes),
               NULL;
    if (old->dtype == dtype) return Py_NewRef(old);
    /* the same bytes under another dtype (legitimate for empty storages) */
    if (storage_ready(L, old) < 0) return NULL;
    StorageObject *s = storage_new(L, old->key, old->location, (Py_ssize_t)nbytes, dtype);
    if (s == NULL) return NULL;
    s->data = old->data;
    s->owner = Py_NewRef(old);
    s->readonly = old->readonly;
    s->meta = old->meta;
    s->swapped = old->swapped || old->swap_unit;
    return (PyObject *)s;
}

/* The tag a storage saved with `saved` goes to (new reference). */
PyObject *storage_target(Loader *L, PyObject *saved) { return tf_map_target(L->ml_kind, L->map_location, saved); }

int storage_charge(Loader *L, uint64_t nbytes) {
    if (tf_add_u64(L->total_alloc, nbytes, &L->total_alloc) || L->total_alloc > L->lim.total_bytes)
        return tf_raise(L, L->st->LimitError, "storages need more than the limit of %llu bytes",
                        (unsigned long long)L->lim.total_bytes);
    return 0;
}

/* The record data/<key> (NULL when absent). torch numbers keys 0, 1, ... and
 * writes data/<k> in key order, so a numeric key is tried at its expected
 * directory index before the hash lookup. name receives "<dir><key>", dir being
 * L->storage_dir ("data/", or "constants/" for a TorchScript constants.pkl). */
static ZipEntry *find_record(Loader *L, PyObject *key, char *name, size_t cap) {
    Py_ssize_t klen;
    const char *k = PyUnicode_AsUTF8AndSize(key, &klen);
    if (k == NULL || (size_t)klen + 6 > cap) {
        PyErr_Clear();
        snprintf(name, cap, "data/<a key of %zd bytes>", klen);
        return NULL;
    }
    const char *dir = L->storage_dir ? L->storage_dir : "data/";
    size_t dlen = strlen(dir);
    if ((size_t)klen + dlen + 1 > cap) {
        snprintf(name, cap, "%s<a key of %zd bytes>", dir, klen);
        return NULL;
    }
    memcpy(name, dir, dlen);
    memcpy(name + dlen, k, (size_t)klen);
    name[klen + dlen] = 0;
    size_t nlen = (size_t)klen + dlen;
    if (klen > 0 && klen <= 9) {
        size_t v = 0;
        Py_ssize_t i = 0;
        while (i < klen && k[i] >= '0' && k[i] <= '9') v = v * 10 + (size_t)(k[i++] - '0');
        if (i == klen && (klen == 1 || k[0] != '0')) {
            if (L->data0 == 0) {
                char first[64];
                int flen = snprintf(first, sizeof first, "%s0", dir);
                ZipEntry *e0 = flen > 0 && (size_t)flen < sizeof first ? zipread_find(&L->zip, first, (size_t)flen)
                                                                       : NULL;
                L->data0 = e0 ? (size_t)(e0 - L->zip.entries) + 1 : (size_t)-1;
            }
            if (L->data0 != (size_t)-1 && L->data0 - 1 + v < L->zip.n_entries) {
                ZipEntry *e = &L->zip.entries[L->data0 - 1 + v];
                if (e->name_len == nlen && memcmp(e->name, name, nlen) == 0) return e;
            }
        }
    }
    return zipread_find(&L->zip, name, nlen);
}

/* zipread_locate, raising on failure (cheap once located: the hot path skips the TfErr). */
static inline int locate(Loader *L, ZipEntry *e) {
    if (TF_LIKELY(e->data_offset != UINT64_MAX)) return 0;
    TfErr err;
    if (zipread_locate(&L->zip, e, &err) != TF_OK) return tf_raise_err(L, &err);
    if (L->drop_ok) loader_drop_note(L, e);
    return 0;
}

/* Check s's record e (may be NULL: missing) against the persistent id. */
static int storage_locate(Loader *L, StorageObject *s, ZipEntry *e, const char *name) {
    if (e == NULL) return tf_raise(L, L->st->FormatError, "record %s is missing from the archive", name);
    if (e->usize != (uint64_t)s->nbytes)
        return tf_raise(L, L->st->FormatError,
                        "record %s has %llu bytes but its persistent id needs %zd (numel x element size)",
                        name, (unsigned long long)e->usize, s->nbytes);
    if (!L->lazy && locate(L, e) < 0) return -1;
    if (L->require_map && !(L->mode == SRC_MAP && e->method == 0))
        return tf_raise(L, L->st->FormatError,
                        "record %s is compressed (method %d) and cannot be memory-mapped; "
                        "load with mmap=None or mmap=False", name, e->method);
    s->rec.entry = e;
    return 0;
}

/* Copy or inflate s's record into its buffer now: without the GIL, except for a
 * Python file object, which is read through its own methods; a big stored record
 * of a file descriptor is read by several threads (read_split). */
static int read_record(Loader *L, StorageObject *s) {
    TfErr err = {0};
    TfStatus rc;
    if (L->mode == SRC_FD && storage_read_split(L, s->rec.entry, (uint8_t *)s->data) == 0) {
        s->pending = 0;
        return 0;
    }
    if (L->mode == SRC_PYFILE) {
        rc = zipread_extract(&L->zip, s->rec.entry, (uint8_t *)s->data, &err);
    } else {
        loader_drop_off(L); /* other threads run meanwhile */
        Py_BEGIN_ALLOW_THREADS
        rc = zipread_extract(&L->zip, s->rec.entry, (uint8_t *)s->data, &err);
        Py_END_ALLOW_THREADS
    }
    if (rc != TF_OK) return tf_raise_err(L, &err);
    s->pending = 0;
    return 0;
}

/* Give s its bytes: a slice of the mapping, or a fresh buffer filled now
 * (inflated, copied) or, when `defer`, by pread in a read batch or storage_finish. */
static int storage_fill(Loader *L, StorageObject *s, int defer) {
    ZipEntry *e = s->rec.entry;
    if (locate(L, e) < 0) return -1;
    s->unread = 0;
    if (L->mode == SRC_MAP && e->method == 0) {
        s->data = (char *)L->src + e->data_offset;
        s->owner = Py_NewRef(L->src_owner);
        s->readonly = !L->src_writable;
        return 0;
    }
    if (tf_numpy(L->st) < 0 || storage_charge(L, e->usize) < 0) return -1;
    npy_intp dims[1] = {(npy_intp)e->usize};
    PyObject *buf = PyArray_SimpleNew(1, dims, NPY_UINT8);
    if (buf == NULL) return -1;
    s->owner = buf;
    s->data = PyArray_DATA((PyArrayObject *)buf);
    storage_thp_fit(L, s->data, (size_t)e->usize);
    s->readonly = 0;
    s->pending = 1;
    if (defer && L->mode == SRC_FD && e->method == 0) { /* read in a batch, with the others */
        if (PyList_Append(L->pending, (PyObject *)s) < 0) return -1;
        L->pend_bytes += e->usize;
        return storage_pending_pump(L);
    }
    if (read_record(L, s) < 0) return -1;
    return 0;
}

/* A user's map_location callable returned `res` for s: None keeps s, a
 * Storage or any other buffer of >= nbytes bytes becomes its data. */
static int storage_apply_hook(Loader *L, StorageObject *s, PyObject *res) {
    if (res == Py_None || res == (PyObject *)s) return 0;
    if (Py_TYPE(res) == L->st->StorageType) {
        StorageObject *r = (StorageObject *)res;
        if (storage_ready(L, r) < 0) return -1;
        if (!r->meta && r->nbytes < s->nbytes) {
            PyErr_Format(PyExc_ValueError, "map_location returned a storage of %zd bytes for record %U of %zd bytes",
                         r->nbytes, s->key, s->nbytes);
            return -1;
        }
        s->data = r->data;
        s->readonly = r->readonly;
        s->meta = r->meta;
        Py_SETREF(s->location, Py_NewRef(r->location));
    } else {
        Py_buffer view;
        int readonly = 0;
        if (PyObject_GetBuffer(res, &view, PyBUF_WRITABLE) < 0) {
            PyErr_Clear();
            if (PyObject_GetBuffer(res, &view, PyBUF_SIMPLE) < 0) {
                PyErr_Format(PyExc_TypeError,
                             "map_location callable must return None, a torchfree.Storage or a buffer, not %s",
                             Py_TYPE(res)->tp_name);
                return -1;
            }
            readonly = 1;
        }
        if (view.len < s->nbytes) {
            PyErr_Format(PyExc_ValueError, "map_location returned %zd bytes for record %U of %zd bytes",
                         view.len, s->key, s->nbytes);
            PyBuffer_Release(&view);
            return -1;
        }
        if (s->has_view) PyBuffer_Release(&s->view);
        s->view = view;
        s->has_view = 1;
        s->data = view.buf;
        s->readonly = readonly;
    }
    Py_SETREF(s->owner, Py_NewRef(res));
    s->swapped = 1; /* the user's bytes are taken as they are */
    s->pending = 0;
    return 0;
}

PyObject *storage_persistent_load(Loader *L, PyObject *pid) {
    if (!PyTuple_Check(pid) || PyTuple_GET_SIZE(pid) < 1) {
        tf_raise(L, L->st->UnpicklingError, "persistent id is a %s, not a ('storage', ...) tuple",
                 Py_TYPE(pid)->tp_name);
        return NULL;
    }
    return storage_persistent_items(L, &PyTuple_GET_ITEM(pid, 0), PyTuple_GET_SIZE(pid));
}

PyObject *storage_persistent_items(Loader *L, PyObject *const *pid, Py_ssize_t n) {
    ModuleState *st = L->st;
    PyObject *tag = as_str(pid[0]);
    int is_storage = tag != NULL && str_equal(tag, st->str_storage);
    if (tag == NULL) PyErr_Clear();
    Py_XDECREF(tag);
    if (!is_storage || n != 5) {
        tf_raise(L, st->UnpicklingError,
                 "only persistent ids ('storage', type, key, location, numel) are allowed in a zip checkpoint");
        return NULL;
    }
    int dtype = storage_type_dtype(L, pid[1]);
    if (dtype < 0) return NULL;
    PyObject *key = storage_key_str(pid[2]);
    PyObject *saved = as_str(pid[3]);
    PyObject *numel_o = pid[4];
    PyObject *result = NULL;
    if (key == NULL || saved == NULL || !PyLong_Check(numel_o)) {
        PyErr_Clear();
        tf_raise(L, st->UnpicklingError, "malformed persistent id (key, location or numel of the wrong type)");
    } else {
        int overflow = 0;
        long long numel = PyLong_AsLongLongAndOverflow(numel_o, &overflow);
        result = storage_get(L, dtype, key, saved, overflow ? -1 : numel);
    }
    Py_XDECREF(key);
    Py_XDECREF(saved);
    return result;
}

/* Torch mode: whether the bytes of a storage saved at `saved` may be read after unpickling, with
 * the others (1), or must be there when its tensor is made (0: map_location gives the storage to
 * torch, which copies it to a device or to a callable then); -1 with an exception. The answer
 * for the last location asked is kept (a checkpoint has one or a few). */
static int defer_ok(Loader *L, PyObject *saved) {
    if (L->defer_loc != NULL && (L->defer_loc == saved || str_equal(L->defer_loc, saved))) return L->defer_last;
    PyObject *r = PyObject_CallOneArg(L->torch_defer, saved);
    int ok = r == NULL ? -1 : PyObject_IsTrue(r);
    Py_XDECREF(r);
    if (ok < 0) return -1;
    Py_XSETREF(L->defer_loc, Py_NewRef(saved)); /* released by loader_close */
    L->defer_last = ok;
    return ok;
}

PyObject *storage_get(Loader *L, int dtype, PyObject *key, PyObject *saved, long long numel) {
    ModuleState *st = L->st;
    PyObject *result = NULL, *target = NULL;
    StorageObject *s = NULL;
    uint64_t nbytes;
    if (numel < 0 || tf_mul_u64((uint64_t)numel, dtypes_table[dtype].itemsize, &nbytes) ||
        nbytes > (uint64_t)PY_SSIZE_T_MAX) {
        tf_raise(L, st->FormatError, "persistent id of record %s%U claims an impossible numel",
                 L->storage_dir ? L->storage_dir : "data/", key);
        goto done;
    }
    char name[4096 + 8];
    ZipEntry *e = find_record(L, key, name, sizeof name);
    /* borrowed: records know their storage; keys without a record (meta) are in a dict */
    StorageObject *old = e ? (StorageObject *)e->user
                           : (StorageObject *)PyDict_GetItemWithError(L->storages, key);
    if (old != NULL) {
        result = storage_retyped(L, old, nbytes, dtype);
        goto done;
    }
    if (PyErr_Occurred()) goto done;
    target = storage_target(L, saved);
    if (target == NULL) goto done;
    s = storage_new(L, key, target, (Py_ssize_t)nbytes, dtype);
    if (s == NULL) goto done;
    s->saved = Py_NewRef(saved);
    if (str_equal(target, st->str_meta)) {
        s->meta = 1;
    } else {
        if (storage_locate(L, s, e, name) < 0) goto done;
        if (L->big_endian && dtype != DT_UINT8) {
            const DtypeInfo *info = &dtypes_table[dtype];
            s->swap_unit = (info->flags & DTF_COMPLEX) ? info->itemsize / 2 : info->itemsize;
            if (s->swap_unit < 2) s->swap_unit = 0;
        }
        s->hooked = L->ml_kind != ML_CALL;
        /* read with the others later, unless a map_location callable (or torch) needs it now */
        int defer = !s->hooked ? 0 : L->torch_defer == NULL ? 1 : defer_ok(L, saved);
        if (defer < 0) goto done;
        if (L->lazy)
            s->unread = 1;
        else if (storage_fill(L, s, defer) < 0 || (!s->hooked && storage_ready(L, s) < 0))
            goto done;
    }
    if (PyList_Append(L->storage_list, (PyObject *)s) < 0) goto done;
    if (e != NULL)
        e->user = s; /* the list holds the reference */
    else if (PyDict_SetItem(L->storages, key, (PyObject *)s) < 0)
        goto done;
    result = (PyObject *)s;
    s = NULL;
done:
    Py_XDECREF(s);
    Py_XDECREF(target);
    return result;
}

/* ---- finishing: deferred reads and byte swaps ------------------------------------ */

int storage_ready(Loader *L, StorageObject *s) {
    if (s->meta) return 0;
    if (s->loader != L && (s->unread || s->pending || !s->hooked)) {
        /* its record belongs to another (maybe closed) archive */
        PyErr_SetString(PyExc_ValueError, "this storage belongs to another checkpoint, which has not read it");
        return -1;
    }
    if (s->unread && storage_fill(L, s, 0) < 0) return -1;
    if (s->pending && s->rec.entry != NULL && L->batch != NULL && storage_batch_join(L) < 0) return -1; /* s may be in it */
    if (s->pending && s->rec.entry != NULL && read_record(L, s) < 0) return -1;
    if (s->swap_unit && !s->swapped && !s->pending && s->data != NULL) {
        dtypes_byteswap((uint8_t *)s->data, (uint64_t)s->nbytes, (unsigned)s->swap_unit);
        s->swapped = 1;
    }
    if (!s->hooked) {
        s->hooked = 1;
        PyObject *res = PyObject_CallFunctionObjArgs(L->map_location, (PyObject *)s, s->saved, NULL);
        if (res == NULL) return -1;
        int r = storage_apply_hook(L, s, res);
        Py_DECREF(res);
        return r;
    }
    return 0;
}

int storage_finish(Loader *L) {
    if (storage_read_pending(L) < 0) return -1;
    if (L->big_endian) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(L->storage_list); i++)
            if (storage_ready(L, (StorageObject *)PyList_GET_ITEM(L->storage_list, i)) < 0) return -1;
    }
    return 0;
}
