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

typedef struct {
    uint64_t pickle_bytes;
    uint64_t memo;
    uint64_t stack;
    uint64_t marks;
    uint64_t records;
    uint64_t name;
    uint64_t ndim;
    uint64_t total_bytes;
} TfLimits;

#define TF_LIMITS_DEFAULT                                                              \
    {TF_LIMIT_PICKLE_BYTES, TF_LIMIT_MEMO, TF_LIMIT_STACK, TF_LIMIT_MARKS,              \
     TF_LIMIT_RECORDS, TF_LIMIT_NAME, TF_LIMIT_NDIM, TF_LIMIT_TOTAL_BYTES}

#endif
