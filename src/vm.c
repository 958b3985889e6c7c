/* vm.c - the restricted pickle VM: the loop, the stack, marks and memo, and the opcodes that
 * make plain values (numbers, strings, bytes, tuples, lists, dicts, sets, memo puts and gets).
 *
 * Shape after CPython's _pickle.c load(): vm_step reads one opcode and dispatches it, one line
 * per opcode, to a small op_* function; all state is in the Loader. Differences that make it
 * safe: GLOBAL never imports (globals.c resolves names to our own ids), REDUCE / NEWOBJ / BUILD
 * run only our own code (tensor.c) or callables the user trusted through safe_globals,
 * APPEND/SETITEM only touch exact lists/dicts (and, with pickle's semantics, instances of
 * classes trusted through safe_globals) -- those live in vm_objects.c --, the memo is dense, and
 * every length is checked against the input and the limits before anything is allocated
 * (opcode arguments are decoded by oparg.h, shared with the static scanner pickscan.c). No C
 * recursion: nesting lives on the VM stack. torch's per-tensor sequence may run fused
 * (fastpath.c). */
#include "oparg.h"
#include "vm_impl.h"

/* ---- marks and memo gets (the stack and memo primitives are in vm_impl.h, vm_stack.c) ---- */

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

static PyObject *vm_pop_tuple_n(Loader *L, Py_ssize_t n) {
    if (L->sp - vm_fence(L) < n) {
        tf_raise(L, L->st->UnpicklingError, "pickle stack underflow");
        return NULL;
    }
    return vm_pop_tuple_from(L, L->sp - n);
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

/* ---- reading the input --------------------------------------------------- */

#if defined(__GNUC__)
#define VM_COLD __attribute__((noinline, cold))
#else
#define VM_COLD
#endif

/* The error for an argument oparg.h could not read (a truncation or a negative count). -1. */
static VM_COLD int vm_arg_error(Loader *L, int op, OaStatus st, uint64_t need) {
    if (st == OA_NEGATIVE) return tf_raise(L, L->st->UnpicklingError, "%s", oa_negative_msg(op));
    return tf_raise(L, L->st->UnpicklingError, "pickle data was truncated (%s needs %llu more bytes)",
                    opcode_name(op), (unsigned long long)need);
}

/* op's w-byte little-endian unsigned argument. */
VM_HOT int vm_arg(Loader *L, int op, int w, uint64_t *v) {
    uint64_t need = 0;
    if (TF_LIKELY(oa_uint(&L->pk, L->pk_end, w, v, &need) == OA_OK)) return 0;
    vm_arg_error(L, op, OA_TRUNCATED, need);
    return -1;
}

/* op's n-byte argument (*at: its bytes). */
VM_HOT int vm_take(Loader *L, int op, uint64_t n, const uint8_t **at) {
    uint64_t need = 0;
    if (TF_LIKELY(oa_take(&L->pk, L->pk_end, n, at, &need) == OA_OK)) return 0;
    vm_arg_error(L, op, OA_TRUNCATED, need);
    return -1;
}

/* op's counted argument (LONG1/4, the strings, bytes, bytearray): *n bytes at *data. */
VM_HOT int vm_counted(Loader *L, int op, const uint8_t **data, uint64_t *n) {
    uint64_t need = 0;
    OaStatus st = oa_counted(op, &L->pk, L->pk_end, data, n, &need);
    if (TF_LIKELY(st == OA_OK)) return 0;
    vm_arg_error(L, op, st, need);
    return -1;
}

/* Read a text line (without the newline) for the protocol-0 opcodes. */
static int read_line(Loader *L, int op, const char **s, Py_ssize_t *len) {
    const uint8_t *line;
    size_t n;
    OaStatus st = oa_line(&L->pk, L->pk_end, L->lim.name, &line, &n);
    if (st == OA_TRUNCATED)
        return tf_raise(L, L->st->UnpicklingError, "pickle data was truncated (%s needs a line)",
                        opcode_name(op));
    if (st == OA_TOO_LONG) return tf_raise(L, L->st->LimitError, "%s line longer than the limit", opcode_name(op));
    *s = (const char *)line;
    *len = (Py_ssize_t)n;
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

/* ---- text (protocol 0) arguments ----------------------------------------------- */

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
    char buf[OA_FLOAT_MAX + 1];
    if (n > OA_FLOAT_MAX) return tf_raise(L, L->st->UnpicklingError, "FLOAT literal too long");
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
    if (!oa_text_index((const uint8_t *)s, (size_t)n, &idx))
        return tf_raise(L, L->st->UnpicklingError, "invalid %s index", opcode_name(op));
    if (op == OP_GET) return vm_memo_get(L, idx);
    PyObject *top = vm_top(L);
    return top ? vm_memo_put(L, idx, top) : -1;
}

/* STRING: a quoted Python literal with backslash escapes. */
static int op_text_string(Loader *L, int op) {
    const char *s;
    Py_ssize_t n;
    if (read_line(L, op, &s, &n) < 0) return -1;
    if (!oa_string_quoted((const uint8_t *)s, (size_t)n))
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

/* ---- stack and marks ------------------------------------------------------------ */

static int op_proto(Loader *L) {
    uint64_t v;
    if (vm_arg(L, OP_PROTO, 1, &v) < 0) return -1;
    if (v > 5) return tf_raise(L, L->st->UnpicklingError, "unsupported pickle protocol %d", (int)v);
    L->proto = (int)v;
    return 0;
}

/* FRAME: its length is only checked (the frame's opcodes follow as usual). */
static int op_frame(Loader *L) {
    uint64_t n;
    if (vm_arg(L, OP_FRAME, 8, &n) < 0) return -1;
    if (oa_left(L->pk, L->pk_end) < n) return vm_arg_error(L, OP_FRAME, OA_TRUNCATED, n);
    return 0;
}

VM_HOT int op_mark(Loader *L) {
    if (L->hooks_fast && L->sp > vm_fence(L) && is_globalref(L, L->stack[L->sp - 1]) &&
        ((GlobalRef *)L->stack[L->sp - 1])->id == G_REBUILD_TENSOR_V2 &&
        ((GlobalRef *)L->stack[L->sp - 1])->obj == NULL && L->format == FMT_ZIP) {
        int done = L->hook.fuse_tensor(L);
        if (done != 0) return done < 0 ? -1 : 0;
    }
    return vm_mark(L);
}

static int op_pop(Loader *L) {
    if (L->nmarks && L->sp == vm_fence(L)) { /* POP of a mark, as pickle does */
        L->nmarks--;
        return 0;
    }
    PyObject *o = vm_pop(L);
    if (o == NULL) return -1;
    Py_DECREF(o);
    return 0;
}

static int op_pop_mark(Loader *L) {
    Py_ssize_t start = vm_pop_mark(L);
    if (start < 0) return -1;
    while (L->sp > start) Py_DECREF(L->stack[--L->sp]);
    return 0;
}

static int op_dup(Loader *L) {
    PyObject *o = vm_top(L);
    return o ? vm_push(L, Py_NewRef(o)) : -1;
}

/* ---- numbers, strings, bytes ------------------------------------------------------ */

/* BININT1 / BININT2 (w 1, 2: unsigned) and BININT (w 4: signed). */
VM_HOT int op_binint(Loader *L, int op, int w) {
    uint64_t v;
    if (vm_arg(L, op, w, &v) < 0) return -1;
    return vm_push(L, PyLong_FromLong(w == 4 ? (long)oa_i32(v) : (long)v));
}

/* LONG1 / LONG4: a little-endian two's complement int. */
static int op_binlong(Loader *L, int op) {
    const uint8_t *p;
    uint64_t n;
    if (vm_counted(L, op, &p, &n) < 0) return -1;
    return vm_push(L, long_from_le(p, (size_t)n));
}

static int op_binfloat(Loader *L) {
    const uint8_t *p;
    if (vm_take(L, OP_BINFLOAT, 8, &p) < 0) return -1;
    return vm_push(L, PyFloat_FromDouble(oa_f64be(p)));
}

/* SHORT_BINUNICODE / BINUNICODE / BINUNICODE8. */
VM_HOT int op_binunicode(Loader *L, int op) {
    const uint8_t *p;
    uint64_t n;
    if (vm_counted(L, op, &p, &n) < 0) return -1;
    return vm_push(L, decode_str(L, p, (size_t)n));
}

/* UNICODE: raw-unicode-escape text. */
static int op_unicode(Loader *L) {
    const char *s;
    Py_ssize_t len;
    if (read_line(L, OP_UNICODE, &s, &len) < 0) return -1;
    PyObject *v = PyUnicode_DecodeRawUnicodeEscape(s, len, NULL);
    if (v == NULL) {
        PyErr_Clear();
        return tf_raise(L, L->st->UnpicklingError, "invalid UNICODE literal");
    }
    return vm_push(L, v);
}

/* SHORT_BINSTRING / BINSTRING: a Python 2 str. */
static int op_binstring(Loader *L, int op) {
    const uint8_t *p;
    uint64_t n;
    if (vm_counted(L, op, &p, &n) < 0) return -1;
    return vm_push(L, decode_py2_str(L, p, (size_t)n));
}

/* SHORT_BINBYTES / BINBYTES / BINBYTES8 and BYTEARRAY8. */
static int op_binbytes(Loader *L, int op) {
    const uint8_t *p;
    uint64_t n;
    if (vm_counted(L, op, &p, &n) < 0) return -1;
    if (op == OP_BYTEARRAY8) return vm_push(L, PyByteArray_FromStringAndSize((const char *)p, (Py_ssize_t)n));
    return vm_push(L, PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n));
}

/* ---- tuples, lists, dicts, sets ----------------------------------------------------- */

/* The values above the last MARK, popped as a tuple (the mark too). New reference or NULL. */
static inline PyObject *pop_marked_tuple(Loader *L) {
    Py_ssize_t start = vm_pop_mark(L);
    return start < 0 ? NULL : vm_pop_tuple_from(L, start);
}

static int op_tuple(Loader *L) {
    if (L->hooks_fast) {
        int done = L->hook.fuse_persid(L);
        if (done != 0) return done < 0 ? -1 : 0;
    }
    PyObject *t = pop_marked_tuple(L);
    return t == NULL ? -1 : vm_push(L, t);
}

static int op_list(Loader *L) {
    PyObject *t = pop_marked_tuple(L);
    if (t == NULL) return -1;
    PyObject *l = PySequence_List(t);
    Py_DECREF(t);
    return vm_push(L, l);
}

static int op_dict(Loader *L) {
    Py_ssize_t start = vm_pop_mark(L);
    if (start < 0) return -1;
    PyObject *d = PyDict_New();
    if (d == NULL) return -1;
    if (vm_setitems_into(L, d, start) < 0) {
        Py_DECREF(d);
        return -1;
    }
    return vm_push(L, d);
}

static int op_frozenset(Loader *L) {
    PyObject *t = pop_marked_tuple(L);
    if (t == NULL) return -1;
    PyObject *fs = PyFrozenSet_New(t);
    Py_DECREF(t);
    if (fs == NULL) {
        PyErr_Clear();
        return tf_raise(L, L->st->UnpicklingError, "FROZENSET with an unhashable item");
    }
    return vm_push(L, fs);
}

/* ---- memo ----------------------------------------------------------------------------- */

/* BINPUT (w 1) / LONG_BINPUT (w 4). */
VM_HOT int op_binput(Loader *L, int op, int w) {
    uint64_t idx;
    if (vm_arg(L, op, w, &idx) < 0) return -1;
    PyObject *top = vm_top(L);
    return top ? vm_memo_put(L, idx, top) : -1;
}

static int op_memoize(Loader *L) {
    PyObject *top = vm_top(L);
    return top ? vm_memo_put(L, (uint64_t)L->memo_len, top) : -1;
}

/* BINGET (w 1) / LONG_BINGET (w 4). */
VM_HOT int op_binget(Loader *L, int op, int w) {
    uint64_t idx;
    if (vm_arg(L, op, w, &idx) < 0) return -1;
    return vm_memo_get(L, idx);
}

/* ---- globals, calls, persistent ids ------------------------------------------------------ */

/* GLOBAL, and INST (MARK args... INST: class(*args)): the module and name are text lines. */
static int op_global(Loader *L, int op) {
    const char *m, *nm;
    Py_ssize_t ml, nl;
    if (read_line(L, op, &m, &ml) < 0 || read_line(L, op, &nm, &nl) < 0) return -1;
    if (op == OP_GLOBAL) return vm_global(L, m, (size_t)ml, nm, (size_t)nl);
    Py_ssize_t start = vm_pop_mark(L);
    if (start < 0) return -1;
    PyObject *args = vm_pop_tuple_from(L, start);
    if (args == NULL) return -1;
    if (vm_global(L, m, (size_t)ml, nm, (size_t)nl) < 0) {
        Py_DECREF(args);
        return -1;
    }
    return vm_push(L, args) < 0 ? -1 : vm_reduce(L, OP_REDUCE);
}

static int op_stack_global(Loader *L) {
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
        r = (m && nm) ? vm_global(L, m, (size_t)ml, nm, (size_t)nl) : -1;
    }
    Py_DECREF(name);
    Py_DECREF(module);
    return r;
}

/* MARK class args... OBJ */
static int op_obj(Loader *L) {
    Py_ssize_t start = vm_pop_mark(L);
    if (start < 0) return -1;
    if (L->sp - start < 1) return tf_raise(L, L->st->UnpicklingError, "OBJ without a class");
    PyObject *args = vm_pop_tuple_from(L, start + 1);
    if (args == NULL) return -1;
    return vm_push(L, args) < 0 ? -1 : vm_reduce(L, OP_REDUCE);
}

static int op_binpersid(Loader *L) {
    PyObject *pid = vm_pop(L);
    if (pid == NULL) return -1;
    PyObject *s = L->hook.load_persid(L, pid);
    Py_DECREF(pid);
    return vm_push(L, s);
}

/* Opcodes a checkpoint never needs and the VM refuses. */
static VM_COLD int op_refused(Loader *L, int op) {
    switch (op) {
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

/* ---- the loop -------------------------------------------------------------- */

/* One opcode (its byte already read), as _pickle.c's load(): one line per opcode. */
VM_HOT int vm_step(Loader *L, int op, int *stop) {
    switch (op) {
    case OP_PROTO: return op_proto(L);
    case OP_FRAME: return op_frame(L);
    case OP_MARK: return op_mark(L);
    case OP_STOP: *stop = 1; return 0;
    case OP_POP: return op_pop(L);
    case OP_POP_MARK: return op_pop_mark(L);
    case OP_DUP: return op_dup(L);
    case OP_NONE: return vm_push(L, Py_NewRef(Py_None));
    case OP_NEWTRUE: return vm_push(L, Py_NewRef(Py_True));
    case OP_NEWFALSE: return vm_push(L, Py_NewRef(Py_False));
    case OP_BININT: return op_binint(L, OP_BININT, 4);
    case OP_BININT1: return op_binint(L, OP_BININT1, 1);
    case OP_BININT2: return op_binint(L, OP_BININT2, 2);
    case OP_LONG1: return op_binlong(L, OP_LONG1);
    case OP_LONG4: return op_binlong(L, OP_LONG4);
    case OP_INT: case OP_LONG: return op_text_int(L, op);
    case OP_FLOAT: return op_text_float(L, op);
    case OP_BINFLOAT: return op_binfloat(L);
    case OP_SHORT_BINUNICODE: return op_binunicode(L, OP_SHORT_BINUNICODE);
    case OP_BINUNICODE: return op_binunicode(L, OP_BINUNICODE);
    case OP_BINUNICODE8: return op_binunicode(L, OP_BINUNICODE8);
    case OP_UNICODE: return op_unicode(L);
    case OP_SHORT_BINSTRING: return op_binstring(L, OP_SHORT_BINSTRING);
    case OP_BINSTRING: return op_binstring(L, OP_BINSTRING);
    case OP_STRING: return op_text_string(L, op);
    case OP_SHORT_BINBYTES: return op_binbytes(L, OP_SHORT_BINBYTES);
    case OP_BINBYTES: return op_binbytes(L, OP_BINBYTES);
    case OP_BINBYTES8: return op_binbytes(L, OP_BINBYTES8);
    case OP_BYTEARRAY8: return op_binbytes(L, OP_BYTEARRAY8);
    case OP_EMPTY_TUPLE: return vm_push(L, PyTuple_New(0));
    case OP_TUPLE1: case OP_TUPLE2: case OP_TUPLE3: return vm_push(L, vm_pop_tuple_n(L, op - OP_TUPLE1 + 1));
    case OP_TUPLE: return op_tuple(L);
    case OP_EMPTY_LIST: return vm_push(L, PyList_New(0));
    case OP_EMPTY_DICT: return vm_push(L, PyDict_New());
    case OP_EMPTY_SET: return vm_push(L, PySet_New(NULL));
    case OP_LIST: return op_list(L);
    case OP_DICT: return op_dict(L);
    case OP_FROZENSET: return op_frozenset(L);
    case OP_APPEND: case OP_SETITEM: return vm_single_fill(L, op);
    case OP_APPENDS: case OP_SETITEMS: case OP_ADDITEMS: return vm_marked_fill(L, op);
    case OP_BINPUT: return op_binput(L, OP_BINPUT, 1);
    case OP_LONG_BINPUT: return op_binput(L, OP_LONG_BINPUT, 4);
    case OP_MEMOIZE: return op_memoize(L);
    case OP_BINGET: return op_binget(L, OP_BINGET, 1);
    case OP_LONG_BINGET: return op_binget(L, OP_LONG_BINGET, 4);
    case OP_GET: case OP_PUT: return op_text_get_put(L, op);
    case OP_GLOBAL: case OP_INST: return op_global(L, op);
    case OP_STACK_GLOBAL: return op_stack_global(L);
    case OP_OBJ: return op_obj(L);
    case OP_REDUCE: case OP_NEWOBJ: case OP_NEWOBJ_EX: return vm_reduce(L, op);
    case OP_BUILD: return vm_build(L);
    case OP_BINPERSID: return op_binpersid(L);
    default: return op_refused(L, op); /* PERSID, EXT1/2/4, the buffers, unknown bytes */
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
