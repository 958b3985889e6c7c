/* loader.h - the per-call Loader (source, options, storages, VM state, page dropping) and its
 * hooks; loader.c opens and closes it. */
#ifndef TORCHFREE_LOADER_H
#define TORCHFREE_LOADER_H

#include "objects.h"

enum { SRC_MAP = 0, SRC_COPY = 1, SRC_FD = 2, SRC_PYFILE = 3 };
/* container formats: zip (torch >= 1.6 and TorchScript), the legacy magic-number
 * stream (0.1.10-1.5), the tar format (<= 0.1.9) */
enum { FMT_ZIP = 0, FMT_LEGACY = 1, FMT_TAR = 2 };

/* What the floors below a load driver need from the floors above them, filled by the driver that
 * opens the Loader (as _pickle.c's pers_func): the VM's services of the rebuild floor, the
 * persistent-id loader of the format, and the VM's key path for error positions. */
typedef struct LoaderHooks {
    /* BINPERSID: persistent id -> Storage (new reference) */
    PyObject *(*load_persid)(Loader *L, PyObject *pid);
    /* REDUCE of one of our globals (args borrowed), BUILD on an object one made, the value of a
     * GLOBAL that is itself data (NULL without an exception: not a value). New references. */
    PyObject *(*reduce)(Loader *L, GlobalRef *g, PyObject *args);
    PyObject *(*build)(Loader *L, PyObject *obj, PyObject *state);
    PyObject *(*global_value)(Loader *L, const GlobalHit *hit, const char *canon);
    /* torch's per-tensor sequence run fused (fastpath.c): 1 done, 0 not this pattern, -1 error */
    int (*fuse_tensor)(Loader *L);
    int (*fuse_persid)(Loader *L);
    int (*fuse_rebuild_v2)(Loader *L);
    /* the dotted key path of the object being built, for error messages (new reference) */
    PyObject *(*key_path)(Loader *L);
} LoaderHooks;

struct Loader {
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
     * as the load goes (pagedrop.c, loader_drop_note), so that it adds only metadata to its RSS */
    int drop_ok;            /* the mapping is ours and no page of it can be dirty (see loader_drop_start) */
    int drop_async;         /* the prefault thread drops them (pagedrop.c) */
    unsigned drop_n;        /* headers read since the last drop */
    uint64_t drop_min, drop_max, drop_end; /* their lowest and highest offsets; end of the dropped span */
    volatile uint64_t drop_seen; /* highest header offset read so far (paces the prefault thread) */
    struct Prefault *prefault;   /* the prefault thread's state while it runs (pagedrop.c) */
    LoaderHooks hook;            /* set by loader_open (a driver may change load_persid) */
};

/* loader.c */
/* Parse the options of load_zip/load_legacy/Archive into L (map_location classified here); open
 * the zip when fmt is FMT_ZIP (the other formats need a buffer source). L->hook gets the zip
 * checkpoint's hooks. */
int loader_open(Loader *L, ModuleState *st, PyObject *args, PyObject *kwargs, const char *fname, int fmt);
/* Release everything the Loader holds (safe on a zeroed or half-opened one). */
void loader_close(Loader *L);
/* Torch mode: torch["finish"](obj, number of storages) (bare storages become torch storages).
 * New reference. */
PyObject *loader_torch_finish(Loader *L, PyObject *obj);

#endif
