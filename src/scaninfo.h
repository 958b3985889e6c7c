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
/* The TensorInfo (of type `type`, TensorInfoBase or a subclass) of a TensorRef named `name`;
 * torch_names[dt]: torch's name of dtype dt, made once per walk. New reference. */
PyObject *tensorinfo_from_ref(ModuleState *st, PyTypeObject *type, PyObject *name, TensorRef *r, PyObject **torch_names);
/* The zip directory packed as bytes for mod_record_infos (new reference). */
PyObject *records_pack(const ZipReader *z);

#endif
