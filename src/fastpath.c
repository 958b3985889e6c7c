/* fastpath.c - torch's per-tensor opcode sequence, run fused by the VM (vm.c calls in at MARK,
 * TUPLE and the REDUCE of OrderedDict()): the tensor is made from the pickle's bytes without the
 * intermediate objects (the backward-hooks OrderedDict, the argument tuples, the persistent id
 * tuple). Anything unexpected returns 0 and the VM runs the opcodes one by one. */
#include "rebuild.h"
#include "vm_impl.h"

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
int rebuild_v2_fused(Loader *L) {
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
int persid_fused(Loader *L) {
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
int tensor_fused(Loader *L) {
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

