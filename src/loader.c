/* loader.c - a Loader's life: its options parsed (map_location classified, limits, torch mode),
 * its source opened (a buffer, a file descriptor or a Python file; a zip's version and byteorder
 * records read), its hooks set to the zip checkpoint's, and everything it holds released. Also
 * torch mode's last step over a load's result (loader_torch_finish). */
#include "pickler.h"
#include "rebuild.h"
#include "vm.h"

/* The hooks of a zip checkpoint (the legacy formats change load_persid). */
static const LoaderHooks zip_hooks = {
    .load_persid = storage_persistent_load,
    .reduce = tensor_reduce,
    .build = tensor_build,
    .global_value = tensor_global_value,
    .fuse_tensor = tensor_fused,
    .fuse_persid = persid_fused,
    .fuse_rebuild_v2 = rebuild_v2_fused,
    .key_path = vm_key_path,
};

/* Read a small record (version, byteorder) into buf (NUL-terminated). */
static int small_record(Loader *L, const char *name, char *buf, size_t cap, int *found) {
    ZipEntry *e = zipread_find(&L->zip, name, strlen(name));
    *found = e != NULL;
    if (e == NULL) return 0;
    if (e->usize >= cap)
        return tf_raise(L, L->st->FormatError, "record %s is %llu bytes long", name, (unsigned long long)e->usize);
    TfErr err = {0};
    if (zipread_extract(&L->zip, e, (uint8_t *)buf, &err) != TF_OK) return tf_raise_err(L, &err);
    buf[e->usize] = 0;
    return 0;
}

static int host_is_big(void) {
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 0;
}

static int read_version_and_byteorder(Loader *L) {
    char buf[64];
    int found;
    if (small_record(L, ".data/version", buf, sizeof buf, &found) < 0) return -1;
    if (!found && small_record(L, "version", buf, sizeof buf, &found) < 0) return -1;
    if (!found) return tf_raise(L, L->st->FormatError, "archive has no version record: not a torch checkpoint");
    char *end;
    long v = strtol(buf, &end, 10);
    while (*end == '\n' || *end == '\r' || *end == ' ') end++;
    if (end == buf || *end != 0 || v < 1)
        return tf_raise(L, L->st->FormatError, "version record holds %.20s, not a number", buf);
    if (v > 10)
        return tf_raise(L, L->st->FormatError,
                        "checkpoint has format version %ld; the maximum supported version for reading is 10", v);
    if (small_record(L, "byteorder", buf, sizeof buf, &found) < 0) return -1;
    int file_big = L->default_big; /* no record: little, unless torch mode says otherwise */
    if (found) {
        file_big = 0;
        if (strcmp(buf, "big") == 0) file_big = 1;
        else if (strcmp(buf, "little") != 0)
            return tf_raise(L, L->st->FormatError, "byteorder record holds an unknown value");
    }
    int host_big = host_is_big();
    L->file_big = file_big;
    L->big_endian = file_big != host_big;
    return 0;
}

void loader_close(Loader *L) {
    storage_batch_abort(L); /* its thread writes into storages of L->pending */
    vm_free(L);
    zipread_close(&L->zip);
    Py_CLEAR(L->storages);
    Py_CLEAR(L->storage_list);
    Py_CLEAR(L->pending);
    Py_CLEAR(L->fixups);
    Py_CLEAR(L->tar_tensors);
    Py_CLEAR(L->src_owner);
    Py_CLEAR(L->map_location);
    Py_CLEAR(L->safe_globals);
    Py_CLEAR(L->encoding);
    Py_CLEAR(L->globals_seen);
    Py_CLEAR(L->pyfile);
    Py_CLEAR(L->torch);
    Py_CLEAR(L->defer_loc);
    L->torch_tensor = L->torch_dtypes = L->torch_defer = NULL;
    L->src = NULL;
}

static char *open_kwlist[] = {"src", "size", "mode", "require_map", "map_location",
                              "weights_only", "safe_globals", "encoding", "limits", "torch", NULL};
#define OPEN_FORMAT "OK$ipOpOOOO"

/* default_byteorder=None/"little"/"big"/"native" -> L->default_big (0 or 1), or -1 (raised). */
static int parse_default_byteorder(PyObject *v) {
    if (v == NULL || v == Py_None) return 0;
    if (PyUnicode_Check(v)) {
        if (PyUnicode_CompareWithASCIIString(v, "little") == 0) return 0;
        if (PyUnicode_CompareWithASCIIString(v, "big") == 0) return 1;
        if (PyUnicode_CompareWithASCIIString(v, "native") == 0) return host_is_big();
    }
    PyErr_SetString(PyExc_ValueError, "default_byteorder must be None, 'little', 'big' or 'native'");
    return -1;
}

/* Parse the options and, for a zip, open it and read its version and byteorder
 * records. The Loader keeps its own references to the options. */
int loader_open(Loader *L, ModuleState *st, PyObject *args, PyObject *kwargs, const char *fname, int fmt) {
    PyObject *src, *map_location, *safe_globals, *encoding, *limits, *torch = Py_None;
    unsigned long long size;
    int mode, require_map, weights_only, drop_pages = 0, default_big = 0;
    char format[64];
    snprintf(format, sizeof format, "%s:%s", OPEN_FORMAT, fname);
    memset(L, 0, sizeof *L); /* loader_close() is safe on it whatever happens below */
    L->fd = -1;
    /* drop_pages=bool and default_byteorder=str, optional (the others are required): taken out
     * before parsing */
    PyObject *dp = kwargs != NULL ? PyDict_GetItemString(kwargs, "drop_pages") : NULL;
    PyObject *bo = kwargs != NULL ? PyDict_GetItemString(kwargs, "default_byteorder") : NULL;
    if (dp != NULL || bo != NULL) {
        if ((dp != NULL && (drop_pages = PyObject_IsTrue(dp)) < 0) || (default_big = parse_default_byteorder(bo)) < 0 ||
            (kwargs = PyDict_Copy(kwargs)) == NULL)
            return -1;
        if ((dp != NULL && PyDict_DelItemString(kwargs, "drop_pages") < 0) ||
            (bo != NULL && PyDict_DelItemString(kwargs, "default_byteorder") < 0)) {
            Py_DECREF(kwargs);
            return -1;
        }
    }
    int parsed = PyArg_ParseTupleAndKeywords(args, kwargs, format, open_kwlist, &src, &size, &mode, &require_map,
                                             &map_location, &weights_only, &safe_globals, &encoding,
                                             &limits, &torch);
    if (dp != NULL || bo != NULL) Py_DECREF(kwargs);
    if (!parsed) return -1;
    memset(L, 0, sizeof *L);
    L->default_big = default_big;
    L->st = st;
    L->hook = zip_hooks;
    L->drop_ok = drop_pages && fmt == FMT_ZIP; /* a request: loader_drop_start decides */
    L->mode = mode;
    L->require_map = require_map;
    L->weights_only = weights_only;
    L->safe_globals = safe_globals == Py_None ? NULL : Py_NewRef(safe_globals);
    L->encoding = encoding == Py_None ? NULL : Py_NewRef(encoding);
    L->fd = -1;
    if (L->safe_globals != NULL && !PyDict_Check(L->safe_globals)) {
        PyErr_SetString(PyExc_TypeError, "safe_globals must be a dict");
        return -1;
    }
    if ((L->map_location = tf_map_location(map_location, &L->ml_kind)) == NULL) return -1;
    if (tf_parse_limits(limits, &L->lim) < 0) return -1;
    if (torch != Py_None) {
        /* torch mode: every tensor is made by torch["tensor"], dtype values are torch["dtypes"] */
        PyObject *tt = PyDict_Check(torch) ? PyDict_GetItemString(torch, "tensor") : NULL;
        PyObject *td = PyDict_Check(torch) ? PyDict_GetItemString(torch, "dtypes") : NULL;
        if (tt == NULL || !PyCallable_Check(tt) || td == NULL || !PyTuple_Check(td) || PyTuple_GET_SIZE(td) != DT_COUNT) {
            PyErr_SetString(PyExc_TypeError, "torch must be a dict with 'tensor' and 'dtypes'");
            return -1;
        }
        L->torch = Py_NewRef(torch);
        L->torch_tensor = tt;
        L->torch_dtypes = td;
        L->torch_defer = PyDict_GetItemString(torch, "defer");
    }
    L->storages = PyDict_New();
    L->storage_list = PyList_New(0);
    L->pending = PyList_New(0);
    L->fixups = PyList_New(0);
    L->format = fmt;
    if (L->storages == NULL || L->storage_list == NULL || L->pending == NULL || L->fixups == NULL) return -1;
    if (fmt != FMT_ZIP && mode != SRC_MAP && mode != SRC_COPY) {
        PyErr_SetString(PyExc_ValueError, "legacy and tar checkpoints are read from a buffer");
        return -1;
    }
    TfErr err = {0};
    TfStatus rc;
    if (mode == SRC_PYFILE) {
        /* src: (file object, start position); read through seek/readinto */
        unsigned long long start;
        PyObject *f;
        if (!PyArg_ParseTuple(src, "OK:src", &f, &start)) return -1;
        L->pyfile = Py_NewRef(f);
        L->pyfile_start = start;
        L->size = size;
        rc = zipread_open(&L->zip, storage_read_pyfile, L, L->size, &L->lim, &err);
    } else if (mode == SRC_FD) {
        L->fd = (int)PyLong_AsLong(src);
        if (L->fd == -1 && PyErr_Occurred()) return -1;
        L->size = size;
        Py_BEGIN_ALLOW_THREADS
        rc = zipread_open(&L->zip, storage_read_fd, &L->fd, L->size, &L->lim, &err);
        Py_END_ALLOW_THREADS
    } else {
        L->src_owner = PyMemoryView_FromObject(src);
        if (L->src_owner == NULL) return -1;
        /* pages are only ever dropped from a file mapping (Source's own): never from memory
         * that holds the only copy of its bytes */
        if (strcmp(Py_TYPE(src)->tp_name, "mmap.mmap") != 0) L->drop_ok = 0;
        Py_buffer *view = PyMemoryView_GET_BUFFER(L->src_owner);
        L->src = view->buf;
        L->size = (uint64_t)view->len;
        L->src_writable = !view->readonly;
        if (fmt != FMT_ZIP) return 0;
        rc = zipread_open_mem(&L->zip, L->src, L->size, &L->lim, &err);
    }
    if (rc != TF_OK) return tf_raise_err(L, &err);
    /* torch.jit.save archives are told by their constants.pkl record, as torch.load does */
    L->torchscript = zipread_find(&L->zip, "constants.pkl", 13) != NULL;
    return read_version_and_byteorder(L);
}

/* How deep holds_storage looks (torch.py's _replace_storages goes as deep). */
#define FINISH_MAX_DEPTH 200

/* 1 when obj holds a torchfree.Storage in its dicts, lists and exact tuples (each container
 * looked at once: a pickle's memo can make a deep DAG of them), 0 when not, -1 on error. No
 * Python code runs. */
static int holds_storage(ModuleState *st, PyObject *obj, PtrMap *seen, int depth) {
    PyTypeObject *tp = Py_TYPE(obj);
    if (tp == st->StorageType) return 1;
    if (!(PyDict_Check(obj) || PyList_Check(obj) || tp == &PyTuple_Type) || depth > FINISH_MAX_DEPTH) return 0;
    uint64_t mark;
    if (ptrmap_get(seen, obj, &mark)) return 0;
    if (ptrmap_set(seen, obj, 1) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    if (PyDict_Check(obj)) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(obj, &pos, &k, &v)) {
            int r = holds_storage(st, v, seen, depth + 1);
            if (r != 0) return r;
        }
        return 0;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject **items = PySequence_Fast_ITEMS(obj);
    for (Py_ssize_t i = 0; i < n; i++) {
        int r = holds_storage(st, items[i], seen, depth + 1);
        if (r != 0) return r;
    }
    return 0;
}

/* Torch mode: torch gives the storages a file holds outside tensors as TypedStorage; the
 * "finish" helper replaces ours, called only when there is one (walking the result in Python
 * would cost every load). New reference. */
PyObject *loader_torch_finish(Loader *L, PyObject *obj) {
    PyObject *fin = L->torch ? PyDict_GetItemString(L->torch, "finish") : NULL;
    if (fin == NULL) return Py_NewRef(obj);
    PtrMap seen;
    ptrmap_init(&seen);
    int found = holds_storage(L->st, obj, &seen, 0);
    ptrmap_free(&seen);
    if (found <= 0) return found < 0 ? NULL : Py_NewRef(obj);
    return PyObject_CallOneArg(fin, obj);
}

