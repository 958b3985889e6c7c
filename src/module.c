/* module.c - torchfree._core: module state, exceptions, types and the method table.
 *
 * Multi-phase init with per-module state (no mutable globals), heap types,
 * and the entry point the Python layer calls once it has opened the file. */
#define TORCHFREE_MODULE_C
#include "module.h"
#include "crc32.h"
#include "pickscan.h"
#include "save.h"

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

PyObject *tf_call_helper(Loader *L, const char *name, PyObject *args) {
    loader_drop_off(L); /* Python code runs: no page of the mapping is dropped from now on */
    PyObject *f = L->torch != NULL ? PyDict_GetItemString(L->torch, name) : NULL; /* torch mode overrides */
    if (f == NULL) f = tf_helper(L->st, name);
    PyObject *r = f && args ? PyObject_CallObject(f, args) : NULL;
    if (r == NULL && args != NULL && f != NULL && !PyErr_ExceptionMatches(L->st->CheckpointError) &&
        !PyErr_ExceptionMatches(PyExc_MemoryError) && !PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
        /* our helpers only see data from the file: whatever goes wrong there is the file's fault */
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        PyErr_NormalizeException(&t, &v, &tb);
        PyObject *msg = v ? PyObject_Str(v) : NULL;
        const char *m = msg ? PyUnicode_AsUTF8(msg) : NULL;
        if (m == NULL) PyErr_Clear();
        PyErr_Restore(t, v, tb);
        tf_raise_from(L, L->st->UnpicklingError, "invalid data for %s: %s: %s", name,
                      t ? ((PyTypeObject *)t)->tp_name : "error", m ? m : "?");
        Py_XDECREF(msg);
    }
    return r;
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

PyObject *tf_limits_dict(const TfLimits *lim) {
    TfLimits d = TF_LIMITS_DEFAULT;
    if (lim == NULL) lim = &d;
    PyObject *out = PyDict_New();
    for (int i = 0; out != NULL && i < TF_LIMIT_COUNT; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(*tf_limit_field((TfLimits *)lim, i));
        if (v == NULL || PyDict_SetItemString(out, tf_limit_names[i], v) < 0) Py_CLEAR(out);
        Py_XDECREF(v);
    }
    return out;
}

int tf_parse_limits(PyObject *limits, TfLimits *out) {
    TfLimits d = TF_LIMITS_DEFAULT;
    *out = d;
    if (limits == NULL || limits == Py_None) return 0;
    if (!PyDict_Check(limits)) {
        PyErr_SetString(PyExc_TypeError, "limits must be a dict of LIMITS names to ints");
        return -1;
    }
    Py_ssize_t used = 0;
    for (int i = 0; i < TF_LIMIT_COUNT; i++) {
        PyObject *o = PyDict_GetItemString(limits, tf_limit_names[i]); /* borrowed */
        if (o == NULL) continue;
        unsigned long long x = PyLong_AsUnsignedLongLong(o);
        if (x == (unsigned long long)-1 && PyErr_Occurred()) return -1;
        *tf_limit_field(out, i) = x;
        used++;
    }
    if (used != PyDict_GET_SIZE(limits)) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(limits, &pos, &k, &v)) {
            int known = 0;
            for (int i = 0; i < TF_LIMIT_COUNT; i++)
                known |= PyUnicode_Check(k) && PyUnicode_CompareWithASCIIString(k, tf_limit_names[i]) == 0;
            if (!known) {
                PyErr_Format(PyExc_TypeError, "unknown limit %R", k);
                return -1;
            }
        }
    }
    return 0;
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

/* descr[] for each dtype whose numpy name descrs has, and dtype_value[] for every dtype that has
 * none yet or whose descr this call set: values a load may already hold stay the same objects. */
static int fill_dtypes(ModuleState *st, PyObject *descrs) {
    for (int i = 0; i < DT_COUNT; i++) {
        const DtypeInfo *info = &dtypes_table[i];
        int fresh = 0;
        if (info->np_name != NULL && st->descr[i] == NULL) {
            PyObject *d = PyDict_GetItemString(descrs, info->np_name);
            if (d != NULL && PyArray_DescrCheck(d)) {
                st->descr[i] = (PyArray_Descr *)Py_NewRef(d);
                fresh = 1;
            }
        }
        if (st->dtype_value[i] != NULL && !fresh) continue;
        PyObject *value;
        if ((info->flags & DTF_VALUE_IS_NUMPY) && st->descr[i] != NULL)
            value = Py_NewRef(st->descr[i]);
        else
            value = PyUnicode_FromFormat("torch.%s", info->name);
        if (value == NULL) return -1;
        Py_XSETREF(st->dtype_value[i], value);
    }
    return 0;
}

int tf_numpy(ModuleState *st) {
    if (st->np_loaded) return 0;
    if (PyArray_ImportNumPyAPI() < 0) return -1;
    /* numpy's own dtypes, by the table's numpy names (the rest come with ml_dtypes) */
    PyObject *descrs = PyDict_New();
    if (descrs == NULL) return -1;
    for (int i = 0; i < DT_COUNT; i++) {
        const DtypeInfo *info = &dtypes_table[i];
        if (!(info->flags & DTF_VALUE_IS_NUMPY) || PyDict_GetItemString(descrs, info->np_name) != NULL) continue;
        PyArray_Descr *d = NULL;
        PyObject *name = PyUnicode_FromString(info->np_name);
        int ok = name != NULL && PyArray_DescrConverter(name, &d) == NPY_SUCCEED && d->type_num < NPY_USERDEF;
        Py_XDECREF(name);
        if (!ok) {
            Py_XDECREF(d);
            if (name == NULL || PyErr_ExceptionMatches(PyExc_MemoryError)) {
                Py_DECREF(descrs);
                return -1;
            }
            PyErr_Clear(); /* an ml_dtypes name */
            continue;
        }
        int rc = PyDict_SetItemString(descrs, info->np_name, (PyObject *)d);
        Py_DECREF(d);
        if (rc < 0) {
            Py_DECREF(descrs);
            return -1;
        }
    }
    int rc = fill_dtypes(st, descrs); /* runs no Python code: no other thread sees half of it */
    Py_DECREF(descrs);
    if (rc == 0) st->np_loaded = 1;
    return rc;
}

int tf_is_ndarray(ModuleState *st, PyObject *o, int exact) {
    if (!st->np_loaded) {
        if (PyDict_GetItemString(PyImport_GetModuleDict(), "numpy") == NULL) return 0; /* borrowed */
        if (tf_numpy(st) < 0) return -1;
    }
    return exact ? PyArray_CheckExact(o) : PyArray_Check(o);
}

int tf_ml_dtypes(ModuleState *st) {
    if (st->ml_loaded) return 0;
    if (tf_numpy(st) < 0) return -1;
    PyObject *f = st->helpers != NULL ? PyDict_GetItemString(st->helpers, "ml_dtypes_descrs") : NULL;
    if (f == NULL) {
        st->ml_loaded = 1;
        return 0;
    }
    PyObject *d = PyObject_CallNoArgs(f);
    if (d == NULL) return -1;
    int rc = PyDict_Check(d) ? fill_dtypes(st, d) : (PyErr_SetString(PyExc_TypeError, "ml_dtypes_descrs() is not a dict"), -1);
    Py_DECREF(d);
    if (rc == 0) st->ml_loaded = 1;
    return rc;
}

int tf_dtype_needs_import(const ModuleState *st, int dt) {
    return st->descr[dt] == NULL && dtypes_table[dt].np_name != NULL && (!st->np_loaded || !st->ml_loaded);
}

int tf_need_dtype(ModuleState *st, int dt) {
    if (!tf_dtype_needs_import(st, dt)) return 0;
    if (tf_numpy(st) < 0) return -1;
    return st->descr[dt] == NULL ? tf_ml_dtypes(st) : 0;
}

PyObject *tf_dtype_of(ModuleState *st, int dt) {
    if (tf_need_dtype(st, dt) < 0) return NULL;
    return st->descr[dt] ? (PyObject *)st->descr[dt] : st->dtype_value[dt];
}

PyDoc_STRVAR(set_helpers_doc,
"_set_helpers($module, helpers, descrs, /)\n--\n\n"
"Register torchfree's own Python helpers and extra dtype descriptors (internal; ml_dtypes'\n"
"ones come from helpers['ml_dtypes_descrs'] on first need).");

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
    PyObject *quant = PyDict_GetItemString(helpers, "QuantizedArray");
    PyObject *sparse = PyDict_GetItemString(helpers, "SparseArray");
    Py_XSETREF(st->QuantizedArrayType, quant != NULL && PyType_Check(quant) ? Py_NewRef(quant) : NULL);
    Py_XSETREF(st->SparseArrayType, sparse != NULL && PyType_Check(sparse) ? Py_NewRef(sparse) : NULL);
    if ((PyDict_GET_SIZE(descrs) > 0 && tf_numpy(st) < 0) || fill_dtypes(st, descrs) < 0) return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(crc32_doc,
             "crc32($module, data, value=0, /, *, fold=2)\n--\n\n"
             "zlib.crc32(data, value), computed as save computes it: folded with (V)PCLMULQDQ where the\n"
             "CPU has it, at most as wide as fold (0: zlib's own loop, 1: 128-bit, 2: 512-bit). For tests;\n"
             "crc32_folds() says what this CPU does.");

static PyObject *mod_crc32_folds(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(tf_crc32_folds());
}

static PyObject *mod_crc32(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"", "", "fold", NULL};
    Py_buffer b;
    unsigned int value = 0;
    int fold = 2;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|I$i:crc32", kwlist, &b, &value, &fold)) return NULL;
    uint32_t crc;
    Py_BEGIN_ALLOW_THREADS
    crc = tf_crc32_using(fold, value, b.buf, (size_t)b.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(crc);
}

static PyMethodDef core_methods[] = {
    {"crc32", (PyCFunction)(void (*)(void))mod_crc32, METH_VARARGS | METH_KEYWORDS, crc32_doc},
    {"crc32_folds", mod_crc32_folds, METH_NOARGS, "crc32_folds($module, /)\n--\n\n0, 1 or 2: how crc32 folds on this CPU."},
    {"load_zip", (PyCFunction)(void (*)(void))mod_load_zip, METH_VARARGS | METH_KEYWORDS,
     "load_zip($module, /, src, size, *, mode, require_map, map_kind, map_location, weights_only,"
     " safe_globals, encoding, limits)\n--\n\nLoad a zip checkpoint (internal: use torchfree.load)."},
    {"load_legacy", (PyCFunction)(void (*)(void))mod_load_legacy, METH_VARARGS | METH_KEYWORDS,
     "load_legacy($module, /, src, size, *, mode, require_map, map_kind, map_location, weights_only,"
     " safe_globals, encoding, limits)\n--\n\nLoad a legacy-stream or tar checkpoint held in a buffer"
     " (internal: use torchfree.load)."},
    {"_set_helpers", mod_set_helpers, METH_VARARGS, set_helpers_doc},
    {"save", (PyCFunction)(void (*)(void))mod_save, METH_VARARGS | METH_KEYWORDS, mod_save_doc},
    {"walk", (PyCFunction)(void (*)(void))mod_walk, METH_VARARGS | METH_KEYWORDS,
     "walk($module, /, obj, mode, sep, children, refs=False, info_type=None, other=None, max_depth=10000)\n--\n\n"
     "The tensors of obj by dotted name (internal: see torchfree.flatten and scan)."},
    {"storage_at", mod_storage_at, METH_VARARGS,
     "storage_at($module, owner, address, nbytes, dtype_id, /)\n--\n\nA Storage over nbytes of memory at "
     "address, kept alive by owner (internal: torchfree.torch.save)."},
    {"storage_over", mod_storage_over, METH_VARARGS,
     "storage_over($module, buffer, dtype_id, location=None, /)\n--\n\nA Storage over any buffer's bytes, held exported while it "
     "lives (internal: torchfree.torch.save hands torch storages to the writer so)."},
    {"_thp_probe", mod_thp_probe, METH_VARARGS,
     "_thp_probe($module, free=-2, /)\n--\n\nThe free bytes in huge-page blocks a copy load would budget, or None "
     "where faults never compact; free >= 0 sets that figure for later loads, -1 asks the kernel again (internal: "
     "tests)."},
    {"storage_infos", mod_storage_infos, METH_VARARGS,
     "storage_infos($module, storages, record_prefix, type, /)\n--\n\nStorageInfo of each Storage (internal)."},
    {"info_table", mod_info_table, METH_O,
     "info_table($module, tensors, /)\n--\n\nThe table of CheckpointInfo.__str__, or None where _scan makes it "
     "(internal)."},
    {"record_infos", mod_record_infos, METH_VARARGS,
     "record_infos($module, packed, type, /)\n--\n\nRecordInfo of each record of Archive.record_table() "
     "(internal)."},
    {"pickle_globals", (PyCFunction)(void (*)(void))mod_pickle_globals, METH_VARARGS | METH_KEYWORDS, PICKLE_GLOBALS_DOC},
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
    /* pickle.UnpicklingError is _pickle's: the C module costs none of pickle.py's imports (re, enum) */
    PyObject *pickle = PyImport_ImportModule("_pickle");
    if (pickle == NULL) {
        PyErr_Clear();
        pickle = PyImport_ImportModule("pickle");
    }
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
    st->TensorRefType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &TensorRefSpec, NULL);
    st->TensorInfoType = (PyTypeObject *)PyType_FromModuleAndSpec(m, &TensorInfoSpec, NULL);
    PyObject *archive_type = PyType_FromModuleAndSpec(m, &ArchiveSpec, NULL);
    if (st->GlobalRefType == NULL || st->StorageType == NULL || st->TensorRefType == NULL || st->TensorInfoType == NULL ||
        archive_type == NULL) {
        Py_XDECREF(archive_type);
        goto done;
    }
    if (PyModule_AddObjectRef(m, "Storage", (PyObject *)st->StorageType) < 0 ||
        PyModule_AddObjectRef(m, "TensorRef", (PyObject *)st->TensorRefType) < 0 ||
        PyModule_AddObjectRef(m, "TensorInfoBase", (PyObject *)st->TensorInfoType) < 0 ||
        PyModule_AddObject(m, "Archive", archive_type) < 0) {
        Py_XDECREF(archive_type);
        goto done;
    }
    PyObject *collections = PyImport_ImportModule("collections");
    if (collections == NULL) goto done;
    st->OrderedDict = PyObject_GetAttrString(collections, "OrderedDict");
    st->Counter = PyObject_GetAttrString(collections, "Counter");
    Py_DECREF(collections);
    if (st->OrderedDict == NULL || st->Counter == NULL) goto done;
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
    PyObject *lim = tf_limits_dict(NULL);
    if (lim == NULL || PyModule_AddObject(m, "LIMITS", lim) < 0) {
        Py_XDECREF(lim);
        goto done;
    }
    /* DTYPE_NAMES[i]: torch's name of dtype id i (torch mode maps ids to torch dtypes) */
    PyObject *names = PyTuple_New(DT_COUNT);
    if (names == NULL) goto done;
    for (int i = 0; i < DT_COUNT; i++) {
        PyObject *nm = PyUnicode_FromString(dtypes_table[i].name);
        if (nm == NULL) {
            Py_DECREF(names);
            goto done;
        }
        PyTuple_SET_ITEM(names, i, nm);
    }
    if (PyModule_AddObject(m, "DTYPE_NAMES", names) < 0) {
        Py_DECREF(names);
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
    Py_VISIT(st->TensorRefType);
    Py_VISIT(st->TensorInfoType);
    Py_VISIT(st->OrderedDict);
    Py_VISIT(st->Counter);
    Py_VISIT(st->helpers);
    Py_VISIT(st->OpaqueType);
    Py_VISIT(st->MetaArrayType);
    Py_VISIT(st->QuantizedArrayType);
    Py_VISIT(st->SparseArrayType);
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
    Py_CLEAR(st->TensorRefType);
    Py_CLEAR(st->TensorInfoType);
    Py_CLEAR(st->OrderedDict);
    Py_CLEAR(st->Counter);
    Py_CLEAR(st->helpers);
    Py_CLEAR(st->OpaqueType);
    Py_CLEAR(st->MetaArrayType);
    Py_CLEAR(st->QuantizedArrayType);
    Py_CLEAR(st->SparseArrayType);
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
    /* No Py_mod_gil slot: a free-threaded build keeps the GIL on while torchfree is imported. The
     * per-call Loader is not shared, but the lazy numpy/ml_dtypes setup and the module state's
     * caches are filled without a lock (issue 19). */
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
