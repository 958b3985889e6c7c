/* pickler.c - Python-free protocol-2 emitter and memo (see pickler.h).
 *
 * Encodings follow CPython's Modules/_pickle.c for protocol 2 byte for byte:
 * ints in 32 bits signed use the smallest of BININT1 (0..255), BININT2
 * (256..65535) and BININT, others LONG1; floats are BINFLOAT (big-endian
 * IEEE double); memo indexes below 256 use BINPUT / BINGET, others the
 * LONG_ forms with a little-endian uint32. */
#include "pickler.h"

#include <stdlib.h>

#include "opcodes.h"

/* ---- PtrMap ------------------------------------------------------------- */

static size_t ptr_hash(const void *key, size_t mask) {
    uint64_t h = (uint64_t)(uintptr_t)key;
    h ^= h >> 33;
    h *= UINT64_C(0xff51afd7ed558ccd);
    h ^= h >> 33;
    return (size_t)h & mask;
}

void ptrmap_init(PtrMap *m) { memset(m, 0, sizeof *m); }

void ptrmap_free(PtrMap *m) {
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof *m);
}

int ptrmap_get(const PtrMap *m, const void *key, uint64_t *val) {
    if (m->cap == 0) return 0;
    size_t mask = m->cap - 1;
    for (size_t i = ptr_hash(key, mask);; i = (i + 1) & mask) {
        if (m->keys[i] == NULL) return 0;
        if (m->keys[i] == key) {
            *val = m->vals[i];
            return 1;
        }
    }
}

static int ptrmap_grow(PtrMap *m) {
    size_t ncap = m->cap ? m->cap * 2 : 64;
    if (ncap < m->cap || ncap > SIZE_MAX / sizeof(uint64_t)) return -1;
    const void **keys = calloc(ncap, sizeof *keys);
    uint64_t *vals = malloc(ncap * sizeof *vals);
    if (keys == NULL || vals == NULL) {
        free(keys);
        free(vals);
        return -1;
    }
    size_t mask = ncap - 1;
    for (size_t j = 0; j < m->cap; j++) {
        if (m->keys[j] == NULL) continue;
        size_t i = ptr_hash(m->keys[j], mask);
        while (keys[i] != NULL) i = (i + 1) & mask;
        keys[i] = m->keys[j];
        vals[i] = m->vals[j];
    }
    free(m->keys);
    free(m->vals);
    m->keys = keys;
    m->vals = vals;
    m->cap = ncap;
    return 0;
}

int ptrmap_set(PtrMap *m, const void *key, uint64_t val) {
    /* load factor <= 1/2 */
    if ((m->len + 1) * 2 > m->cap && ptrmap_grow(m) < 0) return -1;
    size_t mask = m->cap - 1;
    size_t i = ptr_hash(key, mask);
    while (m->keys[i] != NULL && m->keys[i] != key) i = (i + 1) & mask;
    if (m->keys[i] == NULL) {
        m->keys[i] = key;
        m->len++;
    }
    m->vals[i] = val;
    return 0;
}

/* ---- output buffer ---------------------------------------------------------- */

void pickler_init(Pickler *p) {
    memset(p, 0, sizeof *p);
    ptrmap_init(&p->memo);
}

void pickler_free(Pickler *p) {
    free(p->data);
    ptrmap_free(&p->memo);
    memset(p, 0, sizeof *p);
}

void pickler_reset(Pickler *p) {
    p->len = 0;
    p->next = 0;
    ptrmap_free(&p->memo);
    ptrmap_init(&p->memo);
}

TfStatus pickler_status(const Pickler *p) { return p->status; }

/* Room for n more bytes; 0, or -1 (status set) when impossible. */
static int reserve(Pickler *p, size_t n) {
    if (p->status != TF_OK) return -1;
    if (n <= p->cap - p->len) return 0;
    size_t need;
    if (__builtin_add_overflow(p->len, n, &need)) {
        p->status = TF_ERR_NOMEM;
        return -1;
    }
    size_t ncap = p->cap ? p->cap : 4096;
    while (ncap < need) {
        if (ncap > SIZE_MAX / 2) {
            ncap = need;
            break;
        }
        ncap *= 2;
    }
    uint8_t *d = realloc(p->data, ncap);
    if (d == NULL) {
        p->status = TF_ERR_NOMEM;
        return -1;
    }
    p->data = d;
    p->cap = ncap;
    return 0;
}

void pk_raw(Pickler *p, const void *buf, size_t n) {
    if (n == 0 || reserve(p, n) < 0) return;
    memcpy(p->data + p->len, buf, n);
    p->len += n;
}

void pk_op(Pickler *p, uint8_t op) {
    if (reserve(p, 1) < 0) return;
    p->data[p->len++] = op;
}

void pk_proto(Pickler *p, uint8_t version) {
    uint8_t b[2] = {OP_PROTO, version};
    pk_raw(p, b, 2);
}

void pk_int(Pickler *p, int64_t v) {
    uint8_t b[10];
    if (v >= INT32_MIN && v <= INT32_MAX) {
        uint32_t u = (uint32_t)(int32_t)v;
        if (u <= 0xFF) {
            b[0] = OP_BININT1;
            b[1] = (uint8_t)u;
            pk_raw(p, b, 2);
        } else if (u <= 0xFFFF) {
            b[0] = OP_BININT2;
            tf_put16(b + 1, (uint16_t)u);
            pk_raw(p, b, 3);
        } else {
            b[0] = OP_BININT;
            tf_put32(b + 1, u);
            pk_raw(p, b, 5);
        }
        return;
    }
    /* 8 two's complement bytes, less the redundant top sign byte if any:
     * _pickle.c takes nbits/8 + 1 bytes and drops one 0xff byte of a
     * negative value when the next one already carries the sign. */
    uint8_t le[8];
    tf_put64(le, (uint64_t)v);
    size_t n = 8;
    if (v > 0) {
        while (n > 1 && le[n - 1] == 0 && !(le[n - 2] & 0x80)) n--;
    } else {
        while (n > 1 && le[n - 1] == 0xFF && (le[n - 2] & 0x80)) n--;
    }
    pk_long1(p, le, n);
}

void pk_long1(Pickler *p, const uint8_t *le_bytes, size_t n) {
    if (n > 255) {
        if (p->status == TF_OK) p->status = TF_ERR_LIMIT;
        return;
    }
    uint8_t h[2] = {OP_LONG1, (uint8_t)n};
    pk_raw(p, h, 2);
    pk_raw(p, le_bytes, n);
}

void pk_float(Pickler *p, double v) {
    uint8_t b[9];
    uint64_t bits;
    memcpy(&bits, &v, 8);
    b[0] = OP_BINFLOAT;
    for (int i = 0; i < 8; i++) b[1 + i] = (uint8_t)(bits >> (56 - 8 * i)); /* big-endian */
    pk_raw(p, b, 9);
}

void pk_unicode(Pickler *p, const char *utf8, size_t n) {
    if ((uint64_t)n > UINT32_MAX) {
        if (p->status == TF_OK) p->status = TF_ERR_LIMIT;
        return;
    }
    uint8_t h[5];
    h[0] = OP_BINUNICODE;
    tf_put32(h + 1, (uint32_t)n);
    pk_raw(p, h, 5);
    pk_raw(p, utf8, n);
}

void pk_global(Pickler *p, const char *module, const char *name) {
    pk_op(p, OP_GLOBAL);
    pk_raw(p, module, strlen(module));
    pk_op(p, '\n');
    pk_raw(p, name, strlen(name));
    pk_op(p, '\n');
}

void pk_tuple(Pickler *p, size_t n) {
    static const uint8_t small[4] = {OP_EMPTY_TUPLE, OP_TUPLE1, OP_TUPLE2, OP_TUPLE3};
    pk_op(p, n <= 3 ? small[n] : (uint8_t)OP_TUPLE);
}

/* ---- memo ------------------------------------------------------------------ */

static void emit_index(Pickler *p, uint8_t short_op, uint8_t long_op, uint64_t idx) {
    uint8_t b[5];
    if (idx < 256) {
        b[0] = short_op;
        b[1] = (uint8_t)idx;
        pk_raw(p, b, 2);
    } else if (idx <= UINT32_MAX) {
        b[0] = long_op;
        tf_put32(b + 1, (uint32_t)idx);
        pk_raw(p, b, 5);
    } else if (p->status == TF_OK) {
        p->status = TF_ERR_LIMIT; /* protocol 2 cannot address more memo slots */
    }
}

int pk_memo_has(const Pickler *p, const void *key) {
    uint64_t idx;
    return key != NULL && ptrmap_get(&p->memo, key, &idx);
}

int pk_memo_get(Pickler *p, const void *key) {
    uint64_t idx;
    if (key == NULL || !ptrmap_get(&p->memo, key, &idx)) return 0;
    emit_index(p, OP_BINGET, OP_LONG_BINGET, idx);
    return 1;
}

void pk_memoize(Pickler *p, const void *key) {
    uint64_t idx = p->next++;
    if (key != NULL && ptrmap_set(&p->memo, key, idx) < 0 && p->status == TF_OK) p->status = TF_ERR_NOMEM;
    emit_index(p, OP_BINPUT, OP_LONG_BINPUT, idx);
}
