/* load.h - the load drivers: a zip checkpoint (archive.c: load_zip, Archive) and the legacy
 * stream and tar formats (legacy.c). */
#ifndef TORCHFREE_LOAD_H
#define TORCHFREE_LOAD_H

#include "state.h"

/* archive.c */
extern PyType_Spec ArchiveSpec;
PyObject *mod_load_zip(PyObject *module, PyObject *args, PyObject *kwargs);

/* legacy.c */
PyObject *mod_load_legacy(PyObject *module, PyObject *args, PyObject *kwargs);

#endif
