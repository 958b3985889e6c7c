/* pickscan_py.c - _core.pickle_globals: the static pickle walk of pickscan.c,
 * called from Python. The walk touches no Python object, so it runs with the
 * GIL released over the held buffer. */
#include "state.h"

#include "pickscan.h"

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
    if (tf_parse_limits(limits, &lim) < 0) {
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
