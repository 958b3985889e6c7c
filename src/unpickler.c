/* unpickler.c - the restricted pickle VM.
 *
 * Shape after CPython's _pickle.c load(): one dispatch loop, one handler per
 * opcode family, all state in the Loader. Differences that make it safe:
 * GLOBAL never imports (globals.c resolves names to our own ids), REDUCE /
 * NEWOBJ / BUILD run only our own code (tensor.c) or callables the user
 * trusted through safe_globals, APPEND/SETITEM only touch exact lists/dicts
 * (and, with pickle's semantics, instances of classes trusted through safe_globals),
 * the memo is dense, and every length is checked against the input and the
 * limits before anything is allocated. No C recursion: nesting lives on the
 * VM stack. */
#include "module.h"
#include "opcodes.h"

/* ---- stack, marks, memo ------------------------------------------------ */

#if defined(__GNUC__)
#define VM_HOT static inline __attribute__((always_inline))
#else
#define VM_HOT static inline
#endif

/* Push, stealing the reference (NULL: an exception is already set). */
VM_HOT int vm_push(Loader *L, PyObject *o) {
    if (o == NULL) return -1;
    if (TF_UNLIKELY(L->sp == L->stack_cap)) {
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
    }
    L->stack[L->sp++] = o;
    return 0;
}

/* Lowest stack index usable by the current opcode (the last mark, or 0). */
VM_HOT Py_ssize_t vm_fence(Loader *L) { return L->nmarks ? L->marks[L->nmarks - 1] : 0; }

/* Pop, returning a new reference (NULL + exception on underflow). */
static PyObject *vm_pop(Loader *L) {
    if (TF_UNLIKELY(L->sp <= vm_fence(L))) {
        tf_raise(L, L->st->UnpicklingError, "pickle stack underflow");
        return NULL;
    }
    return L->stack[--L->sp];
}

/* Borrowed reference to the top (NULL + exception when empty). */
VM_HOT PyObject *vm_top(Loader *L) {
    if (TF_UNLIKELY(L->sp <= vm_fence(L))) {
        tf_raise(L, L->st->UnpicklingError, "pickle stack underflow");
        return NULL;
    }
    return L->stack[L->sp - 1];
}

static int vm_mark(Loader *L) {
    if (TF_UNLIKELY(L->nmarks == L->marks_cap)) {
        if ((uint64_t)L->marks_cap >= L->lim.marks)
            return tf_raise(L, L->st->LimitError, "pickle nesting exceeds the limit of %llu MARKs",
                            (unsigned long long)L->lim.marks);
        Py_ssize_t cap = L->marks_cap ? L->marks_cap * 2 : 32;
        if ((uint64_t)cap > L->lim.marks) cap = (Py_ssize_t)L->lim.marks;
        Py_ssize_t *m = PyMem_Realloc(L->marks, (size_t)cap * sizeof(Py_ssize_t));
        if (m == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        L->marks = m;
        L->marks_cap = cap;
    }
    L->marks[L->nmarks++] = L->sp;
    return 0;
}

/* Pop the last mark; return its stack index or -1 with an exception set. */
static Py_ssize_t vm_pop_mark(Loader *L) {
    if (L->nmarks == 0) {
        tf_raise(L, L->st->UnpicklingError, "no MARK on the stack");
        return -1;
    }
    return L->marks[--L->nmarks];
}

/* Items from stack[start] to the top as a tuple (new reference); pops them. */
static PyObject *vm_pop_tuple_from(Loader *L, Py_ssize_t start) {
    Py_ssize_t n = L->sp - start;
    PyObject *t = PyTuple_New(n);
    if (t == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(t, i, L->stack[start + i]);
    L->sp = start;
    return t;
}

static PyObject *vm_pop_tuple_n(Loader *L, Py_ssize_t n) {
    if (L->sp - vm_fence(L) < n) {
        tf_raise(L, L->st->UnpicklingError, "pickle stack underflow");
        return NULL;
    }
    return vm_pop_tuple_from(L, L->sp - n);
}

/* memo[idx] = o (o may be NULL: a slot left empty, see rebuild_v2_fused) */
static int vm_memo_put(Loader *L, uint64_t idx, PyObject *o) {
    if (TF_LIKELY(idx == (uint64_t)L->memo_len && L->memo_len < L->memo_cap)) { /* the next slot */
        L->memo[L->memo_len++] = Py_XNewRef(o);
        return 0;
    }
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

static int vm_memo_get(Loader *L, uint64_t idx) {
    if (idx >= (uint64_t)L->memo_len || L->memo[idx] == NULL) {
        /* a slot left empty by rebuild_v2_fused: vm_run runs the pickle again without fusing */
        if (L->hooks_fused) L->hooks_escaped = 1;
        return tf_raise(L, L->st->UnpicklingError, "memo slot %llu is not set",
                        (unsigned long long)idx);
    }
    return vm_push(L, Py_NewRef(L->memo[idx]));
}

/* After BUILD replaced a placeholder by a new object, point the memo slots
 * that held the placeholder (normally the last one) at the new object. */
static void vm_memo_replace(Loader *L, PyObject *old, PyObject *new_) {
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

static int is_globalref(Loader *L, PyObject *o) { return Py_TYPE(o) == L->st->GlobalRefType; }

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

/* ---- reading the input --------------------------------------------------- */

#define NEED(n)                                                                          \
    do {                                                                                 \
        if (TF_UNLIKELY((uint64_t)(L->pk_end - L->pk) < (uint64_t)(n)))                 \
            return tf_raise(L, L->st->UnpicklingError,                                   \
                            "pickle data was truncated (%s needs %llu more bytes)",      \
                            opcode_name(op), (unsigned long long)(n));                   \
    } while (0)

/* Read a text line (without the newline) for the protocol-0 opcodes. */
static int read_line(Loader *L, int op, const char **s, Py_ssize_t *len) {
    const uint8_t *nl = memchr(L->pk, '\n', (size_t)(L->pk_end - L->pk));
    if (nl == NULL)
        return tf_raise(L, L->st->UnpicklingError, "pickle data was truncated (%s needs a line)",
                        opcode_name(op));
    *s = (const char *)L->pk;
    *len = nl - L->pk;
    if ((uint64_t)*len > L->lim.name * 64)
        return tf_raise(L, L->st->LimitError, "%s line longer than the limit", opcode_name(op));
    L->pk = nl + 1;
    return 0;
}

static PyObject *decode_str(Loader *L, const uint8_t *p, size_t n) {
    if (n <= 64) { /* short ASCII (keys, names): no decoder needed */
        uint8_t any = 0;
        for (size_t i = 0; i < n; i++) any |= p[i];
        if (!(any & 0x80)) {
            PyObject *u = PyUnicode_New((Py_ssize_t)n, 127);
            if (u != NULL) memcpy(PyUnicode_1BYTE_DATA(u), p, n);
            return u;
        }
    }
    PyObject *s = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, "surrogatepass");
    if (s == NULL) {
        tf_raise_from(L, L->st->UnpicklingError, "invalid UTF-8 string");
    }
    return s;
}

/* Python 2 str: decoded with `encoding` (NULL: kept as bytes). */
static PyObject *decode_py2_str(Loader *L, const uint8_t *p, size_t n) {
    if (L->encoding == NULL) return PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
    const char *enc = PyUnicode_AsUTF8(L->encoding);
    if (enc == NULL) return NULL;
    PyObject *s = PyUnicode_Decode((const char *)p, (Py_ssize_t)n, enc, "strict");
    if (s == NULL) {
        tf_raise_from(L, L->st->UnpicklingError, "cannot decode a Python 2 string with encoding %s", enc);
    }
    return s;
}

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

static int do_global(Loader *L, const char *module, size_t mlen, const char *name, size_t nlen) {
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
        loader_need_dtype(L, hit.arg) < 0)
        return -1;
    PyObject *value = tensor_global_value(L, &hit, canon);
    if (value != NULL) return vm_push(L, value);
    if (PyErr_Occurred()) return -1;
    return vm_push(L, globalref_new(L, hit.id, hit.arg, canon, NULL));
}

/* ---- calls: REDUCE, NEWOBJ, BUILD ------------------------------------------ */

static int is_opaque(Loader *L, PyObject *o) { return (PyObject *)Py_TYPE(o) == L->st->OpaqueType; }

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
        return tensor_reduce(L, g, args);
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
/* Skip a memo put (BINPUT, LONG_BINPUT, MEMOIZE) at p, if one is there. */
static const uint8_t *skip_put(const uint8_t *p, const uint8_t *end) {
    if (p < end && *p == OP_MEMOIZE) return p + 1;
    if (p + 1 < end && *p == OP_BINPUT) return p + 2;
    if (p + 4 < end && *p == OP_LONG_BINPUT) return p + 5;
    return p;
}

/* The memo put at p (BINPUT, LONG_BINPUT or MEMOIZE; p == q: none) with an empty slot. */
static inline int memo_put_empty(Loader *L, const uint8_t *p, const uint8_t *q) {
    if (p == q) return 0;
    uint64_t idx = *p == OP_MEMOIZE ? (uint64_t)L->memo_len : *p == OP_BINPUT ? p[1] : tf_le32(p + 1);
    if (TF_LIKELY(idx == (uint64_t)L->memo_len && L->memo_len < L->memo_cap)) {
        L->memo[L->memo_len++] = NULL;
        return 0;
    }
    L->op_offset = (uint64_t)(p - L->pk_start);
    return vm_memo_put(L, idx, NULL);
}

/* torch pickles every tensor as
 *   GLOBAL _rebuild_tensor_v2, MARK, storage, offset, size, stride, requires_grad,
 *   GLOBAL OrderedDict, EMPTY_TUPLE, REDUCE, [put], TUPLE, [put], REDUCE
 * and making (and freeing) an OrderedDict of backward_hooks that _rebuild_tensor_v2 ignores,
 * then a 6-tuple of arguments, is a tenth of a load. At the REDUCE of OrderedDict(): when the
 * next opcodes are [put] TUPLE [put] REDUCE, five items lie above the last MARK and our own
 * _rebuild_tensor_v2 lies below it, the tensor is rebuilt from the five items at once and the
 * two memo slots (the hooks dict, the tuple) are left empty. Only a memo GET could see them
 * again (torch's pickles never do that): vm_memo_get notices an empty slot, and vm_run then runs
 * the pickle again without fusing. 1: done, 0: not this pattern, -1: error. */
static int rebuild_v2_fused(Loader *L) {
    const uint8_t *end = L->pk_end, *p0 = L->pk;
    const uint8_t *p1 = skip_put(p0, end);
    if (p1 >= end || *p1 != OP_TUPLE) return 0;
    const uint8_t *p2 = skip_put(p1 + 1, end);
    if (p2 >= end || *p2 != OP_REDUCE) return 0;
    if (L->nmarks < 1) return 0;
    Py_ssize_t start = L->marks[L->nmarks - 1];
    Py_ssize_t below = L->nmarks >= 2 ? L->marks[L->nmarks - 2] : 0; /* the frame under the MARK */
    if (L->sp - start != 5 || start - 1 < below) return 0;
    PyObject *f = L->stack[start - 1];
    if (!is_globalref(L, f) || ((GlobalRef *)f)->id != G_REBUILD_TENSOR_V2 || ((GlobalRef *)f)->obj != NULL)
        return 0;
    if (memo_put_empty(L, p0, p1) < 0 || memo_put_empty(L, p1 + 1, p2) < 0) return -1;
    L->hooks_fused = 1;
    L->op_offset = (uint64_t)(p2 - L->pk_start);
    PyObject **a = L->stack + start;
    PyObject *r = tensor_strided(L, a[0], a[1], a[2], a[3], -1);
    for (Py_ssize_t i = start - 1; i < L->sp; i++) Py_DECREF(L->stack[i]);
    L->sp = start - 1;
    L->nmarks--;
    L->pk = p2 + 1;
    return vm_push(L, r) < 0 ? -1 : 1;
}

/* At TUPLE: when [put] BINPERSID follows, a zip checkpoint's persistent id is looked up from the
 * items above the MARK, without the tuple; its memo slot is left empty (see rebuild_v2_fused).
 * 1: done, 0: not this pattern, -1: error. */
static int persid_fused(Loader *L) {
    const uint8_t *p0 = L->pk, *p1 = skip_put(p0, L->pk_end);
    if (p1 >= L->pk_end || *p1 != OP_BINPERSID || L->format != FMT_ZIP || L->nmarks < 1) return 0;
    Py_ssize_t start = L->marks[L->nmarks - 1];
    if (L->sp - start < 1) return 0;
    if (memo_put_empty(L, p0, p1) < 0) return -1;
    L->hooks_fused = 1;
    L->op_offset = (uint64_t)(p1 - L->pk_start);
    PyObject *r = storage_persistent_items(L, L->stack + start, L->sp - start);
    for (Py_ssize_t i = start; i < L->sp; i++) Py_DECREF(L->stack[i]);
    L->sp = start;
    L->nmarks--;
    L->pk = p1 + 1;
    return vm_push(L, r) < 0 ? -1 : 1;
}

/* ---- a whole tensor at once ----------------------------------------------------
 *
 * torch's tensors (rebuild_v2_fused above) come as
 *   <_rebuild_tensor_v2> MARK MARK 'storage' <storage type> key location numel TUPLE [put] BINPERSID
 *   offset <size tuple> <stride tuple> NEWFALSE|NEWTRUE <OrderedDict> EMPTY_TUPLE REDUCE [put]
 *   TUPLE [put] REDUCE
 * with the str and the globals memoized after their first use. At the first MARK, when
 * _rebuild_tensor_v2 is on top, the whole sequence is read from the bytes: the integers
 * stay C integers and no tuple is made. Anything else (another opcode, a negative or huge
 * int, a global seen for the first time, a memo GET of a slot this sequence puts) leaves
 * the VM to run the opcodes one by one, which reports any error. Only the key (and the
 * 'storage' and location strs when they are not memo GETs) become objects; every other
 * memo slot put by the sequence is left empty, as in rebuild_v2_fused. */

#define FZ_MAXPUTS 12

typedef struct {
    Loader *L;
    const uint8_t *p, *end;
    uint64_t sim_len; /* memo_len once the puts so far are done */
    int nputs, nowned;
    struct {
        const uint8_t *at;
        uint64_t idx;
        PyObject *obj; /* NULL: left empty */
    } puts[FZ_MAXPUTS];
    PyObject *owned[4];
} Fz;

/* An optional memo put (of obj, borrowed: owned by the Fz or NULL). 0: a put the VM
 * should do itself (a gap, a slot below the memo's end, too many). */
VM_HOT int fz_put(Fz *z, PyObject *obj) {
    const uint8_t *p = z->p;
    uint64_t idx;
    if (p >= z->end) return 1;
    if (*p == OP_BINPUT && z->end - p >= 2) {
        idx = p[1];
        z->p = p + 2;
    } else if (*p == OP_LONG_BINPUT && z->end - p >= 5) {
        idx = tf_le32(p + 1);
        z->p = p + 5;
    } else if (*p == OP_MEMOIZE) {
        idx = z->sim_len;
        z->p = p + 1;
    } else {
        return 1;
    }
    if (idx != z->sim_len || idx >= z->L->lim.memo || z->nputs == FZ_MAXPUTS) return 0;
    z->puts[z->nputs].at = p;
    z->puts[z->nputs].idx = idx;
    z->puts[z->nputs].obj = obj;
    z->nputs++;
    z->sim_len++;
    return 1;
}

/* A memo GET of a slot set before the sequence (borrowed). */
VM_HOT PyObject *fz_get(Fz *z) {
    const uint8_t *p = z->p;
    uint64_t idx;
    if (p < z->end && *p == OP_BINGET && z->end - p >= 2) {
        idx = p[1];
        z->p = p + 2;
    } else if (p < z->end && *p == OP_LONG_BINGET && z->end - p >= 5) {
        idx = tf_le32(p + 1);
        z->p = p + 5;
    } else {
        return NULL;
    }
    /* the sequence's own puts are at memo_len and above: such a GET is left to the VM */
    if (idx >= (uint64_t)z->L->memo_len) return NULL;
    return z->L->memo[idx];
}

/* A str: a memo GET, or a short ASCII literal (then maybe put). Borrowed (owned by z or the memo). */
VM_HOT PyObject *fz_str(Fz *z) {
    const uint8_t *p = z->p;
    if (p < z->end && (*p == OP_BINGET || *p == OP_LONG_BINGET)) {
        PyObject *o = fz_get(z);
        return o != NULL && PyUnicode_CheckExact(o) ? o : NULL;
    }
    size_t n;
    if (p < z->end && *p == OP_SHORT_BINUNICODE && z->end - p >= 2) {
        n = p[1];
        p += 2;
    } else if (p < z->end && *p == OP_BINUNICODE && z->end - p >= 5) {
        n = tf_le32(p + 1);
        p += 5;
    } else {
        return NULL;
    }
    if (n > 64 || (size_t)(z->end - p) < n || z->nowned == (int)(sizeof z->owned / sizeof z->owned[0]))
        return NULL;
    uint8_t any = 0;
    for (size_t i = 0; i < n; i++) any |= p[i];
    if (any & 0x80) return NULL;
    PyObject *u = PyUnicode_New((Py_ssize_t)n, 127);
    if (u == NULL) {
        PyErr_Clear(); /* the VM meets the same string and reports it */
        return NULL;
    }
    memcpy(PyUnicode_1BYTE_DATA(u), p, n);
    z->owned[z->nowned++] = u;
    z->p = p + n;
    return fz_put(z, u) ? u : NULL;
}

/* An int >= 0 (BININT1, BININT2, BININT, LONG1 of at most 8 bytes). */
VM_HOT int fz_int(Fz *z, int64_t *v) {
    const uint8_t *p = z->p, *end = z->end;
    if (p >= end) return 0;
    switch (*p) {
    case OP_BININT1:
        if (end - p < 2) return 0;
        *v = p[1];
        z->p = p + 2;
        return 1;
    case OP_BININT2:
        if (end - p < 3) return 0;
        *v = tf_le16(p + 1);
        z->p = p + 3;
        return 1;
    case OP_BININT: {
        if (end - p < 5) return 0;
        int32_t x = (int32_t)tf_le32(p + 1);
        if (x < 0) return 0;
        *v = x;
        z->p = p + 5;
        return 1;
    }
    case OP_LONG1: {
        if (end - p < 2) return 0;
        size_t n = p[1];
        if (n > 8 || (size_t)(end - p - 2) < n || (n > 0 && (p[1 + n] & 0x80))) return 0;
        uint64_t x = 0;
        for (size_t i = n; i > 0; i--) x = (x << 8) | p[1 + i];
        *v = (int64_t)x;
        z->p = p + 2 + n;
        return 1;
    }
    default:
        return 0;
    }
}

/* A tuple of ints >= 0: EMPTY_TUPLE, 1-3 ints and TUPLE1-3, or MARK ints TUPLE; then maybe put. */
VM_HOT int fz_dims(Fz *z, int64_t *out, int *nd) {
    const uint8_t *p = z->p;
    int n = 0;
    if (p >= z->end) return 0;
    if (*p == OP_EMPTY_TUPLE) {
        z->p = p + 1;
    } else if (*p == OP_MARK) {
        z->p = p + 1;
        while (z->p < z->end && *z->p != OP_TUPLE) {
            if (n == NPY_MAXDIMS || !fz_int(z, &out[n])) return 0;
            n++;
        }
        if (z->p >= z->end) return 0;
        z->p++;
    } else {
        while (n < 3 && fz_int(z, &out[n])) n++;
        if (n == 0 || z->p >= z->end || *z->p != OP_TUPLE1 + n - 1) return 0;
        z->p++;
    }
    if ((uint64_t)n > z->L->lim.ndim) return 0;
    *nd = n;
    return fz_put(z, NULL);
}

VM_HOT int fz_op(Fz *z, int op) {
    if (z->p >= z->end || *z->p != op) return 0;
    z->p++;
    return 1;
}

static int tensor_fused_parse(Fz *z, int *dtype, PyObject **key, PyObject **loc, int64_t *numel,
                              const uint8_t **persid_at, int64_t *offset, int *nd, int64_t *size,
                              int64_t *stride, const uint8_t **reduce_at) {
    Loader *L = z->L;
    if (!fz_op(z, OP_MARK)) return 0;
    PyObject *tag = fz_str(z);
    if (tag == NULL || PyUnicode_GET_LENGTH(tag) != 7 || PyUnicode_KIND(tag) != PyUnicode_1BYTE_KIND ||
        memcmp(PyUnicode_1BYTE_DATA(tag), "storage", 7) != 0)
        return 0;
    PyObject *type = fz_get(z);
    if (type == NULL || !is_globalref(L, type) || ((GlobalRef *)type)->obj != NULL) return 0;
    int id = ((GlobalRef *)type)->id;
    if (id == G_STORAGE)
        *dtype = ((GlobalRef *)type)->arg;
    else if (id == G_UNTYPED_STORAGE || id == G_TYPED_STORAGE)
        *dtype = DT_UINT8;
    else
        return 0;
    if ((*key = fz_str(z)) == NULL || (*loc = fz_str(z)) == NULL || !fz_int(z, numel)) return 0;
    if (!fz_op(z, OP_TUPLE) || !fz_put(z, NULL)) return 0;
    *persid_at = z->p;
    if (!fz_op(z, OP_BINPERSID) || !fz_int(z, offset)) return 0;
    int nds;
    if (!fz_dims(z, size, nd) || !fz_dims(z, stride, &nds) || *nd != nds) return 0;
    if (!fz_op(z, OP_NEWFALSE) && !fz_op(z, OP_NEWTRUE)) return 0;
    PyObject *od = fz_get(z);
    if (od == NULL || !is_globalref(L, od) || ((GlobalRef *)od)->id != G_ORDERED_DICT ||
        ((GlobalRef *)od)->obj != NULL)
        return 0;
    if (!fz_op(z, OP_EMPTY_TUPLE) || !fz_op(z, OP_REDUCE) || !fz_put(z, NULL) || !fz_op(z, OP_TUPLE) ||
        !fz_put(z, NULL))
        return 0;
    *reduce_at = z->p;
    return fz_op(z, OP_REDUCE);
}

/* At MARK with our _rebuild_tensor_v2 on top. 1: done, 0: not this pattern, -1: error. */
static int tensor_fused(Loader *L) {
    Fz z;
    z.L = L;
    z.p = L->pk;
    z.end = L->pk_end;
    z.sim_len = (uint64_t)L->memo_len;
    z.nputs = z.nowned = 0;
    int dtype = 0, nd = 0;
    PyObject *key = NULL, *loc = NULL;
    int64_t numel = 0, offset = 0, size[NPY_MAXDIMS + 1], stride[NPY_MAXDIMS + 1];
    const uint8_t *persid_at = NULL, *reduce_at = NULL;
    int r = tensor_fused_parse(&z, &dtype, &key, &loc, &numel, &persid_at, &offset, &nd, size, stride, &reduce_at);
    if (r) {
        /* the puts, in order (the sequence's GETs read older slots only) */
        Py_INCREF(key);
        Py_INCREF(loc);
        for (int i = 0; i < z.nputs && r > 0; i++) {
            if (TF_LIKELY(z.puts[i].idx == (uint64_t)L->memo_len && L->memo_len < L->memo_cap)) {
                L->memo[L->memo_len++] = Py_XNewRef(z.puts[i].obj);
            } else {
                L->op_offset = (uint64_t)(z.puts[i].at - L->pk_start);
                if (vm_memo_put(L, z.puts[i].idx, z.puts[i].obj) < 0) r = -1;
            }
        }
        L->hooks_fused = 1;
        PyObject *storage = NULL, *t = NULL;
        if (r > 0) {
            L->op_offset = (uint64_t)(persid_at - L->pk_start);
            storage = storage_get(L, dtype, key, loc, numel);
        }
        if (storage != NULL) {
            L->op_offset = (uint64_t)(reduce_at - L->pk_start);
            t = tensor_strided_dims(L, storage, offset, nd, size, stride);
            Py_DECREF(storage);
        }
        Py_DECREF(key);
        Py_DECREF(loc);
        if (t == NULL) {
            r = -1;
        } else {
            Py_DECREF(L->stack[--L->sp]); /* _rebuild_tensor_v2 */
            L->stack[L->sp++] = t;
            L->pk = z.p;
        }
    }
    for (int i = 0; i < z.nowned; i++) Py_DECREF(z.owned[i]);
    return r;
}

static int op_reduce(Loader *L, int op) {
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
        int done = rebuild_v2_fused(L);
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

static int op_build(Loader *L) {
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
        PyObject *res = tensor_build(L, obj, state);
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

static int setitems_into(Loader *L, PyObject *target, Py_ssize_t start) {
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
static int op_marked_fill(Loader *L, int op) {
    Py_ssize_t start = vm_pop_mark(L);
    if (start < 0) return -1;
    if (start < 1 || start - 1 < vm_fence(L))
        return tf_raise(L, L->st->UnpicklingError, "%s without a target", opcode_name(op));
    PyObject *target = L->stack[start - 1];
    if (op == OP_SETITEMS) return setitems_into(L, target, start);
    if (op == OP_APPENDS) return appends_into(L, target, start);
    return additems_into(L, target, start);
}

static int op_single_fill(Loader *L, int op) {
    Py_ssize_t need = op == OP_SETITEM ? 3 : 2;
    if (L->sp - vm_fence(L) < need) return tf_raise(L, L->st->UnpicklingError, "pickle stack underflow");
    Py_ssize_t start = L->sp - need + 1;
    PyObject *target = L->stack[start - 1];
    if (op == OP_SETITEM) return setitems_into(L, target, start);
    return appends_into(L, target, start);
}

/* ---- numbers ------------------------------------------------------------- */

static PyObject *long_from_le(const uint8_t *p, size_t n) {
    if (n == 0) return PyLong_FromLong(0);
    return _PyLong_FromByteArray(p, n, 1, 1);
}

static int op_text_int(Loader *L, int op) {
    const char *s;
    Py_ssize_t n;
    if (read_line(L, op, &s, &n) < 0) return -1;
    if (op == OP_INT && n == 2 && s[0] == '0' && (s[1] == '0' || s[1] == '1'))
        return vm_push(L, PyBool_FromLong(s[1] == '1'));
    if (op == OP_LONG && n > 0 && s[n - 1] == 'L') n--;
    char *buf = PyMem_Malloc((size_t)n + 1);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(buf, s, (size_t)n);
    buf[n] = 0;
    char *end = NULL;
    PyObject *v = PyLong_FromString(buf, &end, 10);
    int bad = v != NULL && end != buf + n;
    PyMem_Free(buf);
    if (v == NULL || bad) {
        Py_XDECREF(v);
        PyErr_Clear();
        return tf_raise(L, L->st->UnpicklingError, "invalid %s literal", opcode_name(op));
    }
    return vm_push(L, v);
}

static int op_text_float(Loader *L, int op) {
    const char *s;
    Py_ssize_t n;
    if (read_line(L, op, &s, &n) < 0) return -1;
    char buf[512];
    if (n >= (Py_ssize_t)sizeof(buf)) return tf_raise(L, L->st->UnpicklingError, "FLOAT literal too long");
    memcpy(buf, s, (size_t)n);
    buf[n] = 0;
    char *end = NULL;
    double d = PyOS_string_to_double(buf, &end, PyExc_OverflowError);
    if ((d == -1.0 && PyErr_Occurred()) || end != buf + n) {
        PyErr_Clear();
        return tf_raise(L, L->st->UnpicklingError, "invalid FLOAT literal");
    }
    return vm_push(L, PyFloat_FromDouble(d));
}

static int op_text_get_put(Loader *L, int op) {
    const char *s;
    Py_ssize_t n;
    if (read_line(L, op, &s, &n) < 0) return -1;
    uint64_t idx = 0;
    if (n == 0 || n > 18) return tf_raise(L, L->st->UnpicklingError, "invalid %s index", opcode_name(op));
    for (Py_ssize_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return tf_raise(L, L->st->UnpicklingError, "invalid %s index", opcode_name(op));
        idx = idx * 10 + (uint64_t)(s[i] - '0');
    }
    if (op == OP_GET) return vm_memo_get(L, idx);
    PyObject *top = vm_top(L);
    return top ? vm_memo_put(L, idx, top) : -1;
}

/* STRING: a quoted Python literal with backslash escapes. */
static int op_text_string(Loader *L, int op) {
    const char *s;
    Py_ssize_t n;
    if (read_line(L, op, &s, &n) < 0) return -1;
    if (n < 2 || (s[0] != '\'' && s[0] != '"') || s[n - 1] != s[0])
        return tf_raise(L, L->st->UnpicklingError, "the STRING opcode argument must be quoted");
    PyObject *b = PyBytes_DecodeEscape(s + 1, n - 2, NULL, 0, NULL);
    if (b == NULL) {
        PyErr_Clear();
        return tf_raise(L, L->st->UnpicklingError, "invalid STRING literal");
    }
    PyObject *v = decode_py2_str(L, (const uint8_t *)PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
    Py_DECREF(b);
    return vm_push(L, v);
}

/* ---- the loop -------------------------------------------------------------- */

VM_HOT int vm_step(Loader *L, int op, int *stop) {
    const uint8_t *p;
    uint64_t n;
    switch (op) {
    case OP_PROTO:
        NEED(1);
        if (*L->pk > 5) return tf_raise(L, L->st->UnpicklingError, "unsupported pickle protocol %d", *L->pk);
        L->proto = *L->pk++;
        return 0;
    case OP_FRAME:
        NEED(8);
        n = tf_le64(L->pk);
        L->pk += 8;
        NEED(n);
        return 0;
    case OP_MARK:
        if (L->hooks_fast && L->sp > vm_fence(L) && is_globalref(L, L->stack[L->sp - 1]) &&
            ((GlobalRef *)L->stack[L->sp - 1])->id == G_REBUILD_TENSOR_V2 &&
            ((GlobalRef *)L->stack[L->sp - 1])->obj == NULL && L->format == FMT_ZIP) {
            int done = tensor_fused(L);
            if (done != 0) return done < 0 ? -1 : 0;
        }
        return vm_mark(L);
    case OP_STOP:
        *stop = 1;
        return 0;
    case OP_POP: {
        if (L->nmarks && L->sp == vm_fence(L)) { /* POP of a mark, as pickle does */
            L->nmarks--;
            return 0;
        }
        PyObject *o = vm_pop(L);
        if (o == NULL) return -1;
        Py_DECREF(o);
        return 0;
    }
    case OP_POP_MARK: {
        Py_ssize_t start = vm_pop_mark(L);
        if (start < 0) return -1;
        while (L->sp > start) Py_DECREF(L->stack[--L->sp]);
        return 0;
    }
    case OP_DUP: {
        PyObject *o = vm_top(L);
        return o ? vm_push(L, Py_NewRef(o)) : -1;
    }
    case OP_NONE:
        return vm_push(L, Py_NewRef(Py_None));
    case OP_NEWTRUE:
        return vm_push(L, Py_NewRef(Py_True));
    case OP_NEWFALSE:
        return vm_push(L, Py_NewRef(Py_False));
    case OP_BININT:
        NEED(4);
        p = L->pk;
        L->pk += 4;
        return vm_push(L, PyLong_FromLong((long)(int32_t)tf_le32(p)));
    case OP_BININT1:
        NEED(1);
        return vm_push(L, PyLong_FromLong(*L->pk++));
    case OP_BININT2:
        NEED(2);
        p = L->pk;
        L->pk += 2;
        return vm_push(L, PyLong_FromLong(tf_le16(p)));
    case OP_LONG1:
        NEED(1);
        n = *L->pk++;
        NEED(n);
        p = L->pk;
        L->pk += n;
        return vm_push(L, long_from_le(p, n));
    case OP_LONG4: {
        NEED(4);
        int32_t len = (int32_t)tf_le32(L->pk);
        L->pk += 4;
        if (len < 0) return tf_raise(L, L->st->UnpicklingError, "LONG4 with a negative byte count");
        NEED((uint64_t)len);
        p = L->pk;
        L->pk += len;
        return vm_push(L, long_from_le(p, (size_t)len));
    }
    case OP_INT:
    case OP_LONG:
        return op_text_int(L, op);
    case OP_FLOAT:
        return op_text_float(L, op);
    case OP_BINFLOAT: {
        NEED(8);
        double d = PyFloat_Unpack8((const char *)L->pk, 0);
        L->pk += 8;
        if (d == -1.0 && PyErr_Occurred()) return -1;
        return vm_push(L, PyFloat_FromDouble(d));
    }
    case OP_SHORT_BINUNICODE:
        NEED(1);
        n = *L->pk++;
        goto unicode;
    case OP_BINUNICODE:
        NEED(4);
        n = tf_le32(L->pk);
        L->pk += 4;
        goto unicode;
    case OP_BINUNICODE8:
        NEED(8);
        n = tf_le64(L->pk);
        L->pk += 8;
    unicode:
        NEED(n);
        p = L->pk;
        L->pk += n;
        return vm_push(L, decode_str(L, p, (size_t)n));
    case OP_UNICODE: {
        const char *s;
        Py_ssize_t len;
        if (read_line(L, op, &s, &len) < 0) return -1;
        PyObject *v = PyUnicode_DecodeRawUnicodeEscape(s, len, NULL);
        if (v == NULL) {
            PyErr_Clear();
            return tf_raise(L, L->st->UnpicklingError, "invalid UNICODE literal");
        }
        return vm_push(L, v);
    }
    case OP_SHORT_BINSTRING:
        NEED(1);
        n = *L->pk++;
        goto py2str;
    case OP_BINSTRING: {
        NEED(4);
        int32_t len = (int32_t)tf_le32(L->pk);
        L->pk += 4;
        if (len < 0) return tf_raise(L, L->st->UnpicklingError, "BINSTRING with a negative length");
        n = (uint64_t)len;
    }
    py2str:
        NEED(n);
        p = L->pk;
        L->pk += n;
        return vm_push(L, decode_py2_str(L, p, (size_t)n));
    case OP_STRING:
        return op_text_string(L, op);
    case OP_SHORT_BINBYTES:
        NEED(1);
        n = *L->pk++;
        goto bytes;
    case OP_BINBYTES:
        NEED(4);
        n = tf_le32(L->pk);
        L->pk += 4;
        goto bytes;
    case OP_BINBYTES8:
        NEED(8);
        n = tf_le64(L->pk);
        L->pk += 8;
    bytes:
        NEED(n);
        p = L->pk;
        L->pk += n;
        return vm_push(L, PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n));
    case OP_BYTEARRAY8:
        NEED(8);
        n = tf_le64(L->pk);
        L->pk += 8;
        NEED(n);
        p = L->pk;
        L->pk += n;
        return vm_push(L, PyByteArray_FromStringAndSize((const char *)p, (Py_ssize_t)n));
    case OP_EMPTY_TUPLE:
        return vm_push(L, PyTuple_New(0));
    case OP_TUPLE1:
    case OP_TUPLE2:
    case OP_TUPLE3:
        return vm_push(L, vm_pop_tuple_n(L, op - OP_TUPLE1 + 1));
    case OP_TUPLE: {
        if (L->hooks_fast) {
            int done = persid_fused(L);
            if (done != 0) return done < 0 ? -1 : 0;
        }
        Py_ssize_t start = vm_pop_mark(L);
        return start < 0 ? -1 : vm_push(L, vm_pop_tuple_from(L, start));
    }
    case OP_EMPTY_LIST:
        return vm_push(L, PyList_New(0));
    case OP_EMPTY_DICT:
        return vm_push(L, PyDict_New());
    case OP_EMPTY_SET:
        return vm_push(L, PySet_New(NULL));
    case OP_LIST: {
        Py_ssize_t start = vm_pop_mark(L);
        if (start < 0) return -1;
        PyObject *t = vm_pop_tuple_from(L, start);
        if (t == NULL) return -1;
        PyObject *l = PySequence_List(t);
        Py_DECREF(t);
        return vm_push(L, l);
    }
    case OP_DICT: {
        Py_ssize_t start = vm_pop_mark(L);
        if (start < 0) return -1;
        PyObject *d = PyDict_New();
        if (d == NULL) return -1;
        if (setitems_into(L, d, start) < 0) {
            Py_DECREF(d);
            return -1;
        }
        return vm_push(L, d);
    }
    case OP_FROZENSET: {
        Py_ssize_t start = vm_pop_mark(L);
        if (start < 0) return -1;
        PyObject *t = vm_pop_tuple_from(L, start);
        if (t == NULL) return -1;
        PyObject *fs = PyFrozenSet_New(t);
        Py_DECREF(t);
        if (fs == NULL) {
            PyErr_Clear();
            return tf_raise(L, L->st->UnpicklingError, "FROZENSET with an unhashable item");
        }
        return vm_push(L, fs);
    }
    case OP_APPEND:
    case OP_SETITEM:
        return op_single_fill(L, op);
    case OP_APPENDS:
    case OP_SETITEMS:
    case OP_ADDITEMS:
        return op_marked_fill(L, op);
    case OP_BINPUT:
        NEED(1);
        n = *L->pk++;
        goto put;
    case OP_LONG_BINPUT:
        NEED(4);
        n = tf_le32(L->pk);
        L->pk += 4;
    put: {
        PyObject *top = vm_top(L);
        return top ? vm_memo_put(L, n, top) : -1;
    }
    case OP_MEMOIZE: {
        PyObject *top = vm_top(L);
        return top ? vm_memo_put(L, (uint64_t)L->memo_len, top) : -1;
    }
    case OP_BINGET:
        NEED(1);
        return vm_memo_get(L, *L->pk++);
    case OP_LONG_BINGET:
        NEED(4);
        n = tf_le32(L->pk);
        L->pk += 4;
        return vm_memo_get(L, n);
    case OP_GET:
    case OP_PUT:
        return op_text_get_put(L, op);
    case OP_GLOBAL:
    case OP_INST: {
        const char *m, *nm;
        Py_ssize_t ml, nl;
        if (read_line(L, op, &m, &ml) < 0 || read_line(L, op, &nm, &nl) < 0) return -1;
        if (op == OP_GLOBAL) return do_global(L, m, (size_t)ml, nm, (size_t)nl);
        /* INST: MARK args... then class(*args) */
        Py_ssize_t start = vm_pop_mark(L);
        if (start < 0) return -1;
        PyObject *args = vm_pop_tuple_from(L, start);
        if (args == NULL) return -1;
        if (do_global(L, m, (size_t)ml, nm, (size_t)nl) < 0) {
            Py_DECREF(args);
            return -1;
        }
        return vm_push(L, args) < 0 ? -1 : op_reduce(L, OP_REDUCE);
    }
    case OP_STACK_GLOBAL: {
        PyObject *name = vm_pop(L);
        if (name == NULL) return -1;
        PyObject *module = vm_pop(L);
        if (module == NULL) {
            Py_DECREF(name);
            return -1;
        }
        int r;
        if (!PyUnicode_Check(name) || !PyUnicode_Check(module)) {
            r = tf_raise(L, L->st->UnpicklingError, "STACK_GLOBAL requires str");
        } else {
            Py_ssize_t ml, nl;
            const char *m = PyUnicode_AsUTF8AndSize(module, &ml);
            const char *nm = PyUnicode_AsUTF8AndSize(name, &nl);
            r = (m && nm) ? do_global(L, m, (size_t)ml, nm, (size_t)nl) : -1;
        }
        Py_DECREF(name);
        Py_DECREF(module);
        return r;
    }
    case OP_OBJ: {
        /* MARK class args... OBJ */
        Py_ssize_t start = vm_pop_mark(L);
        if (start < 0) return -1;
        if (L->sp - start < 1) return tf_raise(L, L->st->UnpicklingError, "OBJ without a class");
        PyObject *args = vm_pop_tuple_from(L, start + 1);
        if (args == NULL) return -1;
        return vm_push(L, args) < 0 ? -1 : op_reduce(L, OP_REDUCE);
    }
    case OP_REDUCE:
    case OP_NEWOBJ:
    case OP_NEWOBJ_EX:
        return op_reduce(L, op);
    case OP_BUILD:
        return op_build(L);
    case OP_BINPERSID: {
        PyObject *pid = vm_pop(L);
        if (pid == NULL) return -1;
        PyObject *s = storage_persistent_load(L, pid);
        Py_DECREF(pid);
        return vm_push(L, s);
    }
    case OP_PERSID:
        return tf_raise(L, L->st->UnpicklingError,
                        "text persistent ids (PERSID, protocol 0) cannot name a storage");
    case OP_EXT1:
    case OP_EXT2:
    case OP_EXT4:
        return tf_raise(L, L->st->UnsafeGlobalError,
                        "%s refers to the copyreg extension registry, which torchfree does not consult",
                        opcode_name(op));
    case OP_NEXT_BUFFER:
    case OP_READONLY_BUFFER:
        return tf_raise(L, L->st->UnpicklingError, "%s needs out-of-band buffers, which checkpoints never have",
                        opcode_name(op));
    default:
        return tf_raise(L, L->st->UnpicklingError, "invalid pickle opcode %d", op);
    }
}

PyObject *vm_run_at(Loader *L, const uint8_t *data, size_t len, size_t *used) {
    if (used == NULL && (uint64_t)len > L->lim.pickle_bytes) {
        tf_raise(L, L->st->LimitError, "pickle of %zu bytes exceeds the limit of %llu bytes", len,
                 (unsigned long long)L->lim.pickle_bytes);
        return NULL;
    }
    L->pk_start = L->pk = data;
    L->pk_end = data + len;
    L->proto = 0; /* as a fresh pickle.Unpickler: protocol 0 until a PROTO says otherwise */
    int stop = 0;
    while (!stop) {
        if (L->pk >= L->pk_end) {
            tf_raise(L, L->st->UnpicklingError, "pickle data was truncated (no STOP opcode)");
            return NULL;
        }
        L->op_offset = (uint64_t)(L->pk - L->pk_start);
        if (TF_UNLIKELY(used != NULL && L->op_offset >= L->lim.pickle_bytes)) {
            tf_raise(L, L->st->LimitError, "pickle exceeds the limit of %llu bytes",
                     (unsigned long long)L->lim.pickle_bytes);
            return NULL;
        }
        int op = *L->pk++;
        if (vm_step(L, op, &stop) < 0) return NULL;
    }
    if (used != NULL) {
        *used = (size_t)(L->pk - L->pk_start);
    } else if (L->pk != L->pk_end) {
        tf_raise(L, L->st->UnpicklingError, "%zu bytes after the STOP opcode", (size_t)(L->pk_end - L->pk));
        return NULL;
    }
    if (L->sp - vm_fence(L) < 1) {
        tf_raise(L, L->st->UnpicklingError, "STOP with an empty stack");
        return NULL;
    }
    return L->stack[--L->sp];
}

PyObject *vm_run(Loader *L, const uint8_t *data, size_t len) {
    /* torch mode needs requires_grad from the arguments the fused path skips */
    L->hooks_fast = L->torch == NULL;
    L->hooks_fused = L->hooks_escaped = 0;
    PyObject *r = vm_run_at(L, data, len, NULL);
    if (r == NULL && L->hooks_escaped) {
        /* see rebuild_v2_fused: again, with every OrderedDict and tuple made */
        PyErr_Clear();
        vm_free(L);
        L->hooks_fast = 0;
        r = vm_run_at(L, data, len, NULL);
    }
    L->hooks_fast = L->hooks_fused = 0;
    return r;
}
