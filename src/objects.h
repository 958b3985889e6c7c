/* objects.h - the object types a load makes, shared by the floors above state: GlobalRef (a
 * resolved GLOBAL), torchfree.Storage and TensorRef (their types live in storage.c and tensor.c). */
#ifndef TORCHFREE_OBJECTS_H
#define TORCHFREE_OBJECTS_H

#include "state.h"
#include "zipread.h"

/* A resolved GLOBAL on the VM stack: one of ours (id), or a callable the
 * user trusted through safe_globals (id G_UNKNOWN, obj set). */
typedef struct {
    PyObject_HEAD
    int id;
    int arg;
    PyObject *canon; /* "module.name" */
    PyObject *obj;   /* the user's trusted object, or NULL */
} GlobalRef;

/* torchfree.Storage: the bytes of one storage record. */
typedef struct {
    PyObject_HEAD
    PyObject *key;      /* str */
    PyObject *location; /* str: the target tag after map_location */
    Py_ssize_t nbytes;
    int dtype;          /* DtypeId of its first use (uint8 for untyped) */
    char *data;         /* NULL for meta storages */
    PyObject *owner;    /* keeps data alive: memoryview of the source, an ndarray, a Storage */
    Py_buffer view;     /* held when data comes from a user buffer */
    int has_view;
    int readonly;
    int meta;
    int swap_unit;      /* bytes per unit to swap for a big-endian file, 0 none */
    int swapped;
    int pending;        /* buffer allocated, bytes still to be read (deferred pread) */
    int unread;         /* lazy archives: record located, nothing allocated or read yet */
    int hooked;         /* the map_location callable has seen it (or there is none) */
    int write_location; /* storage_over(..., location): the writer writes `location`, not "cpu" */
    PyObject *saved;    /* the saved location tag (for the map_location callable) */
    PyObject *upcast;   /* complex32 storages: the whole storage as complex64, made once */
    struct ZipEntryRef { ZipEntry *entry; } rec;
    const struct Loader *loader; /* the load that made it: only it may read the record */
} StorageObject;

/* torchfree._core.TensorRef: a validated tensor of a lazy archive, not read yet
 * (tensor.c makes them; scaninfo.c reads them for scan()). */
typedef struct {
    PyObject_VAR_HEAD  /* ob_size: 2 * nd numbers in dims */
    PyObject *storage; /* StorageObject */
    int dtype;         /* DtypeId */
    int nd;
    int conj, neg;
    int64_t offset;
    int64_t *size;     /* dims: nd sizes */
    int64_t *stride;   /* dims + nd: nd strides (elements) */
    int64_t dims[1];   /* sized to 2 * nd at allocation: a scan of 50k tensors makes 50k of these */
} TensorRef;

#endif
