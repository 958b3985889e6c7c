/* state.h - the base floor of the CPython layer: the module state, errors (with the Loader's
 * hook for error positions), the lazy numpy/ml_dtypes imports, limits, the Python helpers and
 * map_location's one classifier. Everything above includes it; it calls nothing above it.
 *
 * Ownership notes use CPython's words: "new reference", "borrowed",
 * "steals". Functions returning int give 0 on success, -1 with an exception
 * set. */
#ifndef TORCHFREE_STATE_H
#define TORCHFREE_STATE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL torchfree_ARRAY_API
#ifndef TORCHFREE_STATE_C
#define NO_IMPORT_ARRAY
/* _core methods of this floor: _set_helpers(helpers, descrs), map_location(m), map_target(m, saved) */
PyObject *mod_set_helpers(PyObject *module, PyObject *args);
extern const char mod_set_helpers_doc[];
PyObject *mod_map_location(PyObject *module, PyObject *m);
PyObject *mod_map_target(PyObject *module, PyObject *args);

#endif
#include <numpy/arrayobject.h>

#include "common.h"
#include "dtypes.h"
#include "globals.h"
#include "limits.h"

typedef struct {
    PyObject *CheckpointError, *FormatError, *UnpicklingError, *UnsafeGlobalError, *LimitError;
    PyTypeObject *GlobalRefType;
    PyTypeObject *StorageType;
    PyTypeObject *TensorRefType;
    PyTypeObject *TensorInfoType;    /* base of torchfree.TensorInfo (scaninfo.c) */
    PyObject *OrderedDict, *Counter; /* collections types, looked up once in exec */
    PyArray_Descr *descr[DT_COUNT];  /* arrays of this torch dtype (NULL: none) */
    PyObject *dtype_value[DT_COUNT]; /* what a `torch <dtype>` GLOBAL becomes */
    PyObject *helpers;               /* dict of Python helpers set by torchfree/__init__.py */
    int np_loaded;                   /* numpy's C API is imported, descr[] of its own dtypes set (tf_numpy) */
    int ml_loaded;                   /* the ml_dtypes descriptors were asked for (tf_ml_dtypes) */
    PyObject *OpaqueType;            /* helpers["Opaque"], cached for the hot type checks */
    PyObject *MetaArrayType;         /* helpers["MetaArray"] */
    PyObject *QuantizedArrayType;    /* helpers["QuantizedArray"]: a tensor leaf to walk() */
    PyObject *SparseArrayType;       /* helpers["SparseArray"]: a tensor leaf to walk() */
    PyObject *str_storage, *str_meta, *str_metadata_attr, *str_conj, *str_neg, *str_shape, *str_dtype;
} ModuleState;

/* The per-call state of a load (loader.h defines it). */
typedef struct Loader Loader;

/* state.c */
/* The module's definition: module.c fills in its method table and slots before init. */
extern struct PyModuleDef tf_core_module;
int tf_state_traverse(PyObject *m, visitproc visit, void *arg);
int tf_state_clear(PyObject *m);
ModuleState *tf_state_of_type(PyTypeObject *tp);
/* Raise exc with "message (record R, offset N)"; returns -1. */
int tf_raise(Loader *L, PyObject *exc, const char *fmt, ...);
/* Same, with the exception being handled (if any) as __cause__; returns -1. */
int tf_raise_from(Loader *L, PyObject *exc, const char *fmt, ...);
/* Raise from a TfErr of the Python-free layer; returns -1. */
int tf_raise_err(Loader *L, const TfErr *err);
/* limits: None or a dict of LIMITS names to ints (the rest keep their defaults). */
int tf_parse_limits(PyObject *limits, TfLimits *out);
/* {name: value} of lim (of the defaults for NULL): LIMITS. New reference. */
PyObject *tf_limits_dict(const TfLimits *lim);
PyObject *tf_helper(ModuleState *st, const char *name); /* borrowed, or NULL + exception */
/* helpers[name](*args) (args: a tuple, borrowed; NULL passes the error on); page dropping stops
 * first (pagedrop.c). New reference.
 * A failure that is not ours becomes an UnpicklingError naming the helper. */
PyObject *tf_call_helper(Loader *L, const char *name, PyObject *args);

/* numpy is imported on first need, not with torchfree: `torchfree info` and scan of a zip
 * checkpoint run without it (numpy's import is most of such a process). Every numpy array the
 * core makes (loads, save, materialize, Storage.numpy(), inline tensors and numpy objects of a
 * pickle) calls this first; it imports numpy's C API and fills descr[] and dtype_value[] of
 * numpy's own dtypes once. 0, or -1 with an exception. */
int tf_numpy(ModuleState *st);
/* 1 when o is a numpy array (exact: of type ndarray itself), 0 when not, -1 on error. Before
 * tf_numpy, an ndarray can exist only if numpy is in sys.modules: only then is its C API
 * imported to tell. */
int tf_is_ndarray(ModuleState *st, PyObject *o, int exact);

/* ml_dtypes (bfloat16, float8_*) is imported on first need, not with torchfree: the first
 * GLOBAL naming such a dtype (its storage class, the dtype itself, a legacy tensor class) and
 * save meeting an array dtype it does not know call this, which fills descr[] and
 * dtype_value[] for them once (helpers["ml_dtypes_descrs"]). 0, or -1 with an exception. */
int tf_ml_dtypes(ModuleState *st);
/* The dtype object of dtype dt: its numpy descriptor (numpy's or ml_dtypes' imported first where
 * dt needs them), else torch's name "torch.<name>". Borrowed; NULL with an exception set if that import
 * failed. Within a load, call loader_drop_off first when tf_dtype_needs_import says so. */
PyObject *tf_dtype_of(ModuleState *st, int dt);
int tf_dtype_needs_import(const ModuleState *st, int dt);
/* What tf_dtype_of imports for dt (numpy first; ml_dtypes only where numpy has no such dtype),
 * without the dtype. 0, or -1 with an exception. */
int tf_need_dtype(ModuleState *st, int dt);

/* tf_need_dtype within load L: page dropping stops first (the import runs Python code). 0, or -1
 * with an exception. */
int tf_load_need_dtype(Loader *L, int dt);

/* map_location, classified once: None (ML_NONE), a location string (ML_STR: str, ASCII bytes, a
 * torch.device-like object with `type` and `index`), a dict of str to str (ML_DICT) or a callable
 * (ML_CALL). Returns the normalized value (new reference) and sets *kind; NULL with TypeError
 * for anything else. */
enum { ML_NONE = 0, ML_STR = 1, ML_DICT = 2, ML_CALL = 3 };
PyObject *tf_map_location(PyObject *m, int *kind);
/* The location tag a storage saved at `saved` goes to under a classified map_location (kind, ml):
 * ml for a string, ml[saved] (or saved) for a dict, saved otherwise. New reference. */
PyObject *tf_map_target(int kind, PyObject *ml, PyObject *saved);

/* _core methods of this floor: _set_helpers(helpers, descrs), map_location(m), map_target(m, saved) */
PyObject *mod_set_helpers(PyObject *module, PyObject *args);
extern const char mod_set_helpers_doc[];
PyObject *mod_map_location(PyObject *module, PyObject *m);
PyObject *mod_map_target(PyObject *module, PyObject *args);

#endif
