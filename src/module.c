/* module.c - the roof: torchfree._core's method table and init (multi-phase, per-module state
 * in state.c, heap types and exceptions made in exec). Nothing else: every method lives in the
 * file of its concern. */
#include "crc32.h"
#include "load.h"
#include "pickscan.h"
#include "rebuild.h"
#include "save.h"
#include "scaninfo.h"

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
     "load_zip($module, /, src, size, *, mode, require_map, map_location, weights_only,"
     " safe_globals, encoding, limits)\n--\n\nLoad a zip checkpoint (internal: use torchfree.load)."},
    {"load_legacy", (PyCFunction)(void (*)(void))mod_load_legacy, METH_VARARGS | METH_KEYWORDS,
     "load_legacy($module, /, src, size, *, mode, require_map, map_location, weights_only,"
     " safe_globals, encoding, limits)\n--\n\nLoad a legacy-stream or tar checkpoint held in a buffer"
     " (internal: use torchfree.load)."},
    {"_set_helpers", mod_set_helpers, METH_VARARGS, mod_set_helpers_doc},
    {"map_location", mod_map_location, METH_O,
     "map_location($module, m, /)\n--\n\nmap_location normalized as loads take it: None, a location string, a dict "
     "of str to str or a callable; TypeError for anything else (internal)."},
    {"map_target", mod_map_target, METH_VARARGS,
     "map_target($module, m, saved, /)\n--\n\nThe location tag map_location m sends a storage saved at `saved` to; "
     "None for a callable (internal)."},
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

PyMODINIT_FUNC PyInit__core(void) {
    tf_core_module.m_methods = core_methods;
    tf_core_module.m_slots = core_slots;
    return PyModuleDef_Init(&tf_core_module);
}
