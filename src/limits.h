/* limits.h - every hard cap of the reader, in one place.
 *
 * Each default can be overridden at build time (-DTF_LIMIT_...=N) and per call
 * through load(..., limits={...}); the module exports them as LIMITS. */
#ifndef TORCHFREE_LIMITS_H
#define TORCHFREE_LIMITS_H

#include <stdint.h>

/* Size of the pickle (data.pkl): 2 GiB, far above any real state_dict pickle. */
#ifndef TF_LIMIT_PICKLE_BYTES
#define TF_LIMIT_PICKLE_BYTES (UINT64_C(1) << 31)
#endif
/* Memo slots: torch's pickler uses one per object; 2^26 is ~67M objects. */
#ifndef TF_LIMIT_MEMO
#define TF_LIMIT_MEMO (UINT64_C(1) << 26)
#endif
/* Unused memo slots a BINPUT may skip: Python 2's cPickle numbers from 1, so its first put
 * skips slot 0. Farther indices are refused (a sparse memo would be a huge table). */
#define TF_MEMO_GAP UINT64_C(16)
/* Values on the VM stack at once (SETITEMS batches are 2000 items). */
#ifndef TF_LIMIT_STACK
#define TF_LIMIT_STACK (UINT64_C(1) << 22)
#endif
/* Open MARKs (container nesting depth while building). */
#ifndef TF_LIMIT_MARKS
#define TF_LIMIT_MARKS UINT64_C(10000)
#endif
/* Records in a zip archive (one per storage plus a handful). */
#ifndef TF_LIMIT_RECORDS
#define TF_LIMIT_RECORDS (UINT64_C(1) << 22)
#endif
/* Length of a record name or a GLOBAL module/name. */
#ifndef TF_LIMIT_NAME
#define TF_LIMIT_NAME UINT64_C(4096)
#endif
/* Dimensions of one tensor (numpy's own maximum is 64). */
#ifndef TF_LIMIT_NDIM
#define TF_LIMIT_NDIM UINT64_C(64)
#endif
/* Bytes the loader may allocate for storages that are copied or inflated: 1 TiB. */
#ifndef TF_LIMIT_TOTAL_BYTES
#define TF_LIMIT_TOTAL_BYTES (UINT64_C(1) << 40)
#endif

/* The limits, in the order of TfLimits: X(field and LIMITS name, default). Everything else is
 * made from this list: the struct, its defaults, the count, the names (tf_limit_names) and, in the
 * CPython layer, LIMITS and the parser of load(..., limits={...}). */
#define TF_LIMITS(X)                           \
    X(pickle_bytes, TF_LIMIT_PICKLE_BYTES)     \
    X(memo, TF_LIMIT_MEMO)                     \
    X(stack, TF_LIMIT_STACK)                   \
    X(marks, TF_LIMIT_MARKS)                   \
    X(records, TF_LIMIT_RECORDS)               \
    X(name, TF_LIMIT_NAME)                     \
    X(ndim, TF_LIMIT_NDIM)                     \
    X(total_bytes, TF_LIMIT_TOTAL_BYTES)

#define TF_LIMIT_FIELD_(n, d) uint64_t n;
typedef struct {
    TF_LIMITS(TF_LIMIT_FIELD_)
} TfLimits;
#undef TF_LIMIT_FIELD_

#define TF_LIMIT_DEFAULT_(n, d) d,
#define TF_LIMITS_DEFAULT {TF_LIMITS(TF_LIMIT_DEFAULT_)}

#define TF_LIMIT_ONE_(n, d) +1
enum { TF_LIMIT_COUNT = 0 TF_LIMITS(TF_LIMIT_ONE_) };
#undef TF_LIMIT_ONE_

/* The field of limit i (in TF_LIMITS order), or NULL past the end. */
static inline uint64_t *tf_limit_field(TfLimits *lim, int i) {
    int at = 0;
#define TF_LIMIT_AT_(n, d) \
    if (at++ == i) return &lim->n;
    TF_LIMITS(TF_LIMIT_AT_)
#undef TF_LIMIT_AT_
    return (uint64_t *)0;
}

/* Their names, as LIMITS and load(..., limits=) spell them (limits.c). */
extern const char *const tf_limit_names[TF_LIMIT_COUNT];

#endif
