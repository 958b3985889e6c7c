/* pickscan_py.c - _core.pickle_globals: the static pickle walk of pickscan.c,
 * called from Python. The walk touches no Python object, so it runs with the
 * GIL released over the held buffer. */
#include "module.h"

#include "pickscan.h"

static const char *const limit_names[] = {"pickle_bytes", "memo", "stack", "marks",
                                          "records", "name", "ndim", "total_bytes"};

/* limits: None, a dict of overrides (names of LIMITS) or load_zip's 8-tuple. */
static int parse_limits(PyObject *limits, TfLimits *lim) {
    TfLimits d = TF_LIMITS_DEFAULT;
    uint64_t *fields[8] = {&lim->pickle_bytes, &lim->memo, &lim->stack, &lim->marks,
                           &lim->records, &lim->name, &lim->ndim, &lim->total_bytes};
    *lim = d;
    if (limits == NULL || limits == Py_None) return 0;
    if (PyTuple_Check(limits) && PyTuple_GET_SIZE(limits) == 8) {
        for (int i = 0; i < 8; i++) {
            unsigned long long v = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(limits, i));
            if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
            *fields[i] = v;
        }
        return 0;
    }
    if (!PyDict_Check(limits)) {
        PyErr_SetString(PyExc_TypeError, "limits must be a dict of LIMITS names to ints");
        return -1;
    }
    Py_ssize_t pos = 0, used = 0;
    PyObject *k, *v;
    for (int i = 0; i < 8; i++) {
        PyObject *o = PyDict_GetItemString(limits, limit_names[i]); /* borrowed */
        if (o == NULL) continue;
        unsigned long long x = PyLong_AsUnsignedLongLong(o);
        if (x == (unsigned long long)-1 && PyErr_Occurred()) return -1;
        *fields[i] = x;
        used++;
    }
    if (used != PyDict_GET_SIZE(limits)) {
        while (PyDict_Next(limits, &pos, &k, &v)) {
            int known = 0;
            for (int i = 0; i < 8; i++)
                known |= PyUnicode_Check(k) && PyUnicode_CompareWithASCIIString(k, limit_names[i]) == 0;
            if (!known) {
                PyErr_Format(PyExc_TypeError, "unknown limit %R", k);
                return -1;
            }
        }
    }
    return 0;
}

PyObject *mod_pickle_globals(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"", "limits", NULL};
    ModuleState *st = PyModule_GetState(module);
    Py_buffer view;
    PyObject *limits = Py_None, *result = NULL, *seen = NULL;
    TfLimits lim;
    PickScan scan;
    TfErr err;
    TfStatus rc;
    char *canon = NULL;
    size_t canon_cap = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|$O:pickle_globals", kwlist, &view, &limits)) return NULL;
    if (parse_limits(limits, &lim) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    memset(&err, 0, sizeof err);
    Py_BEGIN_ALLOW_THREADS
    rc = pickscan_run((const uint8_t *)view.buf, (size_t)view.len, &lim, &scan, &err);
    Py_END_ALLOW_THREADS
    if (rc != TF_OK) {
        if (rc == TF_ERR_NOMEM)
            PyErr_NoMemory();
        else
            PyErr_Format(rc == TF_ERR_LIMIT ? st->LimitError : st->UnpicklingError, "%s (pickle byte offset %llu)",
                         err.detail, (unsigned long long)err.offset);
        goto done;
    }
    result = PyList_New(0);
    seen = PySet_New(NULL);
    if (result == NULL || seen == NULL) goto error;
    for (size_t i = 0; i < scan.n_globals; i++) {
        const PickGlobal *g = &scan.globals[i];
        PyObject *s;
        if (g->module == NULL) {
            s = PyUnicode_FromString("?");
        } else {
            GlobalHit hit;
            size_t need = g->module_len + g->name_len + 32; /* the 2->3 renames grow a name by 10 bytes at most */
            if (need > canon_cap) {
                char *c = PyMem_Realloc(canon, need);
                if (c == NULL) {
                    PyErr_NoMemory();
                    goto error;
                }
                canon = c;
                canon_cap = need;
            }
            globals_lookup(g->module, g->module_len, g->name, g->name_len, g->protocol < 3, &hit, canon,
                           canon_cap);
            s = PyUnicode_FromString(canon); /* printable ASCII: checked by the walk */
        }
        if (s == NULL) goto error;
        int have = PySet_Contains(seen, s);
        if (have < 0 || (!have && (PySet_Add(seen, s) < 0 || PyList_Append(result, s) < 0))) {
            Py_DECREF(s);
            goto error;
        }
        Py_DECREF(s);
    }
    goto done;
error:
    Py_CLEAR(result);
done:
    if (rc == TF_OK) pickscan_free(&scan);
    PyMem_Free(canon);
    Py_XDECREF(seen);
    PyBuffer_Release(&view);
    return result;
}
