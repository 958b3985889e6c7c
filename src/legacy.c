/* legacy.c - the two formats before zip: the "magic number" stream written by
 * torch.save from 0.1.10 to 1.5 (and by _use_new_zipfile_serialization=False
 * since), and the tar archive of 0.1.9 and before.
 *
 * Legacy stream (spec §3): five pickles then the storage blobs, concatenated:
 *   magic number, protocol 1001, sys_info, the object (persistent ids
 *   ('storage', type, key, location, numel, view_metadata) and ('module', ...)),
 *   the list of storage keys, then per key: int64 numel + numel x element bytes.
 * A storage's element size is only known from the object pickle, so the blobs
 * cannot be located before it runs: each storage gets its buffer when its
 * persistent id is met (views of it are made at once, as for zip), and the
 * bytes are copied in after the key list. The few things that read bytes while
 * unpickling (complex32 upcasts, conj/neg copies) note a fixup, redone then;
 * rebuilds that compute with their parts' values (quantized, sparse, nested,
 * device tensors) leave None, and the main pickle then runs a second time.
 *
 * Tar (spec §4): members "storages" (pickled (key, location, type) + blob per
 * storage, then a pickled list of views), "tensors" (pickled (key, storage key,
 * class) + raw ndim/sizes/strides/offset per tensor) and "pickle" (the object;
 * persistent ids are keys). Everything is read before the object pickle runs.
 *
 * Both are read from a buffer (a read-only mapping of the file, or bytes); with
 * lazy (scan) no storage byte is copied. */
#include "load.h"
#include "rebuild.h"
#include "vm.h"

#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- small pickles ------------------------------------------------------------ */

/* Run the pickle at *off (a fresh memo) and advance *off past its STOP. Only the
 * main pickle may hold arbitrary objects: the others (magic number, sys_info, key
 * lists, tar headers) are read with weights_only rules whatever the caller asked.
 * New reference. */
static PyObject *run_pickle(Loader *L, uint64_t *off, uint64_t end, const char *what, char *rec, size_t reccap) {
    if (*off >= end) {
        tf_raise(L, L->st->FormatError, "file ends before the %s (at byte %llu)", what, (unsigned long long)*off);
        return NULL;
    }
    snprintf(rec, reccap, "%s at file byte %llu, pickle", what, (unsigned long long)*off);
    L->record = rec;
    size_t used = 0;
    int weights_only = L->weights_only;
    if (strcmp(what, "main pickle") != 0) L->weights_only = 1;
    PyObject *obj = vm_run_at(L, L->src + *off, (size_t)(end - *off), &used);
    L->weights_only = weights_only;
    vm_free(L);
    L->pk_start = NULL;
    if (obj != NULL) *off += used;
    return obj;
}

static int read_i64(Loader *L, uint64_t *off, uint64_t end, const char *what, int64_t *out) {
    if (*off > end || end - *off < 8)
        return tf_raise(L, L->st->FormatError, "file ends inside the %s (at byte %llu)", what,
                        (unsigned long long)*off);
    *out = (int64_t)tf_le64(L->src + *off);
    *off += 8;
    return 0;
}

/* An int in [0, max] from a pickle. */
static int want_count(Loader *L, PyObject *o, uint64_t max, const char *what, uint64_t *out) {
    int overflow = 0;
    long long v = PyLong_Check(o) ? PyLong_AsLongLongAndOverflow(o, &overflow) : -1;
    if (!PyLong_Check(o) || overflow || v < 0)
        return tf_raise(L, L->st->FormatError, "%s is not a non-negative int", what);
    if ((uint64_t)v > max)
        return tf_raise(L, L->st->LimitError, "%s (%lld) exceeds the limit of %llu", what, v,
                        (unsigned long long)max);
    *out = (uint64_t)v;
    return 0;
}

/* ---- persistent ids ---------------------------------------------------------- */

static int is_tag(PyObject *o, const char *tag) {
    if (PyUnicode_Check(o)) return PyUnicode_CompareWithASCIIString(o, tag) == 0;
    if (PyBytes_Check(o)) return strcmp(PyBytes_AS_STRING(o), tag) == 0 && (size_t)PyBytes_GET_SIZE(o) == strlen(tag);
    return 0;
}

/* A buffer for nbytes of a storage whose bytes are read later (zeros when a
 * map_location callable will see it first). */
static int give_buffer(Loader *L, StorageObject *s) {
    if (tf_numpy(L->st) < 0 || storage_charge(L, (uint64_t)s->nbytes) < 0) return -1;
    npy_intp dims[1] = {(npy_intp)s->nbytes};
    PyObject *buf = L->ml_kind == ML_CALL ? PyArray_ZEROS(1, dims, NPY_UINT8, 0) : PyArray_SimpleNew(1, dims, NPY_UINT8);
    if (buf == NULL) return -1;
    s->owner = buf;
    s->data = PyArray_DATA((PyArrayObject *)buf);
    storage_thp_fit(L, s->data, (size_t)s->nbytes);
    return 0;
}

/* A new root storage of key: its target location and a buffer (not for meta).
 * Registered in L->storages. A map_location callable has not seen it yet
 * (hooked = 0): storage_ready shows it. New reference. */
static StorageObject *new_root(Loader *L, PyObject *key, PyObject *saved, uint64_t nbytes, int dtype) {
    PyObject *target = storage_target(L, saved);
    if (target == NULL) return NULL;
    StorageObject *s = storage_new(L, key, target, (Py_ssize_t)nbytes, dtype);
    Py_DECREF(target);
    if (s == NULL) return NULL;
    s->saved = Py_NewRef(saved);
    if (PyUnicode_Compare(s->location, L->st->str_meta) == 0) {
        s->meta = 1;
    } else if (!L->lazy && give_buffer(L, s) < 0) { /* lazy (scan): no bytes at all */
        goto fail;
    }
    s->pending = !s->meta && !L->lazy;
    s->hooked = s->meta || L->lazy || L->ml_kind != ML_CALL;
    if (PyList_Append(L->storage_list, (PyObject *)s) < 0 || PyDict_SetItem(L->storages, key, (PyObject *)s) < 0)
        goto fail;
    return s;
fail:
    Py_DECREF(s);
    return NULL;
}

/* A storage over elements [offset, offset + numel) of root (a view of a pre-0.4
 * file, or a tar view). New reference. */
static PyObject *new_view(Loader *L, StorageObject *root, PyObject *key, PyObject *offset_o, PyObject *numel_o) {
    uint64_t off, numel, itemsize = dtypes_table[root->dtype].itemsize, total = (uint64_t)root->nbytes / itemsize;
    if (want_count(L, offset_o, total, "storage view offset", &off) < 0 ||
        want_count(L, numel_o, total - off, "storage view size", &numel) < 0) {
        if (PyErr_ExceptionMatches(L->st->LimitError)) {
            PyErr_Clear();
            tf_raise(L, L->st->FormatError, "storage view %U reaches past the end of storage %U (%zd bytes)", key,
                     root->key, root->nbytes);
        }
        return NULL;
    }
    StorageObject *v = storage_new(L, key, root->location, (Py_ssize_t)(numel * itemsize), root->dtype);
    if (v == NULL) return NULL;
    v->meta = root->meta;
    v->data = root->data == NULL ? NULL : root->data + off * itemsize;
    v->owner = Py_NewRef(root);
    v->readonly = root->readonly;
    v->pending = root->pending ? 2 : 0; /* 2: a view into a storage still to be read */
    if (PyList_Append(L->storage_list, (PyObject *)v) < 0) {
        Py_DECREF(v);
        return NULL;
    }
    return (PyObject *)v;
}

/* ('module', class, source_file, source): a pickled nn.Module's class (an Opaque). */
static PyObject *module_pid(Loader *L, PyObject *cls) {
    if (L->weights_only)
        return tf_raise(L, L->st->UnpicklingError,
                        "persistent id ('module', ...) of a pickled module class is not allowed with "
                        "weights_only=True; pass weights_only=False to get an inert torchfree.Opaque"),
               NULL;
    return Py_NewRef(cls);
}

static PyObject *stream_pid(Loader *L, PyObject *pid) {
    ModuleState *st = L->st;
    Py_ssize_t n = PyTuple_Check(pid) ? PyTuple_GET_SIZE(pid) : 0;
    if (n == 4 && is_tag(PyTuple_GET_ITEM(pid, 0), "module")) return module_pid(L, PyTuple_GET_ITEM(pid, 1));
    if (n != 6 || !is_tag(PyTuple_GET_ITEM(pid, 0), "storage"))
        return tf_raise(L, st->UnpicklingError,
                        "only persistent ids ('storage', type, key, location, numel, view) and ('module', ...) "
                        "are allowed in a legacy checkpoint"),
               NULL;
    int dtype = storage_type_dtype(L, PyTuple_GET_ITEM(pid, 1));
    if (dtype < 0) return NULL;
    PyObject *key = storage_key_str(PyTuple_GET_ITEM(pid, 2));
    PyObject *saved = storage_key_str(PyTuple_GET_ITEM(pid, 3));
    PyObject *numel_o = PyTuple_GET_ITEM(pid, 4), *view = PyTuple_GET_ITEM(pid, 5), *result = NULL;
    StorageObject *root = NULL;
    uint64_t numel, nbytes;
    if (key == NULL || saved == NULL || !PyLong_Check(numel_o) ||
        (view != Py_None && (!PyTuple_Check(view) || PyTuple_GET_SIZE(view) != 3))) {
        tf_raise(L, st->UnpicklingError, "malformed persistent id (key, location, numel or view of the wrong type)");
        goto done;
    }
    if (want_count(L, numel_o, (uint64_t)PY_SSIZE_T_MAX, "storage numel", &numel) < 0) goto done;
    if (tf_mul_u64(numel, dtypes_table[dtype].itemsize, &nbytes) || nbytes > (uint64_t)PY_SSIZE_T_MAX) {
        tf_raise(L, st->FormatError, "persistent id of storage %U claims an impossible numel", key);
        goto done;
    }
    root = (StorageObject *)PyDict_GetItemWithError(L->storages, key);
    if (root != NULL) {
        Py_INCREF(root);
        result = storage_retyped(L, root, nbytes, dtype);
        if (result != NULL && result != (PyObject *)root) {
            ((StorageObject *)result)->pending = root->pending ? 2 : 0;
            if (PyList_Append(L->storage_list, result) < 0) Py_CLEAR(result);
        }
        if (result == NULL) goto done;
    } else if (PyErr_Occurred() || (root = new_root(L, key, saved, nbytes, dtype)) == NULL ||
               storage_ready(L, root) < 0) { /* as torch: the callable sees it before its bytes are read */
        goto done;
    }
    if (view != Py_None) {
        /* (view_key, offset, numel) in elements of root: one Storage per view key */
        PyObject *vkey = storage_key_str(PyTuple_GET_ITEM(view, 0)), *memo_key = NULL;
        if (vkey == NULL) {
            tf_raise(L, st->UnpicklingError, "malformed storage view key");
        } else if ((memo_key = PyTuple_Pack(2, st->str_storage, vkey)) != NULL) {
            PyObject *old = PyDict_GetItemWithError(L->storages, memo_key);
            Py_CLEAR(result);
            if (old != NULL) {
                result = Py_NewRef(old);
            } else if (!PyErr_Occurred()) {
                result = new_view(L, root, vkey, PyTuple_GET_ITEM(view, 1), PyTuple_GET_ITEM(view, 2));
                if (result != NULL && PyDict_SetItem(L->storages, memo_key, result) < 0) Py_CLEAR(result);
            }
        }
        Py_XDECREF(vkey);
        Py_XDECREF(memo_key);
    } else if (result == NULL) {
        result = Py_NewRef(root);
    }
done:
    Py_XDECREF((PyObject *)root);
    Py_XDECREF(key);
    Py_XDECREF(saved);
    return result;
}

/* Tar: a key (str of an int) names a tensor or a storage read before the pickle;
 * a tuple is a module's (class, file, source). */
static PyObject *tar_pid(Loader *L, PyObject *pid) {
    if (PyTuple_Check(pid) && PyTuple_GET_SIZE(pid) >= 1) return module_pid(L, PyTuple_GET_ITEM(pid, 0));
    PyObject *key = storage_key_str(pid), *r = NULL;
    if (key != NULL) {
        /* int(saved_id): "007" and " 7" name key 7 too */
        PyObject *num = PyLong_FromUnicodeObject(key, 10);
        Py_SETREF(key, num ? PyObject_Str(num) : NULL);
        Py_XDECREF(num);
    }
    if (key == NULL) {
        PyErr_Clear();
        return tf_raise(L, L->st->UnpicklingError, "a tar checkpoint's persistent id must be a key (an int)"), NULL;
    }
    if (L->tar_tensors != NULL) r = PyDict_GetItemWithError(L->tar_tensors, key);
    if (r == NULL && !PyErr_Occurred()) r = PyDict_GetItemWithError(L->storages, key);
    if (r == NULL && !PyErr_Occurred())
        tf_raise(L, L->st->FormatError, "persistent id %U names no tensor or storage of the archive", key);
    Py_DECREF(key);
    return r ? Py_NewRef(r) : NULL;
}

/* Persistent ids of the legacy stream (6-tuples) and the tar format (keys): the load_persid hook of
 * these formats. New reference. */
static PyObject *legacy_persistent_load(Loader *L, PyObject *pid) {
    return L->format == FMT_TAR ? tar_pid(L, pid) : stream_pid(L, pid);
}

/* ---- after the bytes are in ---------------------------------------------------- */

/* Byte order fixes for a stream written on a big-endian host: torch converted
 * elements of 2, 4 and 8 bytes to little-endian, so complex64 went over as one
 * 8-byte unit (halves swapped), complex128 and every untyped (v3) storage not at
 * all. Untyped storages got their unit from their tensors (make_view). */
static void fix_big_endian_writer(StorageObject *s) {
    if (s->meta || s->data == NULL || s->pending == 2) return;
    if (s->dtype == DT_COMPLEX64) {
        dtypes_byteswap((uint8_t *)s->data, (uint64_t)s->nbytes, 8);
        dtypes_byteswap((uint8_t *)s->data, (uint64_t)s->nbytes, 4);
        s->swapped = 1;
    } else if (s->dtype == DT_COMPLEX128) {
        dtypes_byteswap((uint8_t *)s->data, (uint64_t)s->nbytes, 8);
        s->swapped = 1;
    }
}

/* Every storage has its bytes: mark them read, apply byte swaps and the map_location
 * callable, and redo the copies made from them while unpickling. */
static int finish_storages(Loader *L) {
    Py_ssize_t n = PyList_GET_SIZE(L->storage_list);
    for (Py_ssize_t i = 0; i < n; i++) {
        StorageObject *s = (StorageObject *)PyList_GET_ITEM(L->storage_list, i);
        if (s->pending == 1)
            return tf_raise(L, L->st->FormatError, "storage %U has no bytes in the file (its key is not in the key list)",
                            s->key);
        s->pending = 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        StorageObject *s = (StorageObject *)PyList_GET_ITEM(L->storage_list, i);
        if (L->legacy_be && s->owner != NULL && Py_TYPE(s->owner) != L->st->StorageType) fix_big_endian_writer(s);
        if (storage_ready(L, s) < 0) return -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(L->fixups); i++) {
        PyObject *f = PyList_GET_ITEM(L->fixups, i);
        if (PyTuple_GET_SIZE(f) == 2) { /* (storage, its complex64 upcast) */
            PyObject *args = PyTuple_Pack(1, PyTuple_GET_ITEM(f, 0));
            PyObject *fresh = args ? tf_call_helper(L, "complex32_storage", args) : NULL;
            Py_XDECREF(args);
            if (fresh == NULL) return -1;
            PyArrayObject *dst = (PyArrayObject *)PyTuple_GET_ITEM(f, 1);
            memcpy(PyArray_DATA(dst), PyArray_DATA((PyArrayObject *)fresh), (size_t)PyArray_NBYTES(dst));
            Py_DECREF(fresh);
        } else { /* (copy, source: storage or upcast, byte offset, conj, neg) */
            PyArrayObject *own = (PyArrayObject *)PyTuple_GET_ITEM(f, 0);
            PyObject *src = PyTuple_GET_ITEM(f, 1);
            const char *base = Py_TYPE(src) == L->st->StorageType ? ((StorageObject *)src)->data
                                                                   : PyArray_DATA((PyArrayObject *)src);
            memcpy(PyArray_DATA(own), base + PyLong_AsSsize_t(PyTuple_GET_ITEM(f, 2)), (size_t)PyArray_NBYTES(own));
            PyObject *args = PyTuple_Pack(3, (PyObject *)own, PyTuple_GET_ITEM(f, 3), PyTuple_GET_ITEM(f, 4));
            PyObject *r = args ? tf_call_helper(L, "fix_values", args) : NULL;
            Py_XDECREF(args);
            if (r == NULL) return -1;
            Py_DECREF(r);
        }
    }
    return 0;
}

/* Copy a blob into s (GIL released for big ones). When the source is a mapping of the
 * file (mode SRC_MAP), the pages copied from are dropped from this process afterwards, so a
 * copy load holds the copies and not the file's pages too (they stay in the page cache). */
static int copy_blob(Loader *L, StorageObject *s, uint64_t off) {
    if (s->readonly)
        return tf_raise(L, L->st->CheckpointError,
                        "the map_location callable gave storage %U a read-only buffer, but the bytes of a "
                        "legacy checkpoint are read after it returns", s->key);
    if (s->nbytes >= (1 << 20)) {
        Py_BEGIN_ALLOW_THREADS
        memcpy(s->data, L->src + off, (size_t)s->nbytes);
        if (L->mode == SRC_MAP) {
            uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
            uintptr_t lo = ((uintptr_t)(L->src + off) + page - 1) & ~(page - 1);
            uintptr_t hi = ((uintptr_t)(L->src + off) + (uintptr_t)s->nbytes) & ~(page - 1);
            if (hi > lo) (void)madvise((void *)lo, hi - lo, MADV_DONTNEED);
        }
        Py_END_ALLOW_THREADS
    } else {
        memcpy(s->data, L->src + off, (size_t)s->nbytes);
    }
    return 0;
}

/* ---- the legacy stream ----------------------------------------------------------- */

static int check_magic(Loader *L, PyObject *magic) {
    PyObject *want = PyLong_FromString("1950A86A20F9469CFC6C", NULL, 16);
    if (want == NULL) return -1;
    int eq = PyLong_Check(magic) ? PyObject_RichCompareBool(magic, want, Py_EQ) : 0;
    Py_DECREF(want);
    if (eq < 0) return -1;
    return eq ? 0 : tf_raise(L, L->st->FormatError, "Invalid magic number; corrupt file?");
}

static PyObject *load_stream(Loader *L) {
    char rec[96];
    uint64_t off = 0, end = L->size;
    PyObject *obj = NULL, *keys = NULL, *seen = NULL;
    PyObject *magic = run_pickle(L, &off, end, "magic number", rec, sizeof rec);
    if (magic == NULL) {
        L->record = NULL;
        tf_raise_from(L, L->st->FormatError,
                      "not a torch checkpoint: neither a zip archive, a tar archive nor a legacy stream "
                      "(which starts with a pickled magic number)");
        goto done;
    }
    if (check_magic(L, magic) < 0) goto done;
    Py_CLEAR(magic);
    PyObject *proto = run_pickle(L, &off, end, "protocol version", rec, sizeof rec);
    if (proto == NULL) goto done;
    long pv = PyLong_Check(proto) ? PyLong_AsLong(proto) : -1;
    Py_DECREF(proto);
    if (pv != 1001) {
        PyErr_Clear();
        tf_raise(L, L->st->FormatError, "Invalid protocol version: %ld", pv);
        goto done;
    }
    PyObject *sys_info = run_pickle(L, &off, end, "sys_info", rec, sizeof rec);
    if (sys_info == NULL) goto done;
    if (PyDict_Check(sys_info)) {
        PyObject *le = PyDict_GetItemString(sys_info, "little_endian"); /* borrowed */
        L->legacy_be = le == Py_False;
    }
    Py_DECREF(sys_info);
    uint64_t main_off = off;
    int gc_was_enabled = PyGC_Disable();
    obj = run_pickle(L, &off, end, "main pickle", rec, sizeof rec);
    if (gc_was_enabled) PyGC_Enable();
    if (obj == NULL) goto done;
    keys = run_pickle(L, &off, end, "storage key list", rec, sizeof rec);
    L->record = NULL;
    if (keys == NULL) goto fail;
    if (!PyList_Check(keys)) {
        tf_raise(L, L->st->FormatError, "the storage key list is a %s, not a list", Py_TYPE(keys)->tp_name);
        goto fail;
    }
    if ((seen = PySet_New(NULL)) == NULL) goto fail;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *key = storage_key_str(PyList_GET_ITEM(keys, i));
        if (key == NULL) {
            tf_raise(L, L->st->FormatError, "storage key list item %zd is not a key", i);
            goto fail;
        }
        StorageObject *s = (StorageObject *)PyDict_GetItemWithError(L->storages, key); /* borrowed */
        int dup = PySet_Contains(seen, key);
        if (s == NULL || dup != 0 || PySet_Add(seen, key) < 0) {
            if (!PyErr_Occurred())
                tf_raise(L, L->st->FormatError,
                         dup ? "storage key %U appears twice in the key list"
                             : "storage key %U of the key list is not used by the pickle",
                         key);
            Py_DECREF(key);
            goto fail;
        }
        Py_DECREF(key);
        int64_t numel = 0;
        uint64_t itemsize = dtypes_table[s->dtype].itemsize;
        if (read_i64(L, &off, end, "storage size header", &numel) < 0) goto fail;
        if (numel < 0 || (uint64_t)numel > (uint64_t)s->nbytes / itemsize ||
            (uint64_t)numel * itemsize != (uint64_t)s->nbytes) {
            tf_raise(L, L->st->FormatError, "storage %U has wrong byte size: expected %zd elements, got %lld (at byte %llu)",
                     s->key, s->nbytes / (Py_ssize_t)itemsize, (long long)numel, (unsigned long long)(off - 8));
            goto fail;
        }
        if ((uint64_t)s->nbytes > end - off) {
            tf_raise(L, L->st->FormatError, "file ends inside the bytes of storage %U (%zd bytes at byte %llu)",
                     s->key, s->nbytes, (unsigned long long)off);
            goto fail;
        }
        if (!s->meta && !L->lazy && copy_blob(L, s, off) < 0) goto fail;
        s->pending = 0;
        off += (uint64_t)s->nbytes;
    }
    L->end = off; /* torch.load leaves a file object here */
    if (finish_storages(L) < 0) goto fail;
    if (L->legacy_rerun) {
        /* quantized, sparse, nested and device tensors compute with their parts' values, which
         * were not read on the first run: now every storage has its bytes (and the callable has
         * seen them), the main pickle runs again over the same storages */
        L->legacy_rerun = 0;
        gc_was_enabled = PyGC_Disable();
        PyObject *again = run_pickle(L, &main_off, end, "main pickle", rec, sizeof rec);
        if (gc_was_enabled) PyGC_Enable();
        L->record = NULL;
        Py_SETREF(obj, again);
        if (obj == NULL || L->legacy_rerun) {
            if (obj != NULL) tf_raise(L, L->st->FormatError, "storages of the legacy stream are still unread");
            goto fail;
        }
    }
    goto done;
fail:
    Py_CLEAR(obj);
done:
    Py_XDECREF(magic);
    Py_XDECREF(keys);
    Py_XDECREF(seen);
    return obj;
}

/* ---- the tar format --------------------------------------------------------------- */

typedef struct {
    uint64_t off, size;
    int found;
} TarMember;

static int octal_field(const uint8_t *p, size_t n, uint64_t *out) {
    uint64_t v = 0;
    size_t i = 0;
    while (i < n && (p[i] == ' ' || p[i] == 0)) i++;
    if (i == n) return -1;
    for (; i < n && p[i] >= '0' && p[i] <= '7'; i++) {
        if (v >> 60) return -1;
        v = v * 8 + (uint64_t)(p[i] - '0');
    }
    for (; i < n; i++)
        if (p[i] != ' ' && p[i] != 0) return -1;
    *out = v;
    return 0;
}

/* Find the members "storages", "tensors", "pickle" (and skip the rest). */
static int tar_members(Loader *L, TarMember m[3]) {
    static const char *const names[3] = {"storages", "tensors", "pickle"};
    uint64_t off = 0, count = 0;
    memset(m, 0, 3 * sizeof *m);
    while (off + 512 <= L->size) {
        const uint8_t *h = L->src + off;
        int zero = 1;
        for (int i = 0; i < 512 && zero; i++) zero = h[i] == 0;
        if (zero) break;
        uint64_t size, sum, actual = 0;
        for (int i = 0; i < 512; i++) actual += (i >= 148 && i < 156) ? ' ' : h[i];
        if (octal_field(h + 148, 8, &sum) < 0 || sum != actual)
            return tf_raise(L, L->st->FormatError, "tar header at byte %llu has a bad checksum", (unsigned long long)off);
        if (octal_field(h + 124, 12, &size) < 0 || size > L->size - off - 512)
            return tf_raise(L, L->st->FormatError, "tar member at byte %llu has a bad size", (unsigned long long)off);
        if (++count > L->lim.records)
            return tf_raise(L, L->st->LimitError, "tar archive has more than %llu members",
                            (unsigned long long)L->lim.records);
        char type = (char)h[156];
        size_t nlen = strnlen((const char *)h, 100);
        for (int k = 0; k < 3; k++) {
            if ((type == '0' || type == 0) && nlen == strlen(names[k]) && memcmp(h, names[k], nlen) == 0) {
                if (m[k].found)
                    return tf_raise(L, L->st->FormatError, "tar archive has two members named %s", names[k]);
                m[k].found = 1;
                m[k].off = off + 512;
                m[k].size = size;
            }
        }
        uint64_t padded = (size + 511) / 512 * 512;
        if (padded > L->size - off - 512) break; /* the last member's padding may be cut */
        off += 512 + padded;
    }
    for (int k = 0; k < 3; k++)
        if (!m[k].found) return tf_raise(L, L->st->FormatError, "tar archive has no member named %s", names[k]);
    return 0;
}

/* A tar member's pickled count of what follows (at most limits["records"]). */
static int read_count(Loader *L, uint64_t *off, uint64_t end, const char *what, char *rec, size_t reccap,
                      uint64_t *n) {
    PyObject *o = run_pickle(L, off, end, what, rec, reccap);
    if (o == NULL) return -1;
    int r = want_count(L, o, L->lim.records, what, n);
    Py_DECREF(o);
    return r;
}

/* Member "storages": n, then n x ((key, location, type) + blob), then [(view, root, offset, numel)]. */
static int tar_storages(Loader *L, const TarMember *m) {
    char rec[96];
    uint64_t off = m->off, end = m->off + m->size, n;
    int r = read_count(L, &off, end, "storage count", rec, sizeof rec, &n);
    if (r < 0) return -1;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *t = run_pickle(L, &off, end, "storage header", rec, sizeof rec), *key = NULL, *saved = NULL;
        StorageObject *s = NULL;
        int dtype = -1;
        int64_t numel = 0;
        uint64_t nbytes;
        r = -1;
        if (t == NULL) return -1;
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) {
            tf_raise(L, L->st->FormatError, "tar storage header is not a (key, location, type) tuple");
            goto next;
        }
        key = storage_key_str(PyTuple_GET_ITEM(t, 0));
        saved = storage_key_str(PyTuple_GET_ITEM(t, 1));
        if (key == NULL || saved == NULL) {
            tf_raise(L, L->st->FormatError, "tar storage header has a bad key or location");
            goto next;
        }
        if ((dtype = storage_type_dtype(L, PyTuple_GET_ITEM(t, 2))) < 0) goto next;
        L->record = NULL;
        if (read_i64(L, &off, end, "storage size header", &numel) < 0) goto next;
        if (numel < 0 || tf_mul_u64((uint64_t)numel, dtypes_table[dtype].itemsize, &nbytes) || nbytes > end - off) {
            tf_raise(L, L->st->FormatError, "storage %U claims %lld elements, more than its member holds", key,
                     (long long)numel);
            goto next;
        }
        if (PyDict_GetItemWithError(L->storages, key) != NULL || PyErr_Occurred()) {
            if (!PyErr_Occurred()) tf_raise(L, L->st->FormatError, "tar archive has two storages with key %U", key);
            goto next;
        }
        if ((s = new_root(L, key, saved, nbytes, dtype)) == NULL) goto next;
        if (!s->meta && !L->lazy && copy_blob(L, s, off) < 0) goto next;
        s->pending = 0;
        if (storage_ready(L, s) < 0) goto next; /* as torch: the callable sees the bytes */
        off += nbytes;
        r = 0;
    next:
        Py_XDECREF(s);
        Py_XDECREF(key);
        Py_XDECREF(saved);
        Py_DECREF(t);
        if (r < 0) return -1;
    }
    if (off == end) return 0; /* the oldest writer had no view list */
    PyObject *views = run_pickle(L, &off, end, "storage view list", rec, sizeof rec);
    if (views == NULL) return -1;
    r = 0;
    if (!PyList_Check(views)) r = tf_raise(L, L->st->FormatError, "tar storage view list is not a list");
    for (Py_ssize_t i = 0; r == 0 && i < PyList_GET_SIZE(views); i++) {
        PyObject *v = PyList_GET_ITEM(views, i), *vkey = NULL, *rkey = NULL, *view = NULL;
        StorageObject *root = NULL;
        r = -1;
        if (!PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 4 || (vkey = storage_key_str(PyTuple_GET_ITEM(v, 0))) == NULL ||
            (rkey = storage_key_str(PyTuple_GET_ITEM(v, 1))) == NULL) {
            tf_raise(L, L->st->FormatError, "tar storage view %zd is not a (key, root, offset, numel) tuple", i);
        } else if ((root = (StorageObject *)PyDict_GetItemWithError(L->storages, rkey)) == NULL) {
            if (!PyErr_Occurred()) tf_raise(L, L->st->FormatError, "tar storage view %U names no storage %U", vkey, rkey);
        } else if ((view = new_view(L, root, vkey, PyTuple_GET_ITEM(v, 2), PyTuple_GET_ITEM(v, 3))) != NULL) {
            r = PyDict_SetItem(L->storages, vkey, view);
        }
        Py_XDECREF(view);
        Py_XDECREF(vkey);
        Py_XDECREF(rkey);
    }
    Py_DECREF(views);
    return r;
}

static PyObject *i64_tuple(const uint8_t *p, int n) {
    PyObject *t = PyTuple_New(n);
    for (int i = 0; t != NULL && i < n; i++) {
        PyObject *v = PyLong_FromLongLong((long long)tf_le64(p + 8 * i));
        if (v == NULL) Py_CLEAR(t);
        else PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

/* Member "tensors": n, then n x ((key, storage key, class) + ndim, sizes, strides, offset). */
static int tar_tensors(Loader *L, const TarMember *m, PyObject *tensors) {
    char rec[96];
    uint64_t off = m->off, end = m->off + m->size, n;
    int r = read_count(L, &off, end, "tensor count", rec, sizeof rec, &n);
    if (r < 0) return -1;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *t = run_pickle(L, &off, end, "tensor header", rec, sizeof rec), *key = NULL, *skey = NULL;
        PyObject *size = NULL, *stride = NULL, *offset = NULL, *arr = NULL, *storage;
        r = -1;
        L->record = NULL;
        if (t == NULL) return -1;
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3 || (key = storage_key_str(PyTuple_GET_ITEM(t, 0))) == NULL ||
            (skey = storage_key_str(PyTuple_GET_ITEM(t, 1))) == NULL) {
            tf_raise(L, L->st->FormatError, "tar tensor header is not a (key, storage key, class) tuple");
            goto next;
        }
        if ((storage = PyDict_GetItemWithError(L->storages, skey)) == NULL) {
            if (!PyErr_Occurred()) tf_raise(L, L->st->FormatError, "tar tensor %U names no storage %U", key, skey);
            goto next;
        }
        if (end - off < 8) {
            tf_raise(L, L->st->FormatError, "file ends inside the header of tensor %U", key);
            goto next;
        }
        int32_t ndim = (int32_t)tf_le32(L->src + off);
        if (ndim < 0 || (uint64_t)ndim > L->lim.ndim || (uint64_t)ndim > NPY_MAXDIMS) {
            tf_raise(L, L->st->FormatError, "tar tensor %U has %d dimensions", key, (int)ndim);
            goto next;
        }
        off += 8; /* ndim and 4 ignored bytes */
        uint64_t need = 16 * (uint64_t)ndim + 8;
        if (end - off < need) {
            tf_raise(L, L->st->FormatError, "file ends inside the header of tensor %U", key);
            goto next;
        }
        size = i64_tuple(L->src + off, ndim);
        stride = i64_tuple(L->src + off + 8 * (uint64_t)ndim, ndim);
        offset = PyLong_FromLongLong((long long)tf_le64(L->src + off + 16 * (uint64_t)ndim));
        off += need;
        if (size == NULL || stride == NULL || offset == NULL) goto next;
        if ((arr = tensor_strided(L, storage, offset, size, stride, -1)) == NULL) goto next;
        r = PyDict_SetItem(tensors, key, arr);
    next:
        Py_XDECREF(t);
        Py_XDECREF(key);
        Py_XDECREF(skey);
        Py_XDECREF(size);
        Py_XDECREF(stride);
        Py_XDECREF(offset);
        Py_XDECREF(arr);
        if (r < 0) return -1;
    }
    return 0;
}

static PyObject *load_tar(Loader *L) {
    TarMember m[3];
    char rec[96];
    if (tar_members(L, m) < 0 || (L->tar_tensors = PyDict_New()) == NULL) return NULL;
    if (tar_storages(L, &m[0]) < 0 || tar_tensors(L, &m[1], L->tar_tensors) < 0) return NULL;
    uint64_t off = m[2].off;
    int gc_was_enabled = PyGC_Disable();
    PyObject *obj = run_pickle(L, &off, m[2].off + m[2].size, "main pickle", rec, sizeof rec);
    if (gc_was_enabled) PyGC_Enable();
    L->record = NULL;
    if (obj != NULL && finish_storages(L) < 0) Py_CLEAR(obj);
    return obj;
}

/* ---- entry point ------------------------------------------------------------------ */

static int is_tar(const Loader *L) { return L->size >= 512 && memcmp(L->src + 257, "ustar", 5) == 0; }

/* Take an optional bool keyword out of kwargs (a new dict or NULL in *rest). */
static int pop_flag(PyObject **kwargs, const char *name, int *out) {
    *out = 0;
    if (*kwargs == NULL) return 0;
    PyObject *v = PyDict_GetItemString(*kwargs, name); /* borrowed */
    if (v == NULL) return 0;
    if ((*out = PyObject_IsTrue(v)) < 0) return -1;
    return PyDict_DelItemString(*kwargs, name);
}

/* load_legacy(src, size, *, ..., lazy=False, collect_globals=False, with_end=False): the
 * one-shot load of a legacy stream or tar archive held in a buffer (the keywords of load_zip).
 * With collect_globals it returns (obj, storages, sorted globals, "legacy" or "tar"); lazy
 * (scan) reads no storage bytes: tensors become TensorRefs over storages without data. With
 * with_end it returns (obj, end): end is the offset just past a legacy stream's last storage
 * (where torch.load leaves a file object), the buffer's size for a tar. */
PyObject *mod_load_legacy(PyObject *module, PyObject *args, PyObject *kwargs) {
    Loader L = {0}; /* loader_close below also runs when numpy fails to import (no loader_open) */
    PyObject *obj = NULL, *kw = kwargs ? PyDict_Copy(kwargs) : NULL;
    int lazy, collect, with_end;
    if ((kwargs != NULL && kw == NULL) || pop_flag(&kw, "lazy", &lazy) < 0 || pop_flag(&kw, "collect_globals", &collect) < 0 ||
        pop_flag(&kw, "with_end", &with_end) < 0) {
        Py_XDECREF(kw);
        return NULL;
    }
    if (tf_numpy(PyModule_GetState(module)) == 0 &&
        loader_open(&L, PyModule_GetState(module), args, kw, "load_legacy", FMT_LEGACY) == 0 &&
        (!collect || (L.globals_seen = PySet_New(NULL)) != NULL)) {
        L.hook.load_persid = legacy_persistent_load;
        L.lazy = lazy;
        L.end = L.size;
        if (is_tar(&L)) {
            L.format = FMT_TAR;
            obj = load_tar(&L);
        } else {
            obj = load_stream(&L);
        }
        if (obj != NULL) Py_SETREF(obj, loader_torch_finish(&L, obj));
        if (obj != NULL && with_end && !collect) obj = Py_BuildValue("(NK)", obj, (unsigned long long)L.end); /* steals */
        if (obj != NULL && collect) {
            /* the storages with bytes of their own (not views and retyped aliases of them) */
            PyObject *roots = PyList_New(0), *g = PySequence_List(L.globals_seen);
            for (Py_ssize_t i = 0; roots != NULL && i < PyList_GET_SIZE(L.storage_list); i++) {
                StorageObject *s = (StorageObject *)PyList_GET_ITEM(L.storage_list, i);
                if ((s->owner == NULL || Py_TYPE(s->owner) != L.st->StorageType) && PyList_Append(roots, (PyObject *)s) < 0)
                    Py_CLEAR(roots);
            }
            if (roots == NULL || g == NULL || PyList_Sort(g) < 0) {
                Py_XDECREF(roots);
                Py_XDECREF(g);
                Py_CLEAR(obj);
            } else {
                obj = Py_BuildValue("(NNNs)", obj, roots, g, L.format == FMT_TAR ? "tar" : "legacy"); /* steals */
            }
        }
    }
    loader_close(&L);
    Py_XDECREF(kw);
    return obj;
}
