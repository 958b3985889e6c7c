/* pickler.h - Python-free protocol-2 pickle emitter for the writer.
 *
 * A growable output buffer with one emitter per opcode family, and the memo
 * that CPython's own pickler keeps: a table from an object's identity (any
 * pointer: a Python object, or the address of a static item standing for an
 * object that exists only in torch, like `torch.FloatStorage`) to its memo
 * index. save_pickle.c walks the Python objects and calls these in exactly the
 * order CPython's `_pickle.c` would, so the bytes equal torch.save's.
 *
 * Only opcodes torch's weights-only unpickler accepts are produced. Errors
 * (allocation failure, a string of 4 GiB or more) are sticky: emitters
 * become no-ops and pickler_status() reports the first one. */
#ifndef TORCHFREE_PICKLER_H
#define TORCHFREE_PICKLER_H

#include "common.h"

/* ---- pointer-keyed hash map (open addressing, linear probing) ----------- */

typedef struct {
    const void **keys; /* NULL = empty slot */
    uint64_t *vals;
    size_t cap;        /* power of two (0 before the first insert) */
    size_t len;
} PtrMap;

void ptrmap_init(PtrMap *m);
void ptrmap_free(PtrMap *m);
/* 1 and *val set when key is present, else 0. */
int ptrmap_get(const PtrMap *m, const void *key, uint64_t *val);
/* Insert or overwrite. 0, or -1 when out of memory. key must not be NULL. */
int ptrmap_set(PtrMap *m, const void *key, uint64_t val);

/* ---- the emitter ---------------------------------------------------------- */

typedef struct {
    uint8_t *data;
    size_t len, cap;
    TfStatus status; /* first error, TF_OK while fine */
    PtrMap memo;     /* identity -> memo index */
    uint64_t next;   /* next memo index (the memo's size, as in _pickle.c) */
} Pickler;

void pickler_init(Pickler *p);
void pickler_free(Pickler *p);
/* Forget the output and the memo (a new pickle in the same stream). */
void pickler_reset(Pickler *p);
TfStatus pickler_status(const Pickler *p);

/* Raw bytes and single opcodes (see opcodes.h). */
void pk_raw(Pickler *p, const void *buf, size_t n);
void pk_op(Pickler *p, uint8_t op);
void pk_proto(Pickler *p, uint8_t version);
/* BININT1 / BININT2 / BININT when v fits 32 bits signed, else LONG1: as _pickle.c. */
void pk_int(Pickler *p, int64_t v);
/* LONG1 of n little-endian two's complement bytes (n < 256; the caller has
 * trimmed redundant sign bytes as _pickle.c does). */
void pk_long1(Pickler *p, const uint8_t *le_bytes, size_t n);
void pk_float(Pickler *p, double v);
/* BINUNICODE of n UTF-8 bytes; a 4 GiB string sets TF_ERR_LIMIT. */
void pk_unicode(Pickler *p, const char *utf8, size_t n);
/* GLOBAL 'module\nname\n' */
void pk_global(Pickler *p, const char *module, const char *name);
/* Close a tuple of n items: EMPTY_TUPLE / TUPLE1-3 (no MARK was written), or
 * TUPLE (the caller wrote MARK before the items, as it must for n > 3). */
void pk_tuple(Pickler *p, size_t n);

/* Memo. pk_memo_get emits BINGET / LONG_BINGET and returns 1 when key is
 * memoized, else returns 0 and emits nothing. pk_memoize gives the next
 * index to key (NULL: an object that can never be seen again, such as a
 * fresh tuple) and emits BINPUT / LONG_BINPUT. */
int pk_memo_get(Pickler *p, const void *key);
int pk_memo_has(const Pickler *p, const void *key);
void pk_memoize(Pickler *p, const void *key);

#endif
