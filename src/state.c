/* state.c - the base floor of the CPython layer: the module state (its definition, traverse and
 * clear), errors with their positions (through the Loader's key_path hook), the Python helpers,
 * limits, the lazy numpy/ml_dtypes imports and the one classifier of map_location. It calls only
 * the Python-free core and pagedrop.c. */
#define TORCHFREE_STATE_C
#include "loader.h"
#include "pagedrop.h"

#include <stdarg.h>

ModuleState *tf_state_of_type(PyTypeObject *tp) {
    PyObject *m = PyType_GetModuleByDef(tp, &tf_core_module);
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
        PyObject *path = L->hook.key_path != NULL ? L->hook.key_path(L) : NULL;
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

int tf_load_need_dtype(Loader *L, int dt) {
    if (!tf_dtype_needs_import(L->st, dt)) return 0;
    loader_drop_off(L);
    return tf_need_dtype(L->st, dt);
}

/* ---- map_location -------------------------------------------------------------- */

PyObject *tf_map_location(PyObject *m, int *kind) {
    if (m == NULL || m == Py_None) {
        *kind = ML_NONE;
        return Py_NewRef(Py_None);
    }
    if (PyDict_Check(m)) { /* {str(k): v if isinstance(v, str) else str(v)} */
        *kind = ML_DICT;
        PyObject *d = PyDict_New(), *k, *v;
        Py_ssize_t pos = 0;
        while (d != NULL && PyDict_Next(m, &pos, &k, &v)) {
            Py_INCREF(k);
            Py_INCREF(v);
            PyObject *ks = PyObject_Str(k);
            PyObject *vs = ks == NULL ? NULL : PyUnicode_Check(v) ? Py_NewRef(v) : PyObject_Str(v);
            if (vs == NULL || PyDict_SetItem(d, ks, vs) < 0) Py_CLEAR(d);
            Py_XDECREF(ks);
            Py_XDECREF(vs);
            Py_DECREF(k);
            Py_DECREF(v);
        }
        return d;
    }
    *kind = ML_STR;
    if (PyUnicode_Check(m)) return Py_NewRef(m);
    if (PyBytes_Check(m)) return PyUnicode_DecodeASCII(PyBytes_AS_STRING(m), PyBytes_GET_SIZE(m), NULL);
    if (PyCallable_Check(m)) {
        *kind = ML_CALL;
        return Py_NewRef(m);
    }
    int dev = strcmp(_PyType_Name(Py_TYPE(m)), "device") == 0;
    if (!dev) {
        int t = PyObject_HasAttrString(m, "type");
        dev = t && PyObject_HasAttrString(m, "index");
    }
    if (dev) return PyObject_Str(m);
    PyErr_Format(PyExc_TypeError,
                 "map_location must be None, a location string, a torch.device, a dict or a callable, not %s",
                 _PyType_Name(Py_TYPE(m)));
    return NULL;
}

PyObject *tf_map_target(int kind, PyObject *ml, PyObject *saved) {
    if (kind == ML_STR) return Py_NewRef(ml);
    if (kind == ML_DICT) {
        PyObject *v = PyDict_GetItemWithError(ml, saved);
        if (v == NULL) return PyErr_Occurred() ? NULL : Py_NewRef(saved);
        return PyUnicode_Check(v) ? Py_NewRef(v) : PyObject_Str(v);
    }
    return Py_NewRef(saved);
}

const char mod_set_helpers_doc[] = PyDoc_STR(
"_set_helpers($module, helpers, descrs, /)\n--\n\n"
"Register torchfree's own Python helpers and extra dtype descriptors (internal; ml_dtypes'\n"
"ones come from helpers['ml_dtypes_descrs'] on first need).");

PyObject *mod_set_helpers(PyObject *module, PyObject *args) {
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

PyObject *mod_map_location(PyObject *module, PyObject *m) {
    int kind;
    return tf_map_location(m, &kind);
}

PyObject *mod_map_target(PyObject *module, PyObject *args) {
    PyObject *m, *saved;
    int kind;
    if (!PyArg_ParseTuple(args, "OU:map_target", &m, &saved)) return NULL;
    PyObject *ml = tf_map_location(m, &kind);
    if (ml == NULL) return NULL;
    PyObject *r = kind == ML_CALL ? Py_NewRef(Py_None) : tf_map_target(kind, ml, saved);
    Py_DECREF(ml);
    return r;
}

/* ---- the module state ---------------------------------------------------------- */

/* The state's references to objects that may take part in reference cycles: visited and cleared
 * from this one list (the interned str_* names are only cleared). */
#define STATE_REFS(X)                                                                              \
    X(CheckpointError) X(FormatError) X(UnpicklingError) X(UnsafeGlobalError) X(LimitError)         \
    X(GlobalRefType) X(StorageType) X(TensorRefType) X(TensorInfoType) X(OrderedDict) X(Counter)   \
    X(helpers) X(OpaqueType) X(MetaArrayType) X(QuantizedArrayType) X(SparseArrayType)

int tf_state_traverse(PyObject *m, visitproc visit, void *arg) {
    ModuleState *st = PyModule_GetState(m);
#define VISIT_(f) Py_VISIT(st->f);
    STATE_REFS(VISIT_)
#undef VISIT_
    for (int i = 0; i < DT_COUNT; i++) {
        Py_VISIT(st->descr[i]);
        Py_VISIT(st->dtype_value[i]);
    }
    return 0;
}

int tf_state_clear(PyObject *m) {
    ModuleState *st = PyModule_GetState(m);
#define CLEAR_(f) Py_CLEAR(st->f);
    STATE_REFS(CLEAR_)
    CLEAR_(str_storage) CLEAR_(str_meta) CLEAR_(str_metadata_attr) CLEAR_(str_conj) CLEAR_(str_neg)
    CLEAR_(str_shape) CLEAR_(str_dtype)
#undef CLEAR_
    for (int i = 0; i < DT_COUNT; i++) {
        Py_CLEAR(st->descr[i]);
        Py_CLEAR(st->dtype_value[i]);
    }
    return 0;
}

static void state_free(void *m) { tf_state_clear((PyObject *)m); }

struct PyModuleDef tf_core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "torchfree._core",
    .m_doc = "The C core of torchfree: zip reader, restricted unpickler, storages and tensors.",
    .m_size = sizeof(ModuleState),
    .m_methods = NULL, /* module.c's, set by PyInit__core */
    .m_slots = NULL,
    .m_traverse = tf_state_traverse,
    .m_clear = tf_state_clear,
    .m_free = state_free,
};
