/* archive.c - a zip checkpoint opened for loading: load_zip() for one-shot
 * loads, and the Archive type for scan() and lazy open().
 *
 * Both run on a Loader: the zip reader over the source (a buffer or a file
 * descriptor), the version/byteorder records, the options, and the table of
 * storages. An Archive keeps it alive between calls so single tensors can be
 * read on demand; load_zip keeps it on the C stack for one call. */
#include "load.h"
#include "pagedrop.h"
#include "rebuild.h"
#include "scaninfo.h"
#include "vm.h"

/* Run the pickle `record` on the VM, its storages being the records under `dir`
 * (lazy: tensors become TensorRefs). New reference. */
static PyObject *loader_unpickle_record(Loader *L, const char *record, const char *dir) {
    ZipEntry *pe = zipread_find(&L->zip, record, strlen(record));
    if (pe == NULL) {
        if (zipread_find(&L->zip, "model.json", 10) != NULL)
            return tf_raise(L, L->st->FormatError,
                            "archive is a TorchScript model of the torch 1.0-1.3 format (model.json, no %s), "
                            "which torchfree does not read", record),
                   NULL;
        return tf_raise(L, L->st->FormatError, "archive has no %s record", record), NULL;
    }
    if (pe->usize > L->lim.pickle_bytes)
        return tf_raise(L, L->st->LimitError, "%s of %llu bytes exceeds the limit of %llu bytes", record,
                        (unsigned long long)pe->usize, (unsigned long long)L->lim.pickle_bytes),
               NULL;
    if (L->storage_dir == NULL || strcmp(L->storage_dir, dir) != 0) {
        L->storage_dir = dir;
        L->data0 = 0; /* the directory index of <dir>0 is looked up again */
    }
    TfErr err = {0};
    if (zipread_locate(&L->zip, pe, &err) != TF_OK) return tf_raise_err(L, &err), NULL;
    const uint8_t *pk;
    uint8_t *pickle_buf = NULL;
    if ((L->mode == SRC_MAP || L->mode == SRC_COPY) && pe->method == 0) {
        pk = L->src + pe->data_offset;
    } else {
        pickle_buf = PyMem_Malloc(pe->usize ? (size_t)pe->usize : 1);
        if (pickle_buf == NULL) return PyErr_NoMemory();
        if (zipread_extract(&L->zip, pe, pickle_buf, &err) != TF_OK) {
            PyMem_Free(pickle_buf);
            return tf_raise_err(L, &err), NULL;
        }
        pk = pickle_buf;
    }
    L->record = record;
    /* the VM makes many containers and no cycles: a collection pass per few
     * hundred of them would cost more than the whole load */
    int gc_was_enabled = PyGC_Disable();
    /* the pickle is read all along: pages are dropped from its end on (torch writes it first) */
    if (L->drop_ok && pe->data_offset + pe->csize > L->drop_end) L->drop_end = pe->data_offset + pe->csize;
    Prefault pf;
    pthread_t pf_tid;
    int pf_started = L->lazy ? 0 : prefault_start(L, &pf, &pf_tid);
    PyObject *obj = vm_run(L, pk, (size_t)pe->usize);
    prefault_stop(L, &pf, pf_tid, pf_started);
    if (gc_was_enabled) PyGC_Enable();
    L->pk_start = NULL; /* later errors are not at a pickle offset */
    vm_free(L);
    PyMem_Free(pickle_buf);
    return obj;
}

static PyObject *loader_unpickle(Loader *L) { return loader_unpickle_record(L, "data.pkl", "data/"); }

/* A TorchScript archive's constants.pkl (the tensors its code names as CONSTANTS.c<i>, storages
 * under constants/) set as `constants` on the module Opaque that data.pkl gave. */
static int loader_constants(Loader *L, PyObject *obj) {
    if (!L->torchscript || (PyObject *)Py_TYPE(obj) != L->st->OpaqueType) return 0;
    /* constants/<k> are other records than data/<k>: a fresh table for keys without a record */
    PyObject *fresh = PyDict_New();
    if (fresh == NULL) return -1;
    Py_SETREF(L->storages, fresh);
    PyObject *consts = loader_unpickle_record(L, "constants.pkl", "constants/");
    if (consts == NULL) return -1;
    int r = PyObject_SetAttrString(obj, "constants", consts);
    Py_DECREF(consts);
    return r;
}

/* load_zip(src, size, *, mode, ...): the one-shot load behind torchfree.load.
 * src is a buffer (mode 0: zero-copy views; mode 1: copies) or a file
 * descriptor (mode 2: each storage read into fresh memory). */
PyObject *mod_load_zip(PyObject *module, PyObject *args, PyObject *kwargs) {
    Loader L = {0}; /* loader_close below also runs when numpy fails to import (no loader_open) */
    PyObject *obj = NULL;
    if (tf_numpy(PyModule_GetState(module)) == 0 &&
        loader_open(&L, PyModule_GetState(module), args, kwargs, "load_zip", FMT_ZIP) == 0) {
        loader_drop_start(&L);
        PyObject *ts = L.torch && L.torchscript ? PyDict_GetItemString(L.torch, "torchscript") : NULL;
        if (ts != NULL) /* torch mode: torch.load's own answer to a TorchScript archive */
            obj = PyObject_CallNoArgs(ts);
        else
            obj = loader_unpickle(&L);
        if (obj != NULL && (loader_constants(&L, obj) < 0 || storage_finish(&L) < 0)) Py_CLEAR(obj);
        if (obj != NULL) Py_SETREF(obj, loader_torch_finish(&L, obj));
        loader_drop_all(&L);
    }
    loader_close(&L);
    return obj;
}

/* ---- Archive ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Loader L;
    int open;
} ArchiveObject;

static ArchiveObject *archive_check(PyObject *self) {
    ArchiveObject *a = (ArchiveObject *)self;
    if (!a->open) {
        PyErr_SetString(PyExc_ValueError, "the checkpoint is closed");
        return NULL;
    }
    return a;
}

static PyObject *Archive_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    ModuleState *st = tf_state_of_type(type);
    if (st == NULL) return NULL;
    ArchiveObject *a = (ArchiveObject *)type->tp_alloc(type, 0);
    if (a == NULL) return NULL;
    if (loader_open(&a->L, st, args, kwargs, "Archive", FMT_ZIP) < 0) {
        loader_close(&a->L);
        Py_DECREF(a);
        return NULL;
    }
    a->L.drop_ok = 0; /* its arrays outlive any one call */
    a->open = 1;
    return (PyObject *)a;
}

static int Archive_traverse(ArchiveObject *a, visitproc visit, void *arg) {
    Py_VISIT(a->L.map_location);
    Py_VISIT(a->L.safe_globals);
    Py_VISIT(a->L.storages);
    Py_VISIT(a->L.storage_list);
    Py_VISIT(a->L.pending);
    Py_VISIT(a->L.pyfile);
    Py_VISIT(a->L.torch);
    Py_VISIT(Py_TYPE(a));
    return 0;
}

static int Archive_clear(ArchiveObject *a) {
    a->open = 0;
    loader_close(&a->L);
    return 0;
}

static void Archive_dealloc(ArchiveObject *a) {
    PyTypeObject *tp = Py_TYPE(a);
    PyObject_GC_UnTrack(a);
    Archive_clear(a);
    tp->tp_free(a);
    Py_DECREF(tp);
}

PyDoc_STRVAR(Archive_unpickle_doc,
"unpickle($self, /, lazy=True, collect_globals=False)\n--\n\n"
"Run data.pkl. lazy: tensors become TensorRefs read on demand by materialize().\n"
"collect_globals: record every GLOBAL (see globals()).");

static PyObject *Archive_unpickle(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"lazy", "collect_globals", NULL};
    int lazy = 1, collect = 0;
    ArchiveObject *a = archive_check(self);
    if (a == NULL || !PyArg_ParseTupleAndKeywords(args, kwargs, "|pp:unpickle", kwlist, &lazy, &collect))
        return NULL;
    Loader *L = &a->L;
    if (!lazy && tf_numpy(L->st) < 0) return NULL; /* a lazy run makes arrays only where it must */
    L->lazy = lazy;
    if (collect && L->globals_seen == NULL && (L->globals_seen = PySet_New(NULL)) == NULL) return NULL;
    PyObject *obj = loader_unpickle(L);
    if (obj != NULL && !lazy && storage_finish(L) < 0) Py_CLEAR(obj);
    return obj;
}

static PyObject *Archive_materialize(PyObject *self, PyObject *ref) {
    ArchiveObject *a = archive_check(self);
    return a && tf_numpy(a->L.st) == 0 ? tensor_materialize(&a->L, ref) : NULL;
}

static PyObject *Archive_read_storage(PyObject *self, PyObject *storage) {
    ArchiveObject *a = archive_check(self);
    if (a == NULL || tf_numpy(a->L.st) < 0) return NULL;
    if (Py_TYPE(storage) != a->L.st->StorageType) {
        PyErr_SetString(PyExc_TypeError, "expected a torchfree.Storage");
        return NULL;
    }
    if (storage_ready(&a->L, (StorageObject *)storage) < 0) return NULL;
    return Py_NewRef(storage);
}

static PyObject *Archive_records(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    ArchiveObject *a = archive_check(self);
    if (a == NULL) return NULL;
    ZipReader *z = &a->L.zip;
    PyObject *list = PyList_New((Py_ssize_t)z->n_entries);
    if (list == NULL) return NULL;
    for (size_t i = 0; i < z->n_entries; i++) {
        ZipEntry *e = &z->entries[i];
        PyObject *t = Py_BuildValue("(NiKKK)", PyUnicode_DecodeUTF8(e->name, (Py_ssize_t)e->name_len, "replace"),
                                    (int)e->method,
                                    (unsigned long long)e->csize, (unsigned long long)e->usize,
                                    (unsigned long long)(e->header_offset - z->base));
        if (t == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, t);
    }
    return list;
}

static PyObject *Archive_record_table(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    ArchiveObject *a = archive_check(self);
    return a ? records_pack(&a->L.zip) : NULL;
}

static PyObject *Archive_storages(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    ArchiveObject *a = archive_check(self);
    return a ? PyList_GetSlice(a->L.storage_list, 0, PY_SSIZE_T_MAX) : NULL;
}

static PyObject *Archive_globals(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    ArchiveObject *a = (ArchiveObject *)self;
    if (a->L.globals_seen == NULL) return PyList_New(0);
    PyObject *l = PySequence_List(a->L.globals_seen);
    if (l != NULL && PyList_Sort(l) < 0) Py_CLEAR(l);
    return l;
}

static PyObject *Archive_close(PyObject *self, PyObject *Py_UNUSED(ignored)) {
    Archive_clear((ArchiveObject *)self);
    Py_RETURN_NONE;
}

static PyObject *Archive_get_byteorder(ArchiveObject *a, void *c) {
    return PyUnicode_FromString(a->L.file_big ? "big" : "little");
}

static PyObject *Archive_get_prefix(ArchiveObject *a, void *c) {
    if (!a->open) Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8(a->L.zip.prefix, (Py_ssize_t)a->L.zip.prefix_len, "replace");
}

static PyObject *Archive_get_closed(ArchiveObject *a, void *c) { return PyBool_FromLong(!a->open); }

static PyObject *Archive_get_torchscript(ArchiveObject *a, void *c) { return PyBool_FromLong(a->L.torchscript); }

static PyMethodDef Archive_methods[] = {
    {"unpickle", (PyCFunction)(void (*)(void))Archive_unpickle, METH_VARARGS | METH_KEYWORDS, Archive_unpickle_doc},
    {"materialize", Archive_materialize, METH_O,
     "materialize($self, ref, /)\n--\n\nThe array of a TensorRef (reads its storage once)."},
    {"read_storage", Archive_read_storage, METH_O,
     "read_storage($self, storage, /)\n--\n\nRead a lazy Storage's bytes; returns it."},
    {"records", Archive_records, METH_NOARGS,
     "records($self, /)\n--\n\n[(name, method, compressed size, size, header offset)] of the zip."},
    {"record_table", Archive_record_table, METH_NOARGS,
     "record_table($self, /)\n--\n\nrecords() packed as bytes, for _core.record_infos (internal)."},
    {"storages", Archive_storages, METH_NOARGS,
     "storages($self, /)\n--\n\nThe Storage of every record the pickle named, in first-use order."},
    {"globals", Archive_globals, METH_NOARGS,
     "globals($self, /)\n--\n\nSorted 'module.name' of every GLOBAL seen by unpickle(collect_globals=True)."},
    {"close", Archive_close, METH_NOARGS, "close($self, /)\n--\n\nRelease the zip index and source."},
    {NULL},
};

static PyGetSetDef Archive_getset[] = {
    {"byteorder", (getter)Archive_get_byteorder, NULL, "'little' or 'big' (the byteorder record)", NULL},
    {"prefix", (getter)Archive_get_prefix, NULL, "the archive's top folder", NULL},
    {"closed", (getter)Archive_get_closed, NULL, "True after close()", NULL},
    {"torchscript", (getter)Archive_get_torchscript, NULL, "True for a torch.jit.save archive (constants.pkl)", NULL},
    {NULL},
};

static PyType_Slot Archive_slots[] = {
    {Py_tp_new, Archive_new},
    {Py_tp_dealloc, Archive_dealloc},
    {Py_tp_traverse, Archive_traverse},
    {Py_tp_clear, Archive_clear},
    {Py_tp_methods, Archive_methods},
    {Py_tp_getset, Archive_getset},
    {Py_tp_doc, "Archive(src, size, *, mode, require_map, map_location, weights_only, safe_globals,"
                " encoding, limits)\n\nA zip checkpoint opened for scan() and lazy open() (internal)."},
    {0, NULL},
};

PyType_Spec ArchiveSpec = {
    .name = "torchfree._core.Archive",
    .basicsize = sizeof(ArchiveObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Archive_slots,
};
