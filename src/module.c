/* module.c - torchfree._core: module state, exceptions, and load_zip().
 *
 * Multi-phase init with per-module state (no mutable globals), heap types,
 * and the entry point the Python layer calls once it has opened the file. */
#define TORCHFREE_MODULE_C
#include "module.h"

#include <stdarg.h>

static struct PyModuleDef core_module;

ModuleState *tf_state_of_type(PyTypeObject *tp) {
    PyObject *m = PyType_GetModuleByDef(tp, &core_module);
    return m ? (ModuleState *)PyModule_GetState(m) : NULL;
}

PyObject *tf_helper(ModuleState *st, const char *name) {
    PyObject *h = st->helpers ? PyDict_GetItemString(st->helpers, name) : NULL;
    if (h == NULL) PyErr_Format(PyExc_RuntimeError, "torchfree helper %s is not registered", name);
    return h;
}

/* ---- errors ---------------------------------------------------------------- */

static int raise_va(Loader *L, PyObject *exc, const char *fmt, va_list ap) {
    PyObject *msg = PyUnicode_FromFormatV(fmt, ap);
    if (msg == NULL) return -1;
    PyObject *where = NULL;
    if (L != NULL && L->pk_start != NULL) {
        PyObject *path = vm_key_path(L);
        if (path == NULL) PyErr_Clear();
        if (path != NULL && PyUnicode_GET_LENGTH(path) > 0)
            where = PyUnicode_FromFormat(" (at key path '%U'; %s byte offset %llu)", path,
                                         L->record ? L->record : "pickle", (unsigned long long)L->op_offset);
        else
            where = PyUnicode_FromFormat(" (%s byte offset %llu)", L->record ? L->record : "pickle",
                                         (unsigned long long)L->op_offset);
        Py_XDECREF(path);
    }
    if (where != NULL) {
        PyObject *full = PyUnicode_Concat(msg, where);
        Py_DECREF(where);
        if (full != NULL) Py_SETREF(msg, full);
    }
    PyErr_SetObject(exc, msg);
    Py_DECREF(msg);
    return -1;
}

int tf_raise(Loader *L, PyObject *exc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    raise_va(L, exc, fmt, ap);
    va_end(ap);
    return -1;
}

int tf_raise_from(Loader *L, PyObject *exc, const char *fmt, ...) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (tb != NULL && v != NULL) PyException_SetTraceback(v, tb);
    va_list ap;
    va_start(ap, fmt);
    raise_va(L, exc, fmt, ap);
    va_end(ap);
    if (v != NULL) {
        PyObject *t2, *v2, *tb2;
        PyErr_Fetch(&t2, &v2, &tb2);
        PyErr_NormalizeException(&t2, &v2, &tb2);
        if (v2 != NULL) PyException_SetCause(v2, Py_NewRef(v));
        PyErr_Restore(t2, v2, tb2);
    }
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
    return -1;
}

int tf_raise_err(Loader *L, const TfErr *err) {
    ModuleState *st = L->st;
    switch (err->status) {
    case TF_ERR_LIMIT:
        PyErr_Format(st->LimitError, "%s (byte offset %llu)", err->detail, (unsigned long long)err->offset);
        break;
    case TF_ERR_NOMEM:
        PyErr_NoMemory();
        break;
    case TF_ERR_IO:
        PyErr_Format(PyExc_OSError, "%s (byte offset %llu)", err->detail, (unsigned long long)err->offset);
        break;
    default:
        PyErr_Format(st->FormatError, "%s (byte offset %llu)", err->detail, (unsigned long long)err->offset);
        break;
    }
    return -1;
}

/* ---- load_zip ---------------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    uint64_t size;
} MemCtx;

static TfStatus mem_read_at(void *ctx, uint64_t off, void *buf, size_t n, TfErr *err) {
    MemCtx *m = ctx;
    if (off > m->size || n > m->size - off)
        return tf_fail(err, TF_ERR_FORMAT, off, "read of %zu bytes past the end of the input", n);
    memcpy(buf, m->p + off, n);
    return TF_OK;
}

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
    int file_big = 0;
    if (found) {
        if (strcmp(buf, "big") == 0) file_big = 1;
        else if (strcmp(buf, "little") != 0)
            return tf_raise(L, L->st->FormatError, "byteorder record holds an unknown value");
    }
    const uint16_t one = 1;
    int host_big = *(const uint8_t *)&one == 0;
    L->big_endian = file_big != host_big;
    return 0;
}

static int parse_limits(Loader *L, PyObject *limits) {
    TfLimits d = TF_LIMITS_DEFAULT;
    L->lim = d;
    if (limits == NULL || limits == Py_None) return 0;
    uint64_t *fields[] = {&L->lim.pickle_bytes, &L->lim.memo, &L->lim.stack, &L->lim.marks,
                          &L->lim.records, &L->lim.name, &L->lim.ndim, &L->lim.total_bytes};
    if (!PyTuple_Check(limits) || PyTuple_GET_SIZE(limits) != 8) {
        PyErr_SetString(PyExc_TypeError, "limits must be an 8-tuple");
        return -1;
    }
    for (int i = 0; i < 8; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(limits, i));
        if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
        *fields[i] = v;
    }
    return 0;
}

PyDoc_STRVAR(load_zip_doc,
"load_zip($module, /, src, size, *, mode, require_map, map_kind, map_location, weights_only,\n"
"         safe_globals, encoding, limits)\n--\n\n"
"Load a zip checkpoint (internal: use torchfree.load).\n\n"
"src is a buffer (mode 0: zero-copy views; mode 1: copies) or a file descriptor\n"
"(mode 2: each storage read into fresh memory). Returns the unpickled object.");

static PyObject *mod_load_zip(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"src", "size", "mode", "require_map", "map_kind", "map_location",
                             "weights_only", "safe_globals", "encoding", "limits", NULL};
    PyObject *src, *map_location, *safe_globals, *encoding, *limits;
    unsigned long long size;
    int mode, require_map, map_kind, weights_only;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OK$ipiOpOOO:load_zip", kwlist, &src, &size, &mode,
                                     &require_map, &map_kind, &map_location, &weights_only, &safe_globals,
                                     &encoding, &limits))
        return NULL;
    Loader L;
    memset(&L, 0, sizeof L);
    L.st = PyModule_GetState(module);
    L.mode = mode;
    L.require_map = require_map;
    L.ml_kind = map_kind;
    L.map_location = map_location;
    L.weights_only = weights_only;
    L.safe_globals = safe_globals == Py_None ? NULL : safe_globals;
    L.encoding = encoding == Py_None ? NULL : encoding;
    L.fd = -1;
    if (L.safe_globals != NULL && !PyDict_Check(L.safe_globals)) {
        PyErr_SetString(PyExc_TypeError, "safe_globals must be a dict");
        return NULL;
    }
    if ((map_kind == ML_STR && !PyUnicode_Check(map_location)) || (map_kind == ML_DICT && !PyDict_Check(map_location))) {
        PyErr_SetString(PyExc_TypeError, "bad map_location");
        return NULL;
    }
    if (parse_limits(&L, limits) < 0) return NULL;

    PyObject *result = NULL;
    uint8_t *pickle_buf = NULL;
    MemCtx mem = {0};
    TfErr err = {0};
    TfStatus rc;
    L.storages = PyDict_New();
    L.pending = PyList_New(0);
    if (L.storages == NULL || L.pending == NULL) goto done;
    if (mode == SRC_FD) {
        L.fd = (int)PyLong_AsLong(src);
        if (L.fd == -1 && PyErr_Occurred()) goto done;
        L.size = size;
        Py_BEGIN_ALLOW_THREADS
        rc = zipread_open(&L.zip, storage_read_fd, &L.fd, L.size, &L.lim, &err);
        Py_END_ALLOW_THREADS
    } else {
        L.src_owner = PyMemoryView_FromObject(src);
        if (L.src_owner == NULL) goto done;
        Py_buffer *view = PyMemoryView_GET_BUFFER(L.src_owner);
        L.src = view->buf;
        L.size = (uint64_t)view->len;
        L.src_writable = !view->readonly;
        mem.p = L.src;
        mem.size = L.size;
        rc = zipread_open(&L.zip, mem_read_at, &mem, L.size, &L.lim, &err);
    }
    if (rc != TF_OK) {
        tf_raise_err(&L, &err);
        goto done;
    }
    if (read_version_and_byteorder(&L) < 0) goto done;
    ZipEntry *pe = zipread_find(&L.zip, "data.pkl", 8);
    if (pe == NULL) {
        tf_raise(&L, L.st->FormatError, "archive has no data.pkl record");
        goto done;
    }
    if (pe->usize > L.lim.pickle_bytes) {
        tf_raise(&L, L.st->LimitError, "data.pkl of %llu bytes exceeds the limit of %llu bytes",
                 (unsigned long long)pe->usize, (unsigned long long)L.lim.pickle_bytes);
        goto done;
    }
    const uint8_t *pk;
    if (zipread_locate(&L.zip, pe, &err) != TF_OK) {
        tf_raise_err(&L, &err);
        goto done;
    }
    if (mode != SRC_FD && pe->method == 0) {
        pk = L.src + pe->data_offset;
    } else {
        pickle_buf = PyMem_Malloc(pe->usize ? (size_t)pe->usize : 1);
        if (pickle_buf == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        if (zipread_extract(&L.zip, pe, pickle_buf, &err) != TF_OK) {
            tf_raise_err(&L, &err);
            goto done;
        }
        pk = pickle_buf;
    }
    L.record = "data.pkl";
    /* the VM makes many containers and no cycles: a collection pass per few
     * hundred of them would cost more than the whole load */
    int gc_was_enabled = PyGC_Disable();
    PyObject *obj = vm_run(&L, pk, (size_t)pe->usize);
    if (gc_was_enabled) PyGC_Enable();
    L.pk_start = NULL; /* later errors are not at a pickle offset */
    if (obj == NULL) goto done;
    if (storage_finish(&L) < 0) {
        Py_DECREF(obj);
        goto done;
    }
    result = obj;
done:
    vm_free(&L);
    zipread_close(&L.zip);
    PyMem_Free(pickle_buf);
    Py_XDECREF(L.storages);
    Py_XDECREF(L.pending);
    Py_XDECREF(L.src_owner);
    return result;
}

PyDoc_STRVAR(set_helpers_doc,
"_set_helpers($module, helpers, descrs, /)\n--\n\n"
"Register torchfree's own Python helpers and the ml_dtypes descriptors (internal).");

static PyObject *mod_set_helpers(PyObject *module, PyObject *args) {
    PyObject *helpers, *descrs;
    if (!PyArg_ParseTuple(args, "O!O!:_set_helpers", &PyDict_Type, &helpers, &PyDict_Type, &descrs)) return NULL;
    ModuleState *st = PyModule_GetState(module);
    Py_XSETREF(st->helpers, Py_NewRef(helpers));
    PyObject *opaque = PyDict_GetItemString(helpers, "Opaque");
    PyObject *meta = PyDict_GetItemString(helpers, "MetaArray");
    if (opaque == NULL || !PyType_Check(opaque) || meta == NULL || !PyType_Check(meta)) {
        PyErr_SetString(PyExc_TypeError, "helpers must name the Opaque and MetaArray types");
        return NULL;
    }
    Py_XSETREF(st->OpaqueType, Py_NewRef(opaque));
    Py_XSETREF(st->MetaArrayType, Py_NewRef(meta));
    for (int i = 0; i < DT_COUNT; i++) {
        const DtypeInfo *info = &dtypes_table[i];
        if (info->np_name != NULL && st->descr[i] == NULL) {
            PyObject *d = PyDict_GetItemString(descrs, info->np_name);
            if (d != NULL && PyArray_DescrCheck(d)) st->descr[i] = (PyArray_Descr *)Py_NewRef(d);
        }
        PyObject *value;
        if ((info->flags & DTF_VALUE_IS_NUMPY) && st->descr[i] != NULL)
            value = Py_NewRef(st->descr[i]);
        else
            value = PyUnicode_FromFormat("torch.%s", info->name);
        if (value == NULL) return NULL;
        Py_XSETREF(st->dtype_value[i], value);
    }
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"load_zip", (PyCFunction)(void (*)(void))mod_load_zip, METH_VARARGS | METH_KEYWORDS, load_zip_doc},
    {"_set_helpers", mod_set_helpers, METH_VARARGS, set_helpers_doc},
    {NULL, NULL, 0, NULL},
};

/* ---- module state and init ------------------------------------------------------- */

static int add_exception(PyObject *m, PyObject **slot, const char *name, PyObject *bases, const char *doc) {
    *slot = PyErr_NewExceptionWithDoc(name, doc, bases, NULL);
    if (*slot == NULL) return -1;
    const char *dot = strrchr(name, '.');
    return PyModule_AddObjectRef(m, dot + 1, *slot);
}

static int core_exec(PyObject *m) {
    ModuleState *st = PyModule_GetState(m);
    if (PyArray_ImportNumPyAPI() < 0) return -1;
    PyObject *pickle = PyImport_ImportModule("pickle");
    if (pickle == NULL) return -1;
    PyObject *pickle_err = PyObject_GetAttrString(pickle, "UnpicklingError");
    Py_DECREF(pickle);
    if (pickle_err == NULL) return -1;
    PyObject *bases = NULL;
    int r = -1;
    if (add_exception(m, &st->CheckpointError, "torchfree.CheckpointError", PyExc_ValueError,
                      "Base class of every error about a checkpoint's content.") < 0 ||
        add_exception(m, &st->FormatError, "torchfree.FormatError", st->CheckpointError,
                      "Not a checkpoint, or a corrupt or truncated container.") < 0 ||
        add_exception(m, &st->LimitError, "torchfree.LimitError", st->CheckpointError,
                      "A documented size or depth limit was exceeded.") < 0)
        goto done;
    bases = PyTuple_Pack(2, st->CheckpointError, pickle_err);
    if (bases == NULL ||
        add_exception(m, &st->UnpicklingError, "torchfree.UnpicklingError", bases,
                      "The pickle inside the checkpoint is invalid.") < 0 ||
        add_exception(m, &st->UnsafeGlobalError, "torchfree.UnsafeGlobalError", st->UnpicklingError,
                      "The pickle names a global that is not allowed.") < 0)
        goto done;
    st->GlobalRefType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &GlobalRefSpec, NULL);
    st->StorageType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &StorageSpec, NULL);
    if (st->GlobalRefType == NULL || st->StorageType == NULL) goto done;
    if (PyModule_AddObjectRef(m, "Storage", (PyObject *)st->StorageType) < 0) goto done;
    PyObject *collections = PyImport_ImportModule("collections");
    if (collections == NULL) goto done;
    st->OrderedDict = PyObject_GetAttrString(collections, "OrderedDict");
    st->Counter = PyObject_GetAttrString(collections, "Counter");
    Py_DECREF(collections);
    if (st->OrderedDict == NULL || st->Counter == NULL) goto done;
    for (int i = 0; i < DT_COUNT; i++) {
        const char *np = dtypes_table[i].np_name;
        int type = -1;
        if (np == NULL) continue;
        if (!strcmp(np, "float64")) type = NPY_FLOAT64;
        else if (!strcmp(np, "float32")) type = NPY_FLOAT32;
        else if (!strcmp(np, "float16")) type = NPY_FLOAT16;
        else if (!strcmp(np, "complex128")) type = NPY_COMPLEX128;
        else if (!strcmp(np, "complex64")) type = NPY_COMPLEX64;
        else if (!strcmp(np, "int64")) type = NPY_INT64;
        else if (!strcmp(np, "int32")) type = NPY_INT32;
        else if (!strcmp(np, "int16")) type = NPY_INT16;
        else if (!strcmp(np, "int8")) type = NPY_INT8;
        else if (!strcmp(np, "uint8")) type = NPY_UINT8;
        else if (!strcmp(np, "uint16")) type = NPY_UINT16;
        else if (!strcmp(np, "uint32")) type = NPY_UINT32;
        else if (!strcmp(np, "uint64")) type = NPY_UINT64;
        else if (!strcmp(np, "bool")) type = NPY_BOOL;
        if (type >= 0) st->descr[i] = PyArray_DescrFromType(type);
    }
    st->str_storage = PyUnicode_InternFromString("storage");
    st->str_meta = PyUnicode_InternFromString("meta");
    st->str_metadata_attr = PyUnicode_InternFromString("_metadata");
    st->str_conj = PyUnicode_InternFromString("conj");
    st->str_neg = PyUnicode_InternFromString("neg");
    st->str_shape = PyUnicode_InternFromString("shape");
    st->str_dtype = PyUnicode_InternFromString("dtype");
    if (!st->str_storage || !st->str_meta || !st->str_metadata_attr || !st->str_conj || !st->str_neg ||
        !st->str_shape || !st->str_dtype)
        goto done;
    /* limits, as LIMITS = {name: default} */
    PyObject *lim = Py_BuildValue("{sKsKsKsKsKsKsKsK}", "pickle_bytes", (unsigned long long)TF_LIMIT_PICKLE_BYTES,
                                  "memo", (unsigned long long)TF_LIMIT_MEMO, "stack", (unsigned long long)TF_LIMIT_STACK,
                                  "marks", (unsigned long long)TF_LIMIT_MARKS, "records",
                                  (unsigned long long)TF_LIMIT_RECORDS, "name", (unsigned long long)TF_LIMIT_NAME,
                                  "ndim", (unsigned long long)TF_LIMIT_NDIM, "total_bytes",
                                  (unsigned long long)TF_LIMIT_TOTAL_BYTES);
    if (lim == NULL || PyModule_AddObject(m, "LIMITS", lim) < 0) {
        Py_XDECREF(lim);
        goto done;
    }
    r = 0;
done:
    Py_XDECREF(bases);
    Py_DECREF(pickle_err);
    return r;
}

static int core_traverse(PyObject *m, visitproc visit, void *arg) {
    ModuleState *st = PyModule_GetState(m);
    Py_VISIT(st->CheckpointError);
    Py_VISIT(st->FormatError);
    Py_VISIT(st->UnpicklingError);
    Py_VISIT(st->UnsafeGlobalError);
    Py_VISIT(st->LimitError);
    Py_VISIT(st->GlobalRefType);
    Py_VISIT(st->StorageType);
    Py_VISIT(st->OrderedDict);
    Py_VISIT(st->Counter);
    Py_VISIT(st->helpers);
    Py_VISIT(st->OpaqueType);
    Py_VISIT(st->MetaArrayType);
    for (int i = 0; i < DT_COUNT; i++) {
        Py_VISIT(st->descr[i]);
        Py_VISIT(st->dtype_value[i]);
    }
    return 0;
}

static int core_clear(PyObject *m) {
    ModuleState *st = PyModule_GetState(m);
    Py_CLEAR(st->CheckpointError);
    Py_CLEAR(st->FormatError);
    Py_CLEAR(st->UnpicklingError);
    Py_CLEAR(st->UnsafeGlobalError);
    Py_CLEAR(st->LimitError);
    Py_CLEAR(st->GlobalRefType);
    Py_CLEAR(st->StorageType);
    Py_CLEAR(st->OrderedDict);
    Py_CLEAR(st->Counter);
    Py_CLEAR(st->helpers);
    Py_CLEAR(st->OpaqueType);
    Py_CLEAR(st->MetaArrayType);
    Py_CLEAR(st->str_storage);
    Py_CLEAR(st->str_meta);
    Py_CLEAR(st->str_metadata_attr);
    Py_CLEAR(st->str_conj);
    Py_CLEAR(st->str_neg);
    Py_CLEAR(st->str_shape);
    Py_CLEAR(st->str_dtype);
    for (int i = 0; i < DT_COUNT; i++) {
        Py_CLEAR(st->descr[i]);
        Py_CLEAR(st->dtype_value[i]);
    }
    return 0;
}

static void core_free(void *m) { core_clear((PyObject *)m); }

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "torchfree._core",
    .m_doc = "The C core of torchfree: zip reader, restricted unpickler, storages and tensors.",
    .m_size = sizeof(ModuleState),
    .m_methods = core_methods,
    .m_slots = core_slots,
    .m_traverse = core_traverse,
    .m_clear = core_clear,
    .m_free = core_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&core_module); }
