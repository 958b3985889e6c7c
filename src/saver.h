/* saver.h - the per-call state of torchfree.save shared by its three CPython-side files:
 * save_collect.c (walk, group into records), save_pickle.c (data.pkl) and save.c (the entry
 * point, which hands the records to writer.c). Internal to those files. */
#ifndef TORCHFREE_SAVER_H
#define TORCHFREE_SAVER_H

#include "objects.h"
#include "pickler.h"
#include "writer.h"

/* ---- per-call state ---------------------------------------------------------- */

typedef struct {
    PyObject *obj;     /* as found in the structure (ndarray, Storage) */
    PyObject *arr;     /* ndarray whose bytes are written (obj or a copy); NULL for a bare Storage */
    PyObject *owner;   /* memory owner this item is grouped on (borrowed from arr/obj's chain) */
    char *lo, *hi;     /* bytes it spans */
    int dt;
    int rec;           /* record index */
    int64_t offset;    /* in elements from the record start */
} SaveItem;

typedef struct {
    PyObject *owner;   /* strong */
    char *start;
    uint64_t nbytes;
    int dt;
    PyObject *key;     /* zip key string, made when first pickled */
    uint64_t legacy_key;
    int64_t order;     /* position in key order, -1 until pickled */
    Py_buffer view;    /* export held on the owner while writing, when it has one */
    int has_view;
    int dead;          /* merged into another record */
    size_t first_item; /* an item it holds (for messages) */
} SaveRecord;

typedef struct {
    PyObject *key;     /* dict key / attribute name (borrowed), or NULL */
    Py_ssize_t index;  /* list / tuple / set position */
} PathSeg;

typedef struct {
    ModuleState *st;
    int legacy;
    Pickler pk;
    PyObject *keep;        /* list: objects we made that the memo refers to */
    PyObject *str_storage, *str_cpu, *str_latin1;
    PyObject *parts;       /* dict: QuantizedArray / SparseArray -> what the save_parts helper made of it */
    /* collect */
    PtrMap seen;           /* container -> 1 (done) / 2 (tuple in progress); item object -> index + 3 */
    SaveItem *items;
    size_t n_items, cap_items;
    SaveRecord *recs;
    size_t n_recs, cap_recs;
    PathSeg *path;
    size_t depth, cap_path;
    /* pickle */
    size_t *order;         /* record indexes in key order */
    size_t n_order, cap_order;
} Saver;

/* ---- save_collect.c ---------------------------------------------------------------- */

/* Grow *p (PyMem) to hold need elements; MemoryError and -1 on failure. */
int save_grow(void **p, size_t *cap, size_t need, size_t elem);
/* 1. Walk obj: refuse what torch cannot rebuild, note every array and Storage. */
int save_collect(Saver *S, PyObject *obj);
/* Group the collected items into records (root: for the paths in error messages). */
int save_make_records(Saver *S, PyObject *root);
/* The legacy stream: refuse dtypes it cannot hold, then give each record its key. */
int save_check_legacy(Saver *S, PyObject *root);
int save_legacy_keys(Saver *S, LegacyKey **out);
/* Helpers the pickle pass shares with collect. */
int save_dtype_of_value(ModuleState *st, PyObject *v);
PyObject *save_instance_state(PyObject *obj);
PyObject *save_long_bytes(PyObject *obj);
int save_is_helper_type(Saver *S, PyObject *obj, const char *name);

/* ---- save_pickle.c ----------------------------------------------------------------- */

/* 2. data.pkl into S->pk; the records get their keys and S->order in first-use order. */
int save_pickle_main(Saver *S, PyObject *obj);
/* The legacy stream's sorted key list: keys[0 .. n_order) filled and sorted, pickled into kp. */
int save_pickle_legacy_keys(Saver *S, Pickler *kp, LegacyKey *keys);

#endif
