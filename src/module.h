/* module.h - the CPython layer's shared declarations: module state, the
 * per-call Loader, and the object types (GlobalRef, Storage).
 *
 * Ownership notes use CPython's words: "new reference", "borrowed",
 * "steals". Functions returning int give 0 on success, -1 with an exception
 * set. */
#ifndef TORCHFREE_MODULE_H
#define TORCHFREE_MODULE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL torchfree_ARRAY_API
#ifndef TORCHFREE_MODULE_C
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "common.h"
#include "dtypes.h"
#include "globals.h"
#include "limits.h"
#include "zipread.h"

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

enum { SRC_MAP = 0, SRC_COPY = 1, SRC_FD = 2, SRC_PYFILE = 3 };
/* container formats: zip (torch >= 1.6 and TorchScript), the legacy magic-number
 * stream (0.1.10-1.5), the tar format (<= 0.1.9) */
enum { FMT_ZIP = 0, FMT_LEGACY = 1, FMT_TAR = 2 };
enum { ML_NONE = 0, ML_STR = 1, ML_DICT = 2, ML_CALL = 3 };

typedef struct Loader {
    ModuleState *st;
    /* source */
    int mode;
    int require_map;
    PyObject *src_owner;   /* memoryview of the source buffer (SRC_MAP/SRC_COPY) */
    const uint8_t *src;    /* its bytes */
    int src_writable;
    int fd;                /* SRC_FD (also the read_at context) */
    PyObject *pyfile;      /* SRC_PYFILE: a seekable binary file object (owned) */
    uint64_t pyfile_start; /* its position where the input starts */
    uint64_t size;
    int format;            /* FMT_* */
    ZipReader zip;
    int file_big;          /* the byteorder record says big (or, without one, the default below) */
    int big_endian;        /* the file's byte order differs from ours */
    int default_big;       /* byte order of a zip without a byteorder record: big (1) or little (0);
                            * torch.serialization.set_default_load_endianness in torch mode */
    uint64_t end;          /* legacy stream: the offset just past its last storage (once loaded) */
    /* options */
    int ml_kind;
    PyObject *map_location; /* str, dict or the user's callable (owned) */
    int weights_only;
    int proto;              /* the running pickle's protocol (its last PROTO; 0 before one): below 3,
                             * Python 2 names are mapped as pickle's fix_imports does */
    PyObject *safe_globals; /* dict "module.name" -> object, or NULL (owned) */
    PyObject *encoding;     /* str, or NULL for "bytes" (owned) */
    TfLimits lim;
    int lazy;               /* tensors become TensorRefs, storages are read on demand */
    int torchscript;        /* a torch.jit.save archive (it has constants.pkl): __torch__ classes
                             * become inert Opaques even under weights_only */
    const char *storage_dir; /* folder of the storage records of the pickle being run: "data/"
                              * (NULL means that too) or "constants/" */
    PyObject *globals_seen; /* set of "module.name" of every GLOBAL, or NULL */
    /* torch mode (torchfree.torch.load): a dict of helpers that make torch objects, which
     * override the numpy ones by name; NULL for numpy results (owned) */
    PyObject *torch;
    PyObject *torch_tensor; /* torch["tensor"](storage, dtype_id, offset, size, stride, conj, neg) (borrowed) */
    PyObject *torch_dtypes; /* torch["dtypes"]: tuple of DT_COUNT torch dtypes (or None) (borrowed) */
    /* torch["defer"] (borrowed; NULL: absent): fn(saved_location) -> bool, whether a storage saved
     * there may have its bytes read after unpickling (storage_finish) when copying from a file:
     * False when map_location hands it, bytes and all, to torch during the load (a callable, a
     * device); defer_loc (owned) / defer_last: the last location asked and its answer */
    PyObject *torch_defer;
    PyObject *defer_loc;
    int defer_last;
    /* state */
    PyObject *storage_list; /* every StorageObject, in first-use order (records point at theirs) */
    PyObject *storages;     /* dict key -> StorageObject, for keys without a record (meta) */
    size_t data0;           /* 1 + directory index of data/0; 0 unknown, SIZE_MAX none */
    PyObject *pending;      /* list of StorageObject with deferred reads */
    /* while unpickling goes on, the deferred reads are handed out in batches to a thread of
     * their own (storage.c), one batch at a time: pending[:pend_sent] are handed out */
    Py_ssize_t pend_sent;
    uint64_t pend_bytes;    /* bytes of pending[pend_sent:] */
    struct ReadBatch *batch; /* the batch being read, or NULL */
    uint64_t total_alloc;
    /* copy loads: huge pages still free for fresh buffers (storage_thp_fit); thp_probed: 0 not
     * asked yet, 1 asked, 2 asked again after it fell short (no more asking in this load) */
    int thp_probed;
    uint64_t thp_left;
    const char *record;     /* name of the pickle record, for messages */
    /* legacy stream and tar: storage bytes come after (or apart from) the pickle */
    int legacy_be;          /* sys_info says a big-endian host wrote it (some dtypes stay big-endian) */
    PyObject *fixups;       /* list: copies made from storages before their bytes were read */
    int legacy_rerun;       /* a rebuild needed bytes not read yet: run the main pickle again after */
    PyObject *tar_tensors;  /* tar: key -> tensor of the "tensors" member (persistent ids name them) */
    /* pickle VM */
    const uint8_t *pk, *pk_end, *pk_start;
    PyObject **stack;
    Py_ssize_t sp, stack_cap;
    Py_ssize_t *marks;
    Py_ssize_t nmarks, marks_cap;
    PyObject **memo;
    Py_ssize_t memo_len, memo_cap;
    uint64_t op_offset;     /* offset of the opcode being run */
    int hooks_fast;         /* torch's tensor pattern may run fused (fastpath.c, rebuild_v2_fused) */
    int hooks_fused;        /* it did: some memo slots were left empty */
    int hooks_escaped;      /* a memo GET met an empty slot: vm_run runs the pickle again unfused */
    /* one-shot mmap loads: the pages of local headers already read are dropped from this process
     * as the load goes (archive.c, loader_drop_note), so that it adds only metadata to its RSS */
    int drop_ok;            /* the mapping is ours and no page of it can be dirty (see loader_drop_start) */
    int drop_async;         /* the prefault thread drops them (archive.c) */
    unsigned drop_n;        /* headers read since the last drop */
    uint64_t drop_min, drop_max, drop_end; /* their lowest and highest offsets; end of the dropped span */
    volatile uint64_t drop_seen; /* highest header offset read so far (paces the prefault thread) */
    struct Prefault *prefault;   /* the prefault thread's state while it runs (archive.c) */
} Loader;

/* module.c */
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
/* helpers[name](*args) (args: a tuple, borrowed; NULL passes the error on). New reference.
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

/* archive.c */
extern PyType_Spec ArchiveSpec;
PyObject *mod_load_zip(PyObject *module, PyObject *args, PyObject *kwargs);
/* Parse the options of load_zip/load_legacy/Archive into L; open the zip when fmt is FMT_ZIP
 * (the other formats need a buffer source). */
int loader_open(Loader *L, ModuleState *st, PyObject *args, PyObject *kwargs, const char *fname, int fmt);
void loader_close(Loader *L);
/* A local header of the mapping was read (zipread_locate): its page may be dropped soon. */
void loader_drop_note(Loader *L, const ZipEntry *e);
/* No page of the mapping is dropped from now on (none is being dropped when it returns): call it
 * before running Python code or releasing the GIL during a load, as user code could then see an
 * array over the mapping and write to it. */
void loader_drop_off(Loader *L);
/* numpy's or ml_dtypes' descriptors where dtype dt needs them and they are not imported yet: page
 * dropping stops first (the import runs Python code). 0, or -1 with an exception. */
int loader_need_dtype(Loader *L, int dt);
/* Torch mode: torch["finish"](obj, number of storages) (bare storages become torch storages).
 * New reference. */
PyObject *loader_torch_finish(Loader *L, PyObject *obj);

/* legacy.c */
PyObject *mod_load_legacy(PyObject *module, PyObject *args, PyObject *kwargs);
/* Persistent ids of the legacy stream (6-tuples) and the tar format (keys). New reference. */
PyObject *legacy_persistent_load(Loader *L, PyObject *pid);

/* vm.c (the pickle VM; vm.h for its internals) */
PyObject *vm_run(Loader *L, const uint8_t *data, size_t len); /* new reference */
/* Run the pickle that starts at data and ends at its STOP (bytes after it are
 * the caller's: the legacy stream concatenates pickles and blobs); *used gets
 * its length. New reference. */
PyObject *vm_run_at(Loader *L, const uint8_t *data, size_t len, size_t *used);
void vm_free(Loader *L);
/* Dotted key path of the object being built, e.g. "model.fc1.weight" (new reference). */
PyObject *vm_key_path(Loader *L);

/* storage.c */
extern PyType_Spec StorageSpec;
extern PyType_Spec GlobalRefSpec;
/* Persistent id -> Storage (new reference). */
PyObject *storage_persistent_load(Loader *L, PyObject *pid);
/* The same for a zip checkpoint's id given as its n items (pid[0..n), n >= 1). New reference. */
PyObject *storage_persistent_items(Loader *L, PyObject *const *pid, Py_ssize_t n);
/* The same from its parts: dtype (a DtypeId), key and saved location (str, borrowed), numel
 * (-1: out of range). New reference. */
PyObject *storage_get(Loader *L, int dtype, PyObject *key, PyObject *saved, long long numel);
/* A fresh Storage made by L (no data yet). New reference. */
StorageObject *storage_new(Loader *L, PyObject *key, PyObject *location, Py_ssize_t nbytes, int dtype);
PyObject *mod_storage_at(PyObject *module, PyObject *args);
PyObject *mod_storage_over(PyObject *module, PyObject *args);
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

/* scaninfo.c */
extern PyType_Spec TensorInfoSpec;
/* walk(obj, mode, sep, children, refs=False, info_type=None, other=None, max_depth=...):
 * the tensors of obj by dotted name: mode 0 a list of (name, leaf), 1 a dict, 2 a list of
 * info_type (TensorRefs made in C, other leaves by other(name, leaf)). */
PyObject *mod_walk(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *mod_storage_infos(PyObject *module, PyObject *args);
PyObject *mod_record_infos(PyObject *module, PyObject *args);
PyObject *mod_info_table(PyObject *module, PyObject *list);
/* The zip directory packed as bytes for mod_record_infos (new reference). */
PyObject *records_pack(const ZipReader *z);

#endif
