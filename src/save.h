/* save.h - the writer's entry point (torchfree.save is in _save.py). */
#ifndef TORCHFREE_SAVE_H
#define TORCHFREE_SAVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* _core.save(obj, target, archive_name, legacy): write obj as a torch
 * checkpoint to target (an int file descriptor, written with the GIL
 * released, or an object with a write() method). New reference (None). */
PyObject *mod_save(PyObject *module, PyObject *args, PyObject *kwargs);
extern const char mod_save_doc[];

#endif
