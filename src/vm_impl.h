/* vm_impl.h - internal to the pickle VM (vm_stack.c, vm_objects.c, vm.c) and to fastpath.c, which
 * runs torch's tensor sequence on it: the stack, mark and memo primitives they share, and the
 * entry points of each part. The drivers' view of the VM is vm.h. */
#ifndef TORCHFREE_VM_IMPL_H
#define TORCHFREE_VM_IMPL_H

#include "opcodes.h"
#include "vm.h"

#if defined(__GNUC__)
#define VM_HOT static inline __attribute__((always_inline))
#else
#define VM_HOT static inline
#endif

/* ---- stack, marks, memo (vm_stack.c) ---- */

/* Grow the stack for one more value (pushing o, stolen, is the caller's); on an error o is
 * released. */
int vm_grow_stack(Loader *L, PyObject *o);

/* Push, stealing the reference (NULL: an exception is already set). */
VM_HOT int vm_push(Loader *L, PyObject *o) {
    if (o == NULL) return -1;
    if (TF_UNLIKELY(L->sp == L->stack_cap) && vm_grow_stack(L, o) < 0) return -1;
    L->stack[L->sp++] = o;
    return 0;
}

/* Lowest stack index usable by the current opcode (the last mark, or 0). */
VM_HOT Py_ssize_t vm_fence(Loader *L) { return L->nmarks ? L->marks[L->nmarks - 1] : 0; }

/* Pop, returning a new reference (NULL + exception on underflow). */
static inline PyObject *vm_pop(Loader *L) {
    if (TF_UNLIKELY(L->sp <= vm_fence(L))) {
        tf_raise(L, L->st->UnpicklingError, "pickle stack underflow");
        return NULL;
    }
    return L->stack[--L->sp];
}

/* Borrowed reference to the top (NULL + exception when empty). */
VM_HOT PyObject *vm_top(Loader *L) {
    if (TF_UNLIKELY(L->sp <= vm_fence(L))) {
        tf_raise(L, L->st->UnpicklingError, "pickle stack underflow");
        return NULL;
    }
    return L->stack[L->sp - 1];
}

/* Pop the last mark; return its stack index or -1 with an exception set. */
static inline Py_ssize_t vm_pop_mark(Loader *L) {
    if (L->nmarks == 0) {
        tf_raise(L, L->st->UnpicklingError, "no MARK on the stack");
        return -1;
    }
    return L->marks[--L->nmarks];
}

static inline int is_globalref(Loader *L, PyObject *o) { return Py_TYPE(o) == L->st->GlobalRefType; }
static inline int is_opaque(Loader *L, PyObject *o) { return (PyObject *)Py_TYPE(o) == L->st->OpaqueType; }

/* Items from stack[start] to the top as a tuple (new reference); pops them. */
static inline PyObject *vm_pop_tuple_from(Loader *L, Py_ssize_t start) {
    Py_ssize_t n = L->sp - start;
    PyObject *t = PyTuple_New(n);
    if (t == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(t, i, L->stack[start + i]);
    L->sp = start;
    return t;
}
/* vm_memo_put past its fast path: a slot already set, a gap, or a memo to grow. */
int vm_memo_put_slow(Loader *L, uint64_t idx, PyObject *o);
/* memo[idx] = o (o may be NULL: a slot left empty, see rebuild_v2_fused) */
VM_HOT int vm_memo_put(Loader *L, uint64_t idx, PyObject *o) {
    if (TF_LIKELY(idx == (uint64_t)L->memo_len && L->memo_len < L->memo_cap)) { /* the next slot */
        L->memo[L->memo_len++] = Py_XNewRef(o);
        return 0;
    }
    return vm_memo_put_slow(L, idx, o);
}
/* After BUILD replaced a placeholder by a new object, point the memo slots that held it at the new one. */
void vm_memo_replace(Loader *L, PyObject *old, PyObject *new_);

/* ---- GLOBAL, calls, containers (vm_objects.c) ---- */

/* GLOBAL module name: push what it resolves to. */
int vm_global(Loader *L, const char *module, size_t mlen, const char *name, size_t nlen);
/* REDUCE (callable, args), NEWOBJ (cls, args) and NEWOBJ_EX (cls, args, kwargs). */
int vm_reduce(Loader *L, int op);
int vm_build(Loader *L);
/* The items from stack[start] up into target (a dict or a trusted object); pops them. */
int vm_setitems_into(Loader *L, PyObject *target, Py_ssize_t start);
/* APPENDS / SETITEMS / ADDITEMS: the target sits just below the last mark. */
int vm_marked_fill(Loader *L, int op);
/* APPEND / SETITEM. */
int vm_single_fill(Loader *L, int op);

#endif
