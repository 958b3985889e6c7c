/* common.h - Python-free helpers shared by every C file of torchfree.
 *
 * Nothing here includes Python.h: the zip reader, the dtype table and the
 * allowlist are plain C so they can be unit-tested and fuzzed on their own. */
#ifndef TORCHFREE_COMMON_H
#define TORCHFREE_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define TF_LIKELY(x) __builtin_expect(!!(x), 1)
#define TF_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define TF_LIKELY(x) (x)
#define TF_UNLIKELY(x) (x)
#endif

#define TF_INLINE static inline

/* Status codes of the Python-free layer; the module maps them to exceptions. */
typedef enum {
    TF_OK = 0,
    TF_ERR_FORMAT = 1, /* not a checkpoint, corrupt or truncated container -> FormatError */
    TF_ERR_LIMIT = 2,  /* a documented limit was exceeded -> LimitError */
    TF_ERR_NOMEM = 3,  /* allocation failed -> MemoryError */
    TF_ERR_IO = 4,     /* read failed -> OSError */
} TfStatus;

/* Error record filled by the Python-free layer: what went wrong and where. */
typedef struct {
    TfStatus status;
    uint64_t offset; /* byte offset in the input, when known */
    char detail[256];
} TfErr;

/* Set err and return its status (printf-style detail). */
TfStatus tf_fail(TfErr *err, TfStatus status, uint64_t offset, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* Little-endian loads that never do unaligned pointer casts. */
TF_INLINE uint16_t tf_le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
TF_INLINE uint32_t tf_le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
TF_INLINE uint64_t tf_le64(const uint8_t *p) {
    return (uint64_t)tf_le32(p) | ((uint64_t)tf_le32(p + 4) << 32);
}
TF_INLINE void tf_put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
TF_INLINE void tf_put32(uint8_t *p, uint32_t v) {
    tf_put16(p, (uint16_t)v); tf_put16(p + 2, (uint16_t)(v >> 16));
}
TF_INLINE void tf_put64(uint8_t *p, uint64_t v) {
    tf_put32(p, (uint32_t)v); tf_put32(p + 4, (uint32_t)(v >> 32));
}

/* Checked arithmetic: return 1 on overflow, else store the result and return 0. */
TF_INLINE int tf_add_u64(uint64_t a, uint64_t b, uint64_t *out) { return __builtin_add_overflow(a, b, out); }
TF_INLINE int tf_mul_u64(uint64_t a, uint64_t b, uint64_t *out) { return __builtin_mul_overflow(a, b, out); }
TF_INLINE int tf_add_i64(int64_t a, int64_t b, int64_t *out) { return __builtin_add_overflow(a, b, out); }
TF_INLINE int tf_mul_i64(int64_t a, int64_t b, int64_t *out) { return __builtin_mul_overflow(a, b, out); }

#endif
