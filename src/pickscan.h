/* pickscan.h - Python-free static walk over a pickle (protocols 0-5).
 *
 * pickscan_run() reads a pickle's opcodes without building anything: the same
 * framing rules, length checks and limits as the VM in vm.c (every
 * length is checked against the input, the memo must be dense, stack and mark
 * depth are tracked against the limits, trailing bytes after STOP are refused)
 * plus a shadow stack that knows which values are string literals, so that
 * STACK_GLOBAL names can be resolved statically. It lists every GLOBAL, INST
 * and STACK_GLOBAL in the order they occur (as torch's
 * get_unsafe_globals_in_checkpoint does for GLOBAL).
 *
 * It accepts a superset of what the VM accepts: it cannot know the types the
 * VM checks at run time (REDUCE of a non-global, SETITEM on a list, ...), but
 * every structural error it reports is one the VM would report too. Memory is
 * bounded by a small multiple of the input (each pushed value costs at least
 * one input byte). Used by _core.pickle_globals and fuzzed on its own
 * (tests/fuzz/fuzz_pickscan.c). */
#ifndef TORCHFREE_PICKSCAN_H
#define TORCHFREE_PICKSCAN_H

#include "common.h"
#include "limits.h"

typedef struct {
    uint64_t offset;    /* byte offset of the GLOBAL / INST / STACK_GLOBAL opcode */
    const char *module; /* into the input (not NUL-terminated); NULL: not resolvable statically */
    size_t module_len;
    const char *name;
    size_t name_len;
    uint8_t op;         /* the opcode byte */
    uint8_t protocol;   /* the pickle's protocol there (its last PROTO, 0 before one): below 3,
                         * globals_lookup maps Python 2 names */
} PickGlobal;

typedef struct {
    PickGlobal *globals; /* in order of occurrence (owned; free with pickscan_free) */
    size_t n_globals;
    size_t cap_globals;
    int protocol;        /* argument of the last PROTO, -1 when there is none */
    uint64_t n_ops;      /* opcodes walked, STOP included */
    uint64_t n_persids;  /* BINPERSID opcodes */
    uint64_t max_stack;  /* deepest the value stack got */
    uint64_t max_marks;  /* most MARKs open at once */
    uint64_t memo_len;   /* memo slots used */
} PickScan;

/* Walk data[0, len) up to STOP. On success fill *out (free with
 * pickscan_free) and return TF_OK; else return TF_ERR_FORMAT (structure the
 * VM would refuse too), TF_ERR_LIMIT or TF_ERR_NOMEM with err filled (offset:
 * the opcode's offset in the pickle); *out then holds nothing to free.
 * lim NULL: the defaults of limits.h. */
TfStatus pickscan_run(const uint8_t *data, size_t len, const TfLimits *lim, PickScan *out, TfErr *err);
void pickscan_free(PickScan *ps);

#ifdef Py_PYTHON_H
/* _core.pickle_globals(data, /, *, limits=None) -> list[str] (src/pickscan_py.c). New reference. */
PyObject *mod_pickle_globals(PyObject *module, PyObject *args, PyObject *kwargs);
#define PICKLE_GLOBALS_DOC                                                                              \
    "pickle_globals($module, data, /, *, limits=None)\n--\n\n"                                          \
    "Every GLOBAL, INST and STACK_GLOBAL name of a pickle, found without running it.\n\n"               \
    "Walks the opcodes with the VM's framing rules, length checks and limits (dense memo,\n"            \
    "stack and MARK depth) and returns the 'module.name' of each global once, in order of\n"            \
    "first use, after the Python 2 -> 3 renames. A STACK_GLOBAL whose operands are not\n"               \
    "string literals of the pickle is listed as '?'.\n\n"                                                \
    "Args:\n    data: the pickle (any bytes-like object).\n"                                            \
    "    limits: a dict overriding entries of LIMITS.\n\n"              \
    "Raises:\n    UnpicklingError: the pickle is malformed in a way the VM would refuse too.\n"         \
    "    LimitError: a limit was exceeded."
#endif

#endif
