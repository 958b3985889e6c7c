/* vm.h - the pickle VM as the load drivers see it: run a pickle on a Loader, free its stack and
 * memo, and the key path of the object being built (the Loader's error-position hook). Its
 * internals are in vm_impl.h. */
#ifndef TORCHFREE_VM_H
#define TORCHFREE_VM_H

#include "loader.h"

/* vm.c */
PyObject *vm_run(Loader *L, const uint8_t *data, size_t len); /* new reference */
/* Run the pickle that starts at data and ends at its STOP (bytes after it are
 * the caller's: the legacy stream concatenates pickles and blobs); *used gets
 * its length. New reference. */
PyObject *vm_run_at(Loader *L, const uint8_t *data, size_t len, size_t *used);
void vm_free(Loader *L);
/* Dotted key path of the object being built, e.g. "model.fc1.weight" (new reference). */
PyObject *vm_key_path(Loader *L);

#endif
