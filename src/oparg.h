/* oparg.h - Python-free: decoding of pickle opcode arguments, shared by the VM (vm.c) and
 * the static scanner (pickscan.c), so that both read the same bytes with the same checks.
 *
 * Every function reads at *p and never past end: a length is checked against the bytes left
 * before anything is read or skipped. On success *p moves past what was read; on a truncation
 * *need gets the byte count that was missing at that step (the count of a counted argument
 * first, then its payload), for "pickle data was truncated (X needs N more bytes)". */
#ifndef TORCHFREE_OPARG_H
#define TORCHFREE_OPARG_H

#include "common.h"
#include "opcodes.h"

typedef enum {
    OA_OK = 0,
    OA_TRUNCATED, /* *need bytes were not there */
    OA_NEGATIVE,  /* a signed 4-byte count (LONG4, BINSTRING) was negative: oa_negative_msg */
    OA_TOO_LONG,  /* a text line over the limit */
} OaStatus;

/* The longest FLOAT text literal (without its newline). */
#define OA_FLOAT_MAX 511

/* Bytes left before end. */
TF_INLINE uint64_t oa_left(const uint8_t *p, const uint8_t *end) { return (uint64_t)(end - p); }

/* A little-endian unsigned int of w bytes (1, 2, 4 or 8) at p (the caller checked they are there). */
TF_INLINE uint64_t oa_le(const uint8_t *p, int w) {
    return w == 1 ? p[0] : w == 2 ? tf_le16(p) : w == 4 ? tf_le32(p) : tf_le64(p);
}

/* n bytes at *p: *at points to them and *p moves past them. */
TF_INLINE OaStatus oa_take(const uint8_t **p, const uint8_t *end, uint64_t n, const uint8_t **at, uint64_t *need) {
    if (TF_UNLIKELY(oa_left(*p, end) < n)) {
        *need = n;
        return OA_TRUNCATED;
    }
    *at = *p;
    *p += n;
    return OA_OK;
}

/* A w-byte little-endian unsigned int (BININT1/2, BINPUT, LONG_BINGET, FRAME, ...). */
TF_INLINE OaStatus oa_uint(const uint8_t **p, const uint8_t *end, int w, uint64_t *v, uint64_t *need) {
    const uint8_t *at;
    if (TF_UNLIKELY(oa_take(p, end, (uint64_t)w, &at, need) != OA_OK)) return OA_TRUNCATED;
    *v = oa_le(at, w);
    return OA_OK;
}

/* Width of the count in front of op's counted argument (0: op has none). */
TF_INLINE int oa_count_width(int op) {
    switch (op) {
    case OP_LONG1:
    case OP_SHORT_BINUNICODE:
    case OP_SHORT_BINSTRING:
    case OP_SHORT_BINBYTES:
        return 1;
    case OP_LONG4:
    case OP_BINUNICODE:
    case OP_BINSTRING:
    case OP_BINBYTES:
        return 4;
    case OP_BINUNICODE8:
    case OP_BINBYTES8:
    case OP_BYTEARRAY8:
        return 8;
    default:
        return 0;
    }
}

/* 1 when op's count is a signed int32 (LONG4, BINSTRING), which must not be negative. */
TF_INLINE int oa_count_signed(int op) { return op == OP_LONG4 || op == OP_BINSTRING; }

/* The message for OA_NEGATIVE. */
TF_INLINE const char *oa_negative_msg(int op) {
    return op == OP_LONG4 ? "LONG4 with a negative byte count" : "BINSTRING with a negative length";
}

/* op's counted argument (op: one with oa_count_width(op) > 0): the count, then *n bytes at *data. */
TF_INLINE OaStatus oa_counted(int op, const uint8_t **p, const uint8_t *end, const uint8_t **data, uint64_t *n,
                              uint64_t *need) {
    uint64_t c;
    if (TF_UNLIKELY(oa_uint(p, end, oa_count_width(op), &c, need) != OA_OK)) return OA_TRUNCATED;
    if (oa_count_signed(op)) {
        int32_t s = (int32_t)(uint32_t)c;
        if (s < 0) return OA_NEGATIVE;
        c = (uint64_t)s;
    }
    *n = c;
    return oa_take(p, end, c, data, need);
}

/* BININT's argument as the signed int32 it is. */
TF_INLINE int32_t oa_i32(uint64_t v) { return (int32_t)(uint32_t)v; }

/* BINFLOAT's argument: an IEEE 754 double, big-endian (8 bytes at p). */
TF_INLINE double oa_f64be(const uint8_t *p) {
    uint64_t u = 0;
    for (int i = 0; i < 8; i++) u = (u << 8) | p[i];
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

/* A text line of the protocol-0 opcodes (without its newline, which *p moves past); lines
 * longer than 64 times the name limit are refused (OA_TOO_LONG). No newline: OA_TRUNCATED. */
TF_INLINE OaStatus oa_line(const uint8_t **p, const uint8_t *end, uint64_t name_limit, const uint8_t **line,
                           size_t *n) {
    const uint8_t *nl = (const uint8_t *)memchr(*p, '\n', (size_t)(end - *p));
    if (nl == NULL) return OA_TRUNCATED;
    uint64_t max_line;
    if (tf_mul_u64(name_limit, 64, &max_line)) max_line = UINT64_MAX;
    *line = *p;
    *n = (size_t)(nl - *p);
    if ((uint64_t)*n > max_line) return OA_TOO_LONG;
    *p = nl + 1;
    return OA_OK;
}

/* GET / PUT text index: 1 to 18 decimal digits. 0: invalid. */
TF_INLINE int oa_text_index(const uint8_t *s, size_t n, uint64_t *idx) {
    if (n == 0 || n > 18) return 0;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *idx = v;
    return 1;
}

/* STRING's argument is quoted with ' or " at both ends. */
TF_INLINE int oa_string_quoted(const uint8_t *s, size_t n) {
    return n >= 2 && (s[0] == '\'' || s[0] == '"') && s[n - 1] == s[0];
}

#endif
