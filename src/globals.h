/* globals.h - Python-free allowlist: every GLOBAL torchfree understands.
 *
 * A GLOBAL names (module, name). We never import it: the pair is looked up
 * here and turned into a GlobalId that the VM dispatches on to our own code.
 * Pairs not in the table are unknown: an UnsafeGlobalError under
 * weights_only=True, an inert Opaque placeholder otherwise. */
#ifndef TORCHFREE_GLOBALS_H
#define TORCHFREE_GLOBALS_H

#include "common.h"
#include "dtypes.h"

typedef enum {
    G_UNKNOWN = 0,
    /* tensor rebuilds (torch._utils, torch._tensor) */
    G_REBUILD_TENSOR, G_REBUILD_TENSOR_V2, G_REBUILD_TENSOR_V3,
    G_REBUILD_PARAMETER, G_REBUILD_PARAMETER_WITH_STATE,
    G_REBUILD_FROM_TYPE_V2, G_REBUILD_FROM_TYPE,
    G_REBUILD_QTENSOR, G_REBUILD_SPARSE_TENSOR, G_REBUILD_SPARSE_CSR_TENSOR,
    G_REBUILD_NESTED_TENSOR, G_REBUILD_META_TENSOR_NO_STORAGE,
    G_REBUILD_WRAPPER_SUBCLASS, G_REBUILD_DEVICE_TENSOR_FROM_NUMPY,
    G_REBUILD_DEVICE_TENSOR_FROM_CPU_TENSOR,
    /* torch objects */
    G_TENSOR, G_LEGACY_TENSOR, G_PARAMETER, G_SIZE, G_DEVICE, G_GET_LAYOUT,
    G_STORAGE,         /* torch <X>Storage, torch.cuda <X>Storage: arg = dtype */
    G_UNTYPED_STORAGE, /* torch.storage UntypedStorage */
    G_TYPED_STORAGE,   /* torch.storage TypedStorage */
    G_DTYPE,           /* torch <dtype>: arg = dtype */
    G_QSCHEME,         /* torch per_tensor_affine, ... */
    /* python builtins and stdlib */
    G_ORDERED_DICT, G_COUNTER, G_CODECS_ENCODE,
    G_BYTEARRAY, G_BYTES, G_SET, G_FROZENSET, G_COMPLEX, G_SLICE, G_RANGE,
    G_NAMESPACE,
    /* numpy, rebuilt inertly */
    G_NP_RECONSTRUCT, G_NP_NDARRAY, G_NP_DTYPE, G_NP_SCALAR,
    /* torch.jit._pickle helpers of TorchScript pickles (identity functions in torch) */
    G_JIT_BUILD_LIST, G_JIT_BUILD_TENSOR_FROM_ID, G_JIT_RESTORE_TYPE_TAG,
    G_COUNT
} GlobalId;

enum {
    GF_WEIGHTS_ONLY = 1, /* allowed under weights_only=True */
    GF_TORCHSCRIPT = 2,  /* allowed under weights_only=True inside a TorchScript archive */
};

typedef struct {
    GlobalId id;
    int arg;      /* dtype for G_STORAGE / G_DTYPE / G_LEGACY_TENSOR */
    int flags;
} GlobalHit;

/* Translate Python 2 names (when fix_imports: pickle does it for protocol
 * 0-2 pickles) and renamed torch/numpy modules, and look (module, name) up.
 * Fills hit (id G_UNKNOWN when absent). `canon` receives "module.name" after
 * the mapping (NUL-terminated, truncated to canon_size; a Python 2 module's
 * Python 3 name is at most 32 bytes longer). */
void globals_lookup(const char *module, size_t mlen, const char *name, size_t nlen, int fix_imports,
                    GlobalHit *hit, char *canon, size_t canon_size);

/* 1 when the module must never be trusted, even through safe_globals
 * (sys, os, posix, nt: as torch's blocklist). */
int globals_blocked_module(const char *module, size_t mlen);

/* 1 for the module of a TorchScript class ("__torch__" or "__torch__.<...>"). */
int globals_torchscript_class(const char *module, size_t mlen);

#endif
