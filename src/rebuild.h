/* rebuild.h - the rebuild floor: storages (storage.c, storage_io.c), tensors and the reductions
 * the allowlist names (tensor.c), torch's per-tensor sequence fused (fastpath.c). The VM reaches
 * them only through the Loader's hooks. */
#ifndef TORCHFREE_REBUILD_H
#define TORCHFREE_REBUILD_H

#include "loader.h"

/* storage.c */
extern PyType_Spec StorageSpec;
extern PyType_Spec GlobalRefSpec;
/* A zip checkpoint's persistent id -> Storage (new reference): its load_persid hook. */
PyObject *storage_persistent_load(Loader *L, PyObject *pid);
/* The same for a zip checkpoint's id given as its n items (pid[0..n), n >= 1). New reference. */
PyObject *storage_persistent_items(Loader *L, PyObject *const *pid, Py_ssize_t n);
/* The same from its parts: dtype (a DtypeId), key and saved location (str, borrowed), numel
 * (-1: out of range). New reference. */
PyObject *storage_get(Loader *L, int dtype, PyObject *key, PyObject *saved, long long numel);
/* A fresh Storage made by L (no data yet). New reference. */
StorageObject *storage_new(Loader *L, PyObject *key, PyObject *location, Py_ssize_t nbytes, int dtype);
PyObject *mod_storage_over(PyObject *module, PyObject *args);
PyObject *mod_storage_at(PyObject *module, PyObject *args);
/* The location tag map_location gives a storage saved at `saved` (new reference). */
PyObject *storage_target(Loader *L, PyObject *saved);
/* The dtype of a persistent id's storage type (a torch storage class), or -1 with an exception. */
int storage_type_dtype(Loader *L, PyObject *type);
/* key as a str: str, ASCII bytes or int (new reference; NULL without an exception otherwise). */
PyObject *storage_key_str(PyObject *key);
/* old's bytes seen as another dtype (same data, another Storage). New reference. */
PyObject *storage_retyped(Loader *L, StorageObject *old, uint64_t nbytes, int dtype);
/* Count nbytes against limits.total_bytes (LimitError past it). */
int storage_charge(Loader *L, uint64_t nbytes);
/* Before the first byte of a fresh buffer [p, p + n) of a copy load is written: small pages for
 * it where its huge pages would have to be compacted (storage.c). */
void storage_thp_fit(Loader *L, void *p, size_t n);
PyObject *mod_thp_probe(PyObject *module, PyObject *args);
/* Give a Storage its bytes (read, inflate or map what it still lacks), byte swap
 * it, and show it to the map_location callable. Idempotent. */
int storage_ready(Loader *L, StorageObject *s);
/* read_at over a Python file object (ctx: the Loader; needs the GIL). */
TfStatus storage_read_pyfile(void *ctx, uint64_t off, void *buf, size_t n, TfErr *err);
/* read_at over a file descriptor (ctx: int *) with pread. */
TfStatus storage_read_fd(void *ctx, uint64_t off, void *buf, size_t n, TfErr *err);
/* Run every deferred read (GIL released, in parallel) and swaps. */
int storage_finish(Loader *L);
/* Wait for the read batch in flight, if any, ignoring its errors (a load that failed). */
void storage_batch_abort(Loader *L);

/* storage_io.c (with storage_read_fd, storage_read_pyfile, storage_thp_fit, mod_thp_probe,
 * storage_batch_abort above) */
/* Read a big stored record with several threads (GIL released). 0: done; -1: not done. */
int storage_read_split(Loader *L, ZipEntry *e, uint8_t *dst);
/* Join the read batch in flight, if any: its storages are read (0), or OSError (-1). */
int storage_batch_join(Loader *L);
/* A deferred storage was added to L->pending: join a finished batch, start the next. */
int storage_pending_pump(Loader *L);
/* Run every deferred read still pending (GIL released, in parallel). */
int storage_read_pending(Loader *L);

/* tensor.c */
extern PyType_Spec TensorRefSpec;
/* Materialize a TensorRef of a lazy archive into an array (new reference). */
PyObject *tensor_materialize(Loader *L, PyObject *ref);
/* Dispatch REDUCE of one of our globals (args: a tuple, borrowed). New reference. */
PyObject *tensor_reduce(Loader *L, GlobalRef *g, PyObject *args);
/* BUILD on an object created by one of our globals; returns the object to
 * leave on the stack (new reference) or NULL. */
PyObject *tensor_build(Loader *L, PyObject *obj, PyObject *state);
/* Value pushed for a GLOBAL that is itself data (dtype, qscheme): new ref or NULL if not a value. */
PyObject *tensor_global_value(Loader *L, const GlobalHit *hit, const char *canon);
/* A dense tensor over storage: torch's (offset, size, stride) in elements of dt (-1: the
 * storage's dtype), checked against the storage. New reference. */
PyObject *tensor_strided(Loader *L, PyObject *storage, PyObject *offset, PyObject *size, PyObject *stride, int dt);
/* The same with the storage's dtype and C integers (>= 0; nd <= the ndim limit and NPY_MAXDIMS). */
PyObject *tensor_strided_dims(Loader *L, PyObject *storage, int64_t offset, int nd, const int64_t *size,
                              const int64_t *stride);

/* fastpath.c: torch's per-tensor sequence; each: 1 done, 0 not this pattern, -1 error */
/* At MARK with our _rebuild_tensor_v2 on top: the whole tensor from the bytes. */
int tensor_fused(Loader *L);
/* At TUPLE: a zip checkpoint's persistent id from the items above the MARK. */
int persid_fused(Loader *L);
/* At the REDUCE of OrderedDict(): _rebuild_tensor_v2 from the five items above the MARK. */
int rebuild_v2_fused(Loader *L);

#endif
