/* pickscan.c - Python-free static walk over a pickle (see pickscan.h).
 *
 * The opcode table and every rule here mirror vm_step() in vm.c: opcode
 * arguments are decoded by the same code (oparg.h, every length checked
 * before a read), the same stack fence (the last MARK), the same
 * dense-memo rule, the same limits and the same checks of GLOBAL names. A
 * value on the shadow stack is either a string literal (its bytes in the
 * input) or "anything"; nothing is ever decoded or built. */
#include "pickscan.h"

#include <stdlib.h>

#include "oparg.h"

typedef unsigned long long ull;

/* A shadow value: a string literal of the input, or anything else. */
typedef struct {
    uint64_t off;
    uint64_t len;
    int is_str;
} PsVal;

typedef struct {
    const uint8_t *start, *p, *end;
    TfLimits lim;
    PsVal *stack;
    size_t sp, stack_cap;
    size_t *marks;
    size_t nmarks, marks_cap;
    PsVal *memo;
    size_t memo_len, memo_cap;
    uint64_t op_offset;
    int op;
    PickScan *out;
    TfErr *err;
} Ps;

#define PS_FAIL(status, ...) tf_fail(s->err, (status), s->op_offset, __VA_ARGS__)

/* The error for an argument oparg.h could not read (a truncation or a negative count). */
static TfStatus ps_arg_error(Ps *s, OaStatus st, uint64_t need) {
    if (st == OA_NEGATIVE) return PS_FAIL(TF_ERR_FORMAT, "%s", oa_negative_msg(s->op));
    return PS_FAIL(TF_ERR_FORMAT, "pickle data was truncated (%s needs %llu more bytes)", opcode_name(s->op),
                   (ull)need);
}

/* The opcode's w-byte little-endian unsigned argument. */
static TfStatus ps_arg(Ps *s, int w, uint64_t *v) {
    uint64_t need = 0;
    if (oa_uint(&s->p, s->end, w, v, &need) != OA_OK) return ps_arg_error(s, OA_TRUNCATED, need);
    return TF_OK;
}

/* Grow *buf (elements of size `elem`) to hold at least `need` of them (callers check the limits). */
static TfStatus ps_grow(Ps *s, void **buf, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return TF_OK;
    size_t nc = *cap ? *cap : 64;
    while (nc < need) {
        if (nc > SIZE_MAX / 2 / elem) return PS_FAIL(TF_ERR_NOMEM, "out of memory");
        nc *= 2;
    }
    void *nb = realloc(*buf, nc * elem);
    if (nb == NULL) return PS_FAIL(TF_ERR_NOMEM, "out of memory");
    *buf = nb;
    *cap = nc;
    return TF_OK;
}

static size_t ps_fence(const Ps *s) { return s->nmarks ? s->marks[s->nmarks - 1] : 0; }

static TfStatus ps_push(Ps *s, PsVal v) {
    if (TF_UNLIKELY((uint64_t)s->sp >= s->lim.stack))
        return PS_FAIL(TF_ERR_LIMIT, "pickle stack exceeds the limit of %llu values", (ull)s->lim.stack);
    TfStatus st = ps_grow(s, (void **)&s->stack, &s->stack_cap, s->sp + 1, sizeof(PsVal));
    if (st != TF_OK) return st;
    s->stack[s->sp++] = v;
    if ((uint64_t)s->sp > s->out->max_stack) s->out->max_stack = s->sp;
    return TF_OK;
}

static TfStatus ps_push_any(Ps *s) {
    PsVal v = {0, 0, 0};
    return ps_push(s, v);
}

static TfStatus ps_push_str(Ps *s, const uint8_t *p, uint64_t n) {
    PsVal v = {(uint64_t)(p - s->start), n, 1};
    return ps_push(s, v);
}

/* Pop n values above the fence (the VM's "pickle stack underflow"). */
static TfStatus ps_pop(Ps *s, size_t n) {
    if (s->sp - ps_fence(s) < n)
        return PS_FAIL(TF_ERR_FORMAT, "pickle stack underflow (%s)", opcode_name(s->op));
    s->sp -= n;
    return TF_OK;
}

static TfStatus ps_mark(Ps *s) {
    if ((uint64_t)s->nmarks >= s->lim.marks)
        return PS_FAIL(TF_ERR_LIMIT, "pickle nesting exceeds the limit of %llu MARKs", (ull)s->lim.marks);
    TfStatus st = ps_grow(s, (void **)&s->marks, &s->marks_cap, s->nmarks + 1, sizeof(size_t));
    if (st != TF_OK) return st;
    s->marks[s->nmarks++] = s->sp;
    if ((uint64_t)s->nmarks > s->out->max_marks) s->out->max_marks = s->nmarks;
    return TF_OK;
}

static TfStatus ps_pop_mark(Ps *s, size_t *start) {
    if (s->nmarks == 0)
        return PS_FAIL(TF_ERR_FORMAT, "no MARK on the stack (%s)", opcode_name(s->op));
    *start = s->marks[--s->nmarks];
    return TF_OK;
}

static TfStatus ps_memo_put(Ps *s, uint64_t idx) {
    if (s->sp <= ps_fence(s))
        return PS_FAIL(TF_ERR_FORMAT, "pickle stack underflow (%s)", opcode_name(s->op));
    PsVal top = s->stack[s->sp - 1];
    if (idx < (uint64_t)s->memo_len) {
        s->memo[idx] = top;
        return TF_OK;
    }
    if (idx - (uint64_t)s->memo_len > TF_MEMO_GAP) /* as the VM: a few unused slots only */
        return PS_FAIL(TF_ERR_FORMAT, "memo index %llu skips slots (next free slot is %zu): sparse memos are refused",
                       (ull)idx, s->memo_len);
    if (idx >= s->lim.memo)
        return PS_FAIL(TF_ERR_LIMIT, "memo exceeds the limit of %llu slots", (ull)s->lim.memo);
    TfStatus st = ps_grow(s, (void **)&s->memo, &s->memo_cap, (size_t)idx + 1, sizeof(PsVal));
    if (st != TF_OK) return st;
    while ((uint64_t)s->memo_len < idx) s->memo[s->memo_len++] = (PsVal){0, 0, 0};
    s->memo[s->memo_len++] = top;
    s->out->memo_len = s->memo_len;
    return TF_OK;
}

static TfStatus ps_memo_get(Ps *s, uint64_t idx) {
    if (idx >= (uint64_t)s->memo_len)
        return PS_FAIL(TF_ERR_FORMAT, "memo slot %llu is not set", (ull)idx);
    return ps_push(s, s->memo[idx]);
}

/* A text line without its newline, as read_line() in the VM. */
static TfStatus ps_line(Ps *s, const uint8_t **line, size_t *n) {
    OaStatus st = oa_line(&s->p, s->end, s->lim.name, line, n);
    if (st == OA_TRUNCATED)
        return PS_FAIL(TF_ERR_FORMAT, "pickle data was truncated (%s needs a line)", opcode_name(s->op));
    if (st == OA_TOO_LONG) return PS_FAIL(TF_ERR_LIMIT, "%s line longer than the limit", opcode_name(s->op));
    return TF_OK;
}

/* The VM's do_global checks, then record the name. module NULL: unresolved. */
static TfStatus ps_global(Ps *s, const uint8_t *module, size_t mlen, const uint8_t *name, size_t nlen) {
    if (module != NULL) {
        if ((uint64_t)mlen > s->lim.name || (uint64_t)nlen > s->lim.name)
            return PS_FAIL(TF_ERR_LIMIT, "GLOBAL name longer than the limit of %llu bytes",
                           (ull)s->lim.name);
        for (size_t i = 0; i < mlen + nlen; i++) {
            uint8_t c = i < mlen ? module[i] : name[i - mlen];
            if (c < 0x20 || c > 0x7e)
                return PS_FAIL(TF_ERR_FORMAT, "GLOBAL name has a non-printable or non-ASCII byte");
        }
    }
    PickScan *o = s->out;
    TfStatus st = ps_grow(s, (void **)&o->globals, &o->cap_globals, o->n_globals + 1, sizeof(PickGlobal));
    if (st != TF_OK) return st;
    PickGlobal *g = &o->globals[o->n_globals++];
    g->offset = s->op_offset;
    g->module = (const char *)module;
    g->module_len = module ? mlen : 0;
    g->name = module ? (const char *)name : NULL;
    g->name_len = module ? nlen : 0;
    g->op = (uint8_t)s->op;
    g->protocol = (uint8_t)(o->protocol < 0 ? 0 : o->protocol);
    return TF_OK;
}

/* GET / PUT text index: 1 to 18 decimal digits, as the VM. */
static TfStatus ps_text_index(Ps *s, uint64_t *idx) {
    const uint8_t *l;
    size_t n;
    TfStatus st = ps_line(s, &l, &n);
    if (st != TF_OK) return st;
    if (!oa_text_index(l, n, idx)) return PS_FAIL(TF_ERR_FORMAT, "invalid %s index", opcode_name(s->op));
    return TF_OK;
}

static int has_byte(const uint8_t *p, size_t n, uint8_t c) { return n && memchr(p, c, n) != NULL; }

/* Pop a mark and everything above it, then push one value (TUPLE, LIST, FROZENSET, DICT). */
static TfStatus ps_collapse_mark(Ps *s, int pairs) {
    size_t start = 0;
    TfStatus st = ps_pop_mark(s, &start);
    if (st != TF_OK) return st;
    if (pairs && (s->sp - start) % 2 != 0)
        return PS_FAIL(TF_ERR_FORMAT, "SETITEMS with an odd number of items");
    s->sp = start;
    return ps_push_any(s);
}

/* A counted argument (LONG1/4, the strings, bytes, bytearray): a str literal for the string
 * opcodes (Python 2 strings count as str: they are with the default encoding), else anything. */
static TfStatus ps_counted(Ps *s) {
    const uint8_t *p = NULL;
    uint64_t n = 0, need = 0;
    OaStatus st = oa_counted(s->op, &s->p, s->end, &p, &n, &need);
    if (st != OA_OK) return ps_arg_error(s, st, need);
    if (s->op == OP_SHORT_BINUNICODE || s->op == OP_BINUNICODE || s->op == OP_BINUNICODE8 ||
        s->op == OP_SHORT_BINSTRING || s->op == OP_BINSTRING)
        return ps_push_str(s, p, n);
    return ps_push_any(s);
}

/* An argument of w bytes that is not looked at (BININT*, BINFLOAT). */
static TfStatus ps_fixed(Ps *s, int w) {
    const uint8_t *p;
    uint64_t need = 0;
    if (oa_take(&s->p, s->end, (uint64_t)w, &p, &need) != OA_OK) return ps_arg_error(s, OA_TRUNCATED, need);
    return ps_push_any(s);
}

/* ---- one small function per opcode (or family) that is more than a line ---- */

static TfStatus op_proto(Ps *s) {
    uint64_t n;
    TfStatus st = ps_arg(s, 1, &n);
    if (st != TF_OK) return st;
    if (n > 5) return PS_FAIL(TF_ERR_FORMAT, "unsupported pickle protocol %d", (int)n);
    s->out->protocol = (int)n;
    return TF_OK;
}

static TfStatus op_frame(Ps *s) { /* its length is only checked */
    uint64_t n;
    TfStatus st = ps_arg(s, 8, &n);
    if (st != TF_OK) return st;
    if (oa_left(s->p, s->end) < n) return ps_arg_error(s, OA_TRUNCATED, n);
    return TF_OK;
}

static TfStatus op_pop(Ps *s) {
    if (s->nmarks && s->sp == ps_fence(s)) { /* POP of a mark */
        s->nmarks--;
        return TF_OK;
    }
    return ps_pop(s, 1);
}

static TfStatus op_pop_mark(Ps *s) {
    size_t start = 0;
    TfStatus st = ps_pop_mark(s, &start);
    if (st != TF_OK) return st;
    s->sp = start;
    return TF_OK;
}

static TfStatus op_dup(Ps *s) {
    if (s->sp <= ps_fence(s)) return PS_FAIL(TF_ERR_FORMAT, "pickle stack underflow (DUP)");
    return ps_push(s, s->stack[s->sp - 1]);
}

/* INT, LONG: the literal's syntax is the VM's business; a line must be there */
static TfStatus op_text_int(Ps *s) {
    const uint8_t *p;
    size_t ln;
    TfStatus st = ps_line(s, &p, &ln);
    return st != TF_OK ? st : ps_push_any(s);
}

static TfStatus op_float(Ps *s) {
    const uint8_t *p;
    size_t ln;
    TfStatus st = ps_line(s, &p, &ln);
    if (st != TF_OK) return st;
    if (ln > OA_FLOAT_MAX) return PS_FAIL(TF_ERR_FORMAT, "FLOAT literal too long");
    return ps_push_any(s);
}

static TfStatus op_unicode(Ps *s) {
    const uint8_t *p;
    size_t ln;
    TfStatus st = ps_line(s, &p, &ln);
    if (st != TF_OK) return st;
    if (has_byte(p, ln, '\\')) return ps_push_any(s); /* escapes: not resolved statically */
    return ps_push_str(s, p, ln);
}

static TfStatus op_string(Ps *s) {
    const uint8_t *p;
    size_t ln;
    TfStatus st = ps_line(s, &p, &ln);
    if (st != TF_OK) return st;
    if (!oa_string_quoted(p, ln)) return PS_FAIL(TF_ERR_FORMAT, "the STRING opcode argument must be quoted");
    if (has_byte(p + 1, ln - 2, '\\')) return ps_push_any(s);
    return ps_push_str(s, p + 1, ln - 2);
}

/* Pop n, push one (TUPLE1-3: n = 1-3, REDUCE and NEWOBJ: 2, NEWOBJ_EX: 3). */
static TfStatus op_pop_push(Ps *s, size_t n) {
    TfStatus st = ps_pop(s, n);
    return st != TF_OK ? st : ps_push_any(s);
}

/* APPEND, SETITEM */
static TfStatus op_fill1(Ps *s) {
    size_t need = s->op == OP_SETITEM ? 3 : 2;
    if (s->sp - ps_fence(s) < need) return PS_FAIL(TF_ERR_FORMAT, "pickle stack underflow (%s)", opcode_name(s->op));
    s->sp -= need - 1;
    return TF_OK;
}

/* APPENDS, SETITEMS, ADDITEMS */
static TfStatus op_fill_marked(Ps *s) {
    size_t start = 0;
    TfStatus st = ps_pop_mark(s, &start);
    if (st != TF_OK) return st;
    if (start < 1 || start - 1 < ps_fence(s)) return PS_FAIL(TF_ERR_FORMAT, "%s without a target", opcode_name(s->op));
    if (s->op == OP_SETITEMS && (s->sp - start) % 2 != 0)
        return PS_FAIL(TF_ERR_FORMAT, "SETITEMS with an odd number of items");
    s->sp = start;
    return TF_OK;
}

/* BINPUT, LONG_BINPUT (put) and BINGET, LONG_BINGET (get): an index of w bytes */
static TfStatus op_memo_bin(Ps *s, int w, int put) {
    uint64_t n = 0;
    TfStatus st = ps_arg(s, w, &n);
    if (st != TF_OK) return st;
    return put ? ps_memo_put(s, n) : ps_memo_get(s, n);
}

/* PUT, GET: a text index */
static TfStatus op_memo_text(Ps *s, int put) {
    uint64_t n = 0;
    TfStatus st = ps_text_index(s, &n);
    if (st != TF_OK) return st;
    return put ? ps_memo_put(s, n) : ps_memo_get(s, n);
}

/* GLOBAL, INST (MARK args... INST: class(*args)) */
static TfStatus op_global(Ps *s) {
    const uint8_t *m, *nm;
    size_t ml, nl;
    TfStatus st;
    if ((st = ps_line(s, &m, &ml)) != TF_OK || (st = ps_line(s, &nm, &nl)) != TF_OK) return st;
    if (s->op == OP_INST) {
        size_t start = 0;
        if ((st = ps_pop_mark(s, &start)) != TF_OK) return st;
        s->sp = start;
        /* the VM pushes the class and the args tuple, then reduces them */
        if ((st = ps_global(s, m, ml, nm, nl)) != TF_OK || (st = ps_push_any(s)) != TF_OK ||
            (st = ps_push_any(s)) != TF_OK)
            return st;
        s->sp--;
        return TF_OK;
    }
    if ((st = ps_global(s, m, ml, nm, nl)) != TF_OK) return st;
    return ps_push_any(s);
}

static TfStatus op_stack_global(Ps *s) {
    TfStatus st;
    if (s->sp - ps_fence(s) < 2) {
        /* the VM pops the name first, then the module: both must be there */
        return PS_FAIL(TF_ERR_FORMAT, "pickle stack underflow (STACK_GLOBAL)");
    }
    PsVal name = s->stack[s->sp - 1], module = s->stack[s->sp - 2];
    s->sp -= 2;
    if (module.is_str && name.is_str)
        st = ps_global(s, s->start + module.off, (size_t)module.len, s->start + name.off, (size_t)name.len);
    else
        st = ps_global(s, NULL, 0, NULL, 0);
    if (st != TF_OK) return st;
    return ps_push_any(s);
}

static TfStatus op_obj(Ps *s) { /* MARK class args... OBJ */
    size_t start = 0;
    TfStatus st = ps_pop_mark(s, &start);
    if (st != TF_OK) return st;
    if (s->sp - start < 1) return PS_FAIL(TF_ERR_FORMAT, "OBJ without a class");
    /* the VM packs the args into a tuple pushed above the class, then reduces both */
    s->sp = start + 1;
    if ((st = ps_push_any(s)) != TF_OK) return st;
    s->sp = start + 1;
    s->stack[start].is_str = 0;
    return TF_OK;
}

static TfStatus op_build(Ps *s) {
    if (s->sp - ps_fence(s) < 2) return PS_FAIL(TF_ERR_FORMAT, "pickle stack underflow (BUILD)");
    s->sp--;
    s->stack[s->sp - 1].is_str = 0;
    return TF_OK;
}

static TfStatus op_binpersid(Ps *s) {
    TfStatus st = ps_pop(s, 1);
    if (st != TF_OK) return st;
    s->out->n_persids++;
    return ps_push_any(s);
}

/* One opcode: one line each, as the VM's vm_step. */
static TfStatus ps_step(Ps *s, int *stop) {
    switch (s->op) {
    case OP_PROTO: return op_proto(s);
    case OP_FRAME: return op_frame(s);
    case OP_MARK: return ps_mark(s);
    case OP_STOP: *stop = 1; return TF_OK;
    case OP_POP: return op_pop(s);
    case OP_POP_MARK: return op_pop_mark(s);
    case OP_DUP: return op_dup(s);
    case OP_NONE: case OP_NEWTRUE: case OP_NEWFALSE: case OP_EMPTY_TUPLE: case OP_EMPTY_LIST:
    case OP_EMPTY_DICT: case OP_EMPTY_SET: return ps_push_any(s);
    case OP_BININT: return ps_fixed(s, 4);
    case OP_BININT1: return ps_fixed(s, 1);
    case OP_BININT2: return ps_fixed(s, 2);
    case OP_BINFLOAT: return ps_fixed(s, 8);
    case OP_INT: case OP_LONG: return op_text_int(s);
    case OP_FLOAT: return op_float(s);
    case OP_LONG1: case OP_LONG4: case OP_SHORT_BINUNICODE: case OP_SHORT_BINSTRING: case OP_SHORT_BINBYTES:
    case OP_BINUNICODE: case OP_BINBYTES: case OP_BINSTRING: case OP_BINUNICODE8: case OP_BINBYTES8:
    case OP_BYTEARRAY8: return ps_counted(s);
    case OP_UNICODE: return op_unicode(s);
    case OP_STRING: return op_string(s);
    case OP_TUPLE1: case OP_TUPLE2: case OP_TUPLE3: return op_pop_push(s, (size_t)(s->op - OP_TUPLE1 + 1));
    case OP_TUPLE: case OP_LIST: case OP_FROZENSET: return ps_collapse_mark(s, 0);
    case OP_DICT: return ps_collapse_mark(s, 1);
    case OP_APPEND: case OP_SETITEM: return op_fill1(s);
    case OP_APPENDS: case OP_SETITEMS: case OP_ADDITEMS: return op_fill_marked(s);
    case OP_BINPUT: return op_memo_bin(s, 1, 1);
    case OP_LONG_BINPUT: return op_memo_bin(s, 4, 1);
    case OP_MEMOIZE: return ps_memo_put(s, (uint64_t)s->memo_len);
    case OP_BINGET: return op_memo_bin(s, 1, 0);
    case OP_LONG_BINGET: return op_memo_bin(s, 4, 0);
    case OP_GET: return op_memo_text(s, 0);
    case OP_PUT: return op_memo_text(s, 1);
    case OP_GLOBAL: case OP_INST: return op_global(s);
    case OP_STACK_GLOBAL: return op_stack_global(s);
    case OP_OBJ: return op_obj(s);
    case OP_REDUCE: case OP_NEWOBJ: return op_pop_push(s, 2);
    case OP_NEWOBJ_EX: return op_pop_push(s, 3);
    case OP_BUILD: return op_build(s);
    case OP_BINPERSID: return op_binpersid(s);
    case OP_PERSID:
        return PS_FAIL(TF_ERR_FORMAT, "text persistent ids (PERSID, protocol 0) cannot name a storage");
    case OP_EXT1: case OP_EXT2: case OP_EXT4:
        return PS_FAIL(TF_ERR_FORMAT, "%s refers to the copyreg extension registry", opcode_name(s->op));
    case OP_NEXT_BUFFER: case OP_READONLY_BUFFER:
        return PS_FAIL(TF_ERR_FORMAT, "%s needs out-of-band buffers", opcode_name(s->op));
    default: return PS_FAIL(TF_ERR_FORMAT, "invalid pickle opcode %d", s->op);
    }
}

TfStatus pickscan_run(const uint8_t *data, size_t len, const TfLimits *lim, PickScan *out, TfErr *err) {
    static const TfLimits defaults = TF_LIMITS_DEFAULT;
    Ps s;
    TfStatus st = TF_OK;
    int stop = 0;

    memset(out, 0, sizeof *out);
    out->protocol = -1;
    memset(&s, 0, sizeof s);
    s.lim = lim ? *lim : defaults;
    s.out = out;
    s.err = err;
    s.start = s.p = data;
    s.end = data + len;
    if (data == NULL && len != 0) return tf_fail(err, TF_ERR_FORMAT, 0, "no pickle data");
    if ((uint64_t)len > s.lim.pickle_bytes)
        return tf_fail(err, TF_ERR_LIMIT, 0, "pickle of %zu bytes exceeds the limit of %llu bytes", len,
                       (ull)s.lim.pickle_bytes);
    while (!stop) {
        if (s.p >= s.end) {
            s.op_offset = (uint64_t)(s.p - s.start);
            st = tf_fail(err, TF_ERR_FORMAT, s.op_offset, "pickle data was truncated (no STOP opcode)");
            goto done;
        }
        s.op_offset = (uint64_t)(s.p - s.start);
        s.op = *s.p++;
        out->n_ops++;
        if ((st = ps_step(&s, &stop)) != TF_OK) goto done;
    }
    if (s.p != s.end) {
        st = tf_fail(err, TF_ERR_FORMAT, s.op_offset, "%zu bytes after the STOP opcode", (size_t)(s.end - s.p));
        goto done;
    }
    if (s.sp - ps_fence(&s) < 1) st = tf_fail(err, TF_ERR_FORMAT, s.op_offset, "STOP with an empty stack");
done:
    free(s.stack);
    free(s.marks);
    free(s.memo);
    if (st != TF_OK) pickscan_free(out);
    return st;
}

void pickscan_free(PickScan *ps) {
    if (ps == NULL) return;
    free(ps->globals);
    ps->globals = NULL;
    ps->n_globals = ps->cap_globals = 0;
}
