/* vm_objects.c - the pickle VM's opcodes that make or fill objects: GLOBAL (resolved by
 * globals.c, never imported), REDUCE / NEWOBJ / NEWOBJ_EX / BUILD (our own code in tensor.c, an
 * inert Opaque, or a callable the user trusted through safe_globals) and the container fills
 * (APPEND(S), SETITEM(S), ADDITEMS: exact lists, dicts and sets, or trusted instances). */
#include "vm_impl.h"

/* ---- GLOBAL ------------------------------------------------------------- */

static PyObject *globalref_new(Loader *L, int id, int arg, const char *canon, PyObject *obj) {
    GlobalRef *g = PyObject_New(GlobalRef, L->st->GlobalRefType);
    if (g == NULL) return NULL;
    g->id = id;
    g->arg = arg;
    g->obj = Py_XNewRef(obj);
    g->canon = PyUnicode_FromString(canon);
    if (g->canon == NULL) {
        Py_DECREF(g);
        return NULL;
    }
    return (PyObject *)g;
}

int vm_global(Loader *L, const char *module, size_t mlen, const char *name, size_t nlen) {
    if (mlen > L->lim.name || nlen > L->lim.name)
        return tf_raise(L, L->st->LimitError, "GLOBAL name longer than the limit of %llu bytes",
                        (unsigned long long)L->lim.name);
    for (size_t i = 0; i < mlen + nlen; i++) {
        unsigned char c = (unsigned char)(i < mlen ? module[i] : name[i - mlen]);
        if (c < 0x20 || c > 0x7e)
            return tf_raise(L, L->st->UnpicklingError, "GLOBAL name has a non-printable or non-ASCII byte");
    }
    GlobalHit hit;
    char canon[2 * 4096 + 34]; /* a Python 2 name's Python 3 name is at most 32 bytes longer */
    /* Python 2 names: pickle maps them in protocol 0-2 pickles only; torch's weights-only
     * unpickler at every protocol (weights_only follows it) */
    globals_lookup(module, mlen, name, nlen, L->proto < 3 || L->weights_only, &hit, canon, sizeof(canon));
    if (L->globals_seen != NULL) {
        PyObject *c = PyUnicode_FromString(canon);
        if (c == NULL || PySet_Add(L->globals_seen, c) < 0) {
            Py_XDECREF(c);
            return -1;
        }
        Py_DECREF(c);
    }
    /* blocked by its name in the file and by the name it maps to (commands -> subprocess) */
    if (L->safe_globals != NULL && !globals_blocked_module(module, mlen) &&
        !globals_blocked_module(canon, strlen(canon))) {
        PyObject *user = PyDict_GetItemString(L->safe_globals, canon); /* borrowed */
        if (user != NULL) return vm_push(L, globalref_new(L, G_UNKNOWN, -1, canon, user));
    }
    int allowed = !L->weights_only || (hit.flags & GF_WEIGHTS_ONLY) ||
                  (L->torchscript && (hit.flags & GF_TORCHSCRIPT));
    if (hit.id == G_UNKNOWN && L->torchscript && globals_torchscript_class(module, mlen)) {
        /* a TorchScript class (module object, scripted class, enum, custom class): its code
         * lives in code/, which is never run; the object stays an inert Opaque with its
         * attribute dict (BUILD state), whatever weights_only says */
        PyObject *args = Py_BuildValue("(s)", canon);
        PyObject *r = tf_call_helper(L, "opaque_global", args);
        Py_XDECREF(args);
        return vm_push(L, r);
    }
    if (hit.id == G_UNKNOWN || !allowed) {
        if (L->weights_only) {
            return tf_raise(L, L->st->UnsafeGlobalError,
                            "Unsupported global: GLOBAL %s is not allowed with weights_only=True; "
                            "pass weights_only=False to get an inert torchfree.Opaque in its place, "
                            "or safe_globals={'%s': ...} if you trust it",
                            canon, canon);
        }
        PyObject *args = Py_BuildValue("(s)", canon);
        PyObject *r = tf_call_helper(L, "opaque_global", args);
        Py_XDECREF(args);
        return vm_push(L, r);
    }
    /* ml_dtypes' descriptors, before a load makes anything of such a dtype; a lazy archive's storage
     * classes leave it to the first array or dtype asked for (scan lists torch's dtype names) */
    if ((hit.id == G_DTYPE || hit.id == G_LEGACY_TENSOR || (hit.id == G_STORAGE && !L->lazy)) && hit.arg >= 0 &&
        tf_load_need_dtype(L, hit.arg) < 0)
        return -1;
    PyObject *value = L->hook.global_value(L, &hit, canon);
    if (value != NULL) return vm_push(L, value);
    if (PyErr_Occurred()) return -1;
    return vm_push(L, globalref_new(L, hit.id, hit.arg, canon, NULL));
}

/* ---- calls: REDUCE, NEWOBJ, BUILD ------------------------------------------ */

/* Wrap a foreign exception from a user's safe global as ours. */
static int reraise_user(Loader *L, const char *what, PyObject *g) {
    PyObject *canon = is_globalref(L, g) ? ((GlobalRef *)g)->canon : NULL;
    return tf_raise_from(L, L->st->UnpicklingError, "%s of %s failed", what,
                         canon ? PyUnicode_AsUTF8(canon) : Py_TYPE(g)->tp_name);
}

/* callable(*args) where callable came from GLOBAL: our code, an Opaque, or
 * a trusted user object. New reference. */
static PyObject *do_call(Loader *L, PyObject *callable, PyObject *args, PyObject *kwargs, int newobj) {
    if (!PyTuple_Check(args)) {
        tf_raise(L, L->st->UnpicklingError, "REDUCE arguments are not a tuple");
        return NULL;
    }
    if (is_globalref(L, callable)) {
        GlobalRef *g = (GlobalRef *)callable;
        if (g->obj != NULL) {
            PyObject *r;
            if (newobj) {
                PyObject *new_ = PyObject_GetAttrString(g->obj, "__new__");
                if (new_ == NULL) {
                    reraise_user(L, "NEWOBJ", callable);
                    return NULL;
                }
                Py_ssize_t n = PyTuple_GET_SIZE(args);
                PyObject *full = PyTuple_New(n + 1);
                if (full == NULL) {
                    Py_DECREF(new_);
                    return NULL;
                }
                PyTuple_SET_ITEM(full, 0, Py_NewRef(g->obj));
                for (Py_ssize_t i = 0; i < n; i++)
                    PyTuple_SET_ITEM(full, i + 1, Py_NewRef(PyTuple_GET_ITEM(args, i)));
                r = PyObject_Call(new_, full, kwargs);
                Py_DECREF(new_);
                Py_DECREF(full);
            } else {
                r = PyObject_Call(g->obj, args, kwargs);
            }
            if (r == NULL) reraise_user(L, newobj ? "NEWOBJ" : "REDUCE", callable);
            return r;
        }
        if (kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0) {
            tf_raise(L, L->st->UnpicklingError, "keyword arguments for %U are not supported", g->canon);
            return NULL;
        }
        return L->hook.reduce(L, g, args);
    }
    if (is_opaque(L, callable)) {
        PyObject *a = PyTuple_Pack(3, callable, args, kwargs ? kwargs : Py_None);
        PyObject *r = tf_call_helper(L, "opaque_call", a);
        Py_XDECREF(a);
        return r;
    }
    tf_raise(L, L->st->UnpicklingError, "REDUCE on a %s, which is not a global",
             Py_TYPE(callable)->tp_name);
    return NULL;
}

/* REDUCE (callable, args), NEWOBJ (cls, args) and NEWOBJ_EX (cls, args, kwargs). */
int vm_reduce(Loader *L, int op) {
    PyObject *kwargs = NULL;
    if (op == OP_NEWOBJ_EX) {
        kwargs = vm_pop(L);
        if (kwargs == NULL) return -1;
        if (!PyDict_Check(kwargs)) {
            Py_DECREF(kwargs);
            return tf_raise(L, L->st->UnpicklingError, "NEWOBJ_EX keyword arguments are not a dict");
        }
    }
    PyObject *args = vm_pop(L);
    if (args == NULL) {
        Py_XDECREF(kwargs);
        return -1;
    }
    PyObject *callable = vm_pop(L);
    if (callable == NULL) {
        Py_DECREF(args);
        Py_XDECREF(kwargs);
        return -1;
    }
    if (L->hooks_fast && op == OP_REDUCE && PyTuple_CheckExact(args) && PyTuple_GET_SIZE(args) == 0 && is_globalref(L, callable) &&
        ((GlobalRef *)callable)->id == G_ORDERED_DICT && ((GlobalRef *)callable)->obj == NULL) {
        int done = L->hook.fuse_rebuild_v2(L);
        if (done != 0) {
            Py_DECREF(callable);
            Py_DECREF(args);
            return done < 0 ? -1 : 0;
        }
    }
    PyObject *r = do_call(L, callable, args, kwargs, op != OP_REDUCE);
    Py_DECREF(callable);
    Py_DECREF(args);
    Py_XDECREF(kwargs);
    return vm_push(L, r);
}

static int build_attrs(Loader *L, PyObject *obj, PyObject *state);

/* BUILD with pickle's own semantics, for objects of a trusted user class:
 * __setstate__ when the class has one, else __dict__ (and slots) updates. */
static int build_user(Loader *L, PyObject *obj, PyObject *state) {
    PyObject *setstate = PyObject_GetAttrString(obj, "__setstate__");
    if (setstate == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
        return build_attrs(L, obj, state);
    }
    PyObject *r = PyObject_CallOneArg(setstate, state);
    Py_DECREF(setstate);
    if (r == NULL) return reraise_user(L, "BUILD", obj);
    Py_DECREF(r);
    return 0;
}

/* setattr(obj, k, v) for every string key of a dict state (OrderedDict _metadata). */
static int build_attrs(Loader *L, PyObject *obj, PyObject *state) {
    if (state == Py_None) return 0;
    PyObject *slots = NULL;
    if (PyTuple_Check(state) && PyTuple_GET_SIZE(state) == 2) {
        slots = PyTuple_GET_ITEM(state, 1);
        state = PyTuple_GET_ITEM(state, 0);
    }
    PyObject *parts[2] = {state, slots};
    for (int k = 0; k < 2; k++) {
        PyObject *d = parts[k];
        if (d == NULL || d == Py_None) continue;
        if (!PyDict_Check(d))
            return tf_raise(L, L->st->UnpicklingError, "BUILD state for %s is not a dict",
                            Py_TYPE(obj)->tp_name);
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(d, &pos, &key, &value)) {
            if (!PyUnicode_Check(key)) {
                /* a Python 2 name read with encoding="bytes": into __dict__ as it is, as pickle does */
                PyObject *dict = PyBytes_Check(key) ? PyObject_GetAttrString(obj, "__dict__") : NULL;
                int r = dict != NULL && PyDict_Check(dict) ? PyDict_SetItem(dict, key, value) : -1;
                Py_XDECREF(dict);
                if (r < 0) {
                    PyErr_Clear();
                    return tf_raise(L, L->st->UnpicklingError, "BUILD attribute name is not a string");
                }
                continue;
            }
            if (PyObject_SetAttr(obj, key, value) < 0) {
                tf_raise_from(L, L->st->UnpicklingError, "cannot set attribute %U on %s", key,
                         Py_TYPE(obj)->tp_name);
                return -1;
            }
        }
    }
    return 0;
}

int vm_build(Loader *L) {
    PyObject *state = vm_pop(L);
    if (state == NULL) return -1;
    PyObject *obj = vm_top(L);
    if (obj == NULL) {
        Py_DECREF(state);
        return -1;
    }
    int r = 0;
    if (PyDict_Check(obj) && !PyDict_CheckExact(obj)) {
        /* OrderedDict / Counter: state sets attributes such as _metadata */
        r = build_attrs(L, obj, state);
    } else if (is_opaque(L, obj)) {
        PyObject *a = PyTuple_Pack(2, obj, state);
        PyObject *res = tf_call_helper(L, "opaque_build", a);
        Py_XDECREF(a);
        r = res == NULL ? -1 : 0;
        Py_XDECREF(res);
    } else {
        PyObject *res = L->hook.build(L, obj, state);
        if (res == NULL) {
            if (PyErr_Occurred()) {
                r = -1;
            } else if (L->safe_globals != NULL) {
                r = build_user(L, obj, state);
            } else {
                r = tf_raise(L, L->st->UnpicklingError,
                             "BUILD on a %s is not allowed (only tensors, OrderedDicts, numpy "
                             "objects and safe_globals types)", Py_TYPE(obj)->tp_name);
            }
        } else if (res != obj) {
            vm_memo_replace(L, obj, res);
            Py_SETREF(L->stack[L->sp - 1], res);
        } else {
            Py_DECREF(res);
        }
    }
    Py_DECREF(state);
    return r;
}

/* ---- containers ---------------------------------------------------------- */

/* 1 when o's class is one the user trusted through safe_globals (exactly that class,
 * as torch checks type(obj) in safe globals): SETITEM/APPEND then get pickle's semantics. */
static int is_trusted_instance(Loader *L, PyObject *o) {
    if (L->safe_globals == NULL) return 0;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(L->safe_globals, &pos, &key, &value))
        if (value == (PyObject *)Py_TYPE(o)) return 1;
    return 0;
}

/* pickle's load_setitems on a trusted object: obj[key] = value through its class. */
static int setitems_user(Loader *L, PyObject *target, Py_ssize_t start) {
    for (Py_ssize_t i = start; i < L->sp; i += 2)
        if (PyObject_SetItem(target, L->stack[i], L->stack[i + 1]) < 0) return reraise_user(L, "SETITEM", target);
    return 0;
}

/* pickle's (_pickle.c's) do_append on a trusted object: extend(items) when the class has
 * extend, else append(item) for each item. */
static int appends_user(Loader *L, PyObject *target, Py_ssize_t start) {
    PyObject *fn = PyObject_GetAttrString(target, "extend");
    if (fn != NULL) {
        PyObject *items = PyList_New(L->sp - start);
        if (items == NULL) {
            Py_DECREF(fn);
            return -1;
        }
        for (Py_ssize_t i = start; i < L->sp; i++) PyList_SET_ITEM(items, i - start, Py_NewRef(L->stack[i]));
        PyObject *r = PyObject_CallOneArg(fn, items);
        Py_DECREF(fn);
        Py_DECREF(items);
        if (r == NULL) return reraise_user(L, "APPEND", target);
        Py_DECREF(r);
        return 0;
    }
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return reraise_user(L, "APPEND", target);
    PyErr_Clear();
    fn = PyObject_GetAttrString(target, "append");
    if (fn == NULL) return reraise_user(L, "APPEND", target);
    for (Py_ssize_t i = start; i < L->sp; i++) {
        PyObject *r = PyObject_CallOneArg(fn, L->stack[i]);
        if (r == NULL) {
            Py_DECREF(fn);
            return reraise_user(L, "APPEND", target);
        }
        Py_DECREF(r);
    }
    Py_DECREF(fn);
    return 0;
}

int vm_setitems_into(Loader *L, PyObject *target, Py_ssize_t start) {
    Py_ssize_t n = L->sp - start;
    if (n % 2 != 0) return tf_raise(L, L->st->UnpicklingError, "SETITEMS with an odd number of items");
    int r = 0;
    if (PyDict_CheckExact(target)) {
        for (Py_ssize_t i = start; i < L->sp && r == 0; i += 2)
            r = PyDict_SetItem(target, L->stack[i], L->stack[i + 1]);
    } else if (PyDict_Check(target) && (PyObject *)Py_TYPE(target) == L->st->OrderedDict) {
        for (Py_ssize_t i = start; i < L->sp && r == 0; i += 2)
            r = PyObject_SetItem(target, L->stack[i], L->stack[i + 1]);
    } else if (PyDict_Check(target) && (PyObject *)Py_TYPE(target) == L->st->Counter) {
        for (Py_ssize_t i = start; i < L->sp && r == 0; i += 2)
            r = PyDict_SetItem(target, L->stack[i], L->stack[i + 1]);
    } else if (is_opaque(L, target)) {
        for (Py_ssize_t i = start; i < L->sp && r == 0; i += 2) {
            PyObject *a = PyTuple_Pack(3, target, L->stack[i], L->stack[i + 1]);
            PyObject *res = tf_call_helper(L, "opaque_setitem", a);
            Py_XDECREF(a);
            r = res ? 0 : -1;
            Py_XDECREF(res);
        }
    } else if (is_trusted_instance(L, target)) {
        if (setitems_user(L, target, start) < 0) return -1;
    } else {
        return tf_raise(L, L->st->UnpicklingError, "SETITEM on a %s (only dicts accept items)",
                        Py_TYPE(target)->tp_name);
    }
    if (r < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            tf_raise_from(L, L->st->UnpicklingError, "SETITEM with an unhashable key");
        }
        return -1;
    }
    for (Py_ssize_t i = start; i < L->sp; i++) Py_DECREF(L->stack[i]);
    L->sp = start;
    return 0;
}

static int appends_into(Loader *L, PyObject *target, Py_ssize_t start) {
    if (PyList_CheckExact(target)) {
        for (Py_ssize_t i = start; i < L->sp; i++)
            if (PyList_Append(target, L->stack[i]) < 0) return -1;
    } else if (is_opaque(L, target)) {
        for (Py_ssize_t i = start; i < L->sp; i++) {
            PyObject *a = PyTuple_Pack(2, target, L->stack[i]);
            PyObject *res = tf_call_helper(L, "opaque_append", a);
            Py_XDECREF(a);
            if (res == NULL) return -1;
            Py_DECREF(res);
        }
    } else if (is_trusted_instance(L, target)) {
        if (appends_user(L, target, start) < 0) return -1;
    } else {
        return tf_raise(L, L->st->UnpicklingError, "APPEND on a %s (only lists accept items)",
                        Py_TYPE(target)->tp_name);
    }
    for (Py_ssize_t i = start; i < L->sp; i++) Py_DECREF(L->stack[i]);
    L->sp = start;
    return 0;
}

static int additems_into(Loader *L, PyObject *target, Py_ssize_t start) {
    if (!PySet_CheckExact(target))
        return tf_raise(L, L->st->UnpicklingError, "ADDITEMS on a %s (only sets accept items)",
                        Py_TYPE(target)->tp_name);
    for (Py_ssize_t i = start; i < L->sp; i++)
        if (PySet_Add(target, L->stack[i]) < 0) {
            tf_raise_from(L, L->st->UnpicklingError, "ADDITEMS with an unhashable item");
            return -1;
        }
    for (Py_ssize_t i = start; i < L->sp; i++) Py_DECREF(L->stack[i]);
    L->sp = start;
    return 0;
}

/* Target of APPENDS/SETITEMS/ADDITEMS sits just below the mark. */
int vm_marked_fill(Loader *L, int op) {
    Py_ssize_t start = vm_pop_mark(L);
    if (start < 0) return -1;
    if (start < 1 || start - 1 < vm_fence(L))
        return tf_raise(L, L->st->UnpicklingError, "%s without a target", opcode_name(op));
    PyObject *target = L->stack[start - 1];
    if (op == OP_SETITEMS) return vm_setitems_into(L, target, start);
    if (op == OP_APPENDS) return appends_into(L, target, start);
    return additems_into(L, target, start);
}

int vm_single_fill(Loader *L, int op) {
    Py_ssize_t need = op == OP_SETITEM ? 3 : 2;
    if (L->sp - vm_fence(L) < need) return tf_raise(L, L->st->UnpicklingError, "pickle stack underflow");
    Py_ssize_t start = L->sp - need + 1;
    PyObject *target = L->stack[start - 1];
    if (op == OP_SETITEM) return vm_setitems_into(L, target, start);
    return appends_into(L, target, start);
}

