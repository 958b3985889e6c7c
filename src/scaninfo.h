/* scaninfo.h - scan()'s C side (scaninfo.c, scanwalk.c): TensorInfo, walk(), the info tables. */
#ifndef TORCHFREE_SCANINFO_H
#define TORCHFREE_SCANINFO_H

#include "objects.h"

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
