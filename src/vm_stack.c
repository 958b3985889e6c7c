/* vm_stack.c - the pickle VM's stack and memo: growing them within the limits, the memo's slow
 * path, freeing them, and the dotted key path of the object being built (read off the stack for
 * error messages: the Loader's key_path hook). Below the opcodes (vm.c, vm_objects.c). */
#include "vm_impl.h"

int vm_grow_stack(Loader *L, PyObject *o) {
    if ((uint64_t)L->stack_cap >= L->lim.stack) {
        Py_DECREF(o);
        return tf_raise(L, L->st->LimitError, "pickle stack exceeds the limit of %llu values",
                        (unsigned long long)L->lim.stack);
    }
    Py_ssize_t cap = L->stack_cap ? L->stack_cap * 2 : 64;
    if ((uint64_t)cap > L->lim.stack) cap = (Py_ssize_t)L->lim.stack;
    PyObject **s = PyMem_Realloc(L->stack, (size_t)cap * sizeof(PyObject *));
    if (s == NULL) {
        Py_DECREF(o);
        PyErr_NoMemory();
        return -1;
    }
    L->stack = s;
    L->stack_cap = cap;
    return 0;
}

/* vm_memo_put past its fast path: a slot already set, a gap, or a memo to grow */
int vm_memo_put_slow(Loader *L, uint64_t idx, PyObject *o) {
    if (idx < (uint64_t)L->memo_len) {
        Py_XSETREF(L->memo[idx], Py_XNewRef(o));
        return 0;
    }
    /* Python 2's cPickle numbers its memo from 1: a few unused slots are allowed (they stay
     * empty), a far index is refused (it would make a huge table) */
    if (idx - (uint64_t)L->memo_len > TF_MEMO_GAP)
        return tf_raise(L, L->st->UnpicklingError,
                        "memo index %llu skips slots (next free slot is %zd): sparse memos are refused",
                        (unsigned long long)idx, L->memo_len);
    if (idx >= L->lim.memo)
        return tf_raise(L, L->st->LimitError, "memo exceeds the limit of %llu slots",
                        (unsigned long long)L->lim.memo);
    if (idx >= (uint64_t)L->memo_cap) {
        Py_ssize_t cap = L->memo_cap ? L->memo_cap * 2 : 64;
        if ((uint64_t)cap > L->lim.memo) cap = (Py_ssize_t)L->lim.memo;
        if ((uint64_t)cap <= idx) cap = (Py_ssize_t)idx + 1;
        PyObject **m = PyMem_Realloc(L->memo, (size_t)cap * sizeof(PyObject *));
        if (m == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        L->memo = m;
        L->memo_cap = cap;
    }
    while ((uint64_t)L->memo_len < idx) L->memo[L->memo_len++] = NULL;
    L->memo[L->memo_len++] = Py_XNewRef(o);
    return 0;
}

/* After BUILD replaced a placeholder by a new object, point the memo slots
 * that held the placeholder (normally the last one) at the new object. */
void vm_memo_replace(Loader *L, PyObject *old, PyObject *new_) {
    Py_ssize_t stop = L->memo_len > 64 ? L->memo_len - 64 : 0;
    for (Py_ssize_t i = L->memo_len - 1; i >= stop; i--) {
        if (L->memo[i] == old) {
            Py_INCREF(new_);
            Py_SETREF(L->memo[i], new_);
        }
    }
}

void vm_free(Loader *L) {
    for (Py_ssize_t i = 0; i < L->sp; i++) Py_DECREF(L->stack[i]);
    for (Py_ssize_t i = 0; i < L->memo_len; i++) Py_XDECREF(L->memo[i]);
    PyMem_Free(L->stack);
    PyMem_Free(L->marks);
    PyMem_Free(L->memo);
    L->stack = NULL;
    L->marks = NULL;
    L->memo = NULL;
    L->sp = L->stack_cap = L->nmarks = L->marks_cap = L->memo_len = L->memo_cap = 0;
}

/* ---- key path for messages ---------------------------------------------- */


static int path_add(PyObject *parts, PyObject *key) {
    PyObject *s = PyUnicode_Check(key) ? Py_NewRef(key) : PyObject_Repr(key);
    if (PyLong_Check(key)) {
        Py_XDECREF(s);
        s = PyObject_Str(key);
    }
    if (s == NULL) return -1;
    int r = PyList_Append(parts, s);
    Py_DECREF(s);
    return r;
}

/* Walk (key, value) pairs of a dict being filled from stack[i] to stack[n]:
 * a key without its value is the one being built; an empty dict value
 * followed by more items is itself being filled by single SETITEMs. */
static int path_dict_pairs(Loader *L, PyObject *parts, Py_ssize_t i, Py_ssize_t n) {
    while (i < n) {
        if (i + 1 >= n) return path_add(parts, L->stack[i]);
        PyObject *v = L->stack[i + 1];
        if (PyDict_Check(v) && PyDict_GET_SIZE(v) == 0 && i + 2 < n && path_add(parts, L->stack[i]) < 0)
            return -1;
        i += 2;
    }
    return 0;
}

/* Best effort from the stack: in each MARK frame the container below the
 * mark is being filled; trailing GlobalRefs are callables whose REDUCE has
 * not run yet, and a container right below the next MARK is unfinished. */
PyObject *vm_key_path(Loader *L) {
    PyObject *parts = PyList_New(0);
    if (parts == NULL) return NULL;
    for (Py_ssize_t f = 0; f <= L->nmarks; f++) {
        Py_ssize_t start = f == 0 ? 0 : L->marks[f - 1];
        Py_ssize_t end = f < L->nmarks ? L->marks[f] : L->sp;
        if (start > L->sp) start = L->sp;
        if (end > L->sp) end = L->sp;
        if (end < start) end = start;
        Py_ssize_t n = end;
        while (n > start && is_globalref(L, L->stack[n - 1])) n--;
        if (f < L->nmarks && n == end && n > start &&
            (PyDict_Check(L->stack[n - 1]) || PyList_Check(L->stack[n - 1])))
            n--;
        PyObject *opener = start > 0 ? L->stack[start - 1] : NULL;
        Py_ssize_t count = n - start;
        int r = 0;
        if (f == 0) {
            if (count >= 2 && PyDict_Check(L->stack[start])) r = path_dict_pairs(L, parts, start + 1, n);
        } else if (opener != NULL && PyDict_Check(opener)) {
            r = path_dict_pairs(L, parts, start, n);
        } else if (opener != NULL && !is_globalref(L, opener)) {
            /* a list being appended to, or a tuple being built */
            Py_ssize_t base = PyList_Check(opener) ? PyList_GET_SIZE(opener) : 0;
            PyObject *idx = PyLong_FromSsize_t(base + count);
            r = idx == NULL ? -1 : path_add(parts, idx);
            Py_XDECREF(idx);
        }
        if (r < 0) goto error;
    }
    PyObject *dot = PyUnicode_FromString(".");
    if (dot == NULL) goto error;
    PyObject *res = PyUnicode_Join(dot, parts);
    Py_DECREF(dot);
    Py_DECREF(parts);
    return res;
error:
    Py_DECREF(parts);
    return NULL;
}

