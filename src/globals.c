/* globals.c - the allowlist table (spec §5). Lookup only: nothing here can
 * import or call anything. */
#include "globals.h"

#include <stdio.h>

typedef struct {
    const char *module;
    const char *name;
    GlobalId id;
    int flags;
} GlobalRow;

#define WO GF_WEIGHTS_ONLY
#define TS GF_TORCHSCRIPT
static const GlobalRow rows[] = {
    {"torch._utils", "_rebuild_tensor", G_REBUILD_TENSOR, WO},
    {"torch._utils", "_rebuild_tensor_v2", G_REBUILD_TENSOR_V2, WO},
    {"torch._utils", "_rebuild_tensor_v3", G_REBUILD_TENSOR_V3, WO},
    {"torch._utils", "_rebuild_parameter", G_REBUILD_PARAMETER, WO},
    {"torch._utils", "_rebuild_parameter_with_state", G_REBUILD_PARAMETER_WITH_STATE, WO},
    {"torch._tensor", "_rebuild_from_type_v2", G_REBUILD_FROM_TYPE_V2, WO},
    {"torch._tensor", "_rebuild_from_type", G_REBUILD_FROM_TYPE, 0},
    {"torch._utils", "_rebuild_qtensor", G_REBUILD_QTENSOR, WO},
    {"torch._utils", "_rebuild_sparse_tensor", G_REBUILD_SPARSE_TENSOR, WO},
    {"torch._utils", "_rebuild_sparse_csr_tensor", G_REBUILD_SPARSE_CSR_TENSOR, WO},
    {"torch._utils", "_rebuild_nested_tensor", G_REBUILD_NESTED_TENSOR, WO},
    {"torch._utils", "_rebuild_meta_tensor_no_storage", G_REBUILD_META_TENSOR_NO_STORAGE, WO},
    {"torch._utils", "_rebuild_wrapper_subclass", G_REBUILD_WRAPPER_SUBCLASS, WO},
    {"torch._utils", "_rebuild_device_tensor_from_numpy", G_REBUILD_DEVICE_TENSOR_FROM_NUMPY, WO},
    {"torch._utils", "_rebuild_xla_tensor", G_REBUILD_DEVICE_TENSOR_FROM_NUMPY, WO},
    {"torch._utils", "_rebuild_device_tensor_from_cpu_tensor", G_REBUILD_DEVICE_TENSOR_FROM_CPU_TENSOR, WO},
    {"torch", "Tensor", G_TENSOR, WO},
    {"torch.nn.parameter", "Parameter", G_PARAMETER, WO},
    {"torch", "Size", G_SIZE, WO},
    {"torch", "device", G_DEVICE, WO},
    {"torch.serialization", "_get_layout", G_GET_LAYOUT, WO},
    {"torch.storage", "UntypedStorage", G_UNTYPED_STORAGE, WO},
    {"torch", "UntypedStorage", G_UNTYPED_STORAGE, WO},
    {"torch.storage", "TypedStorage", G_TYPED_STORAGE, WO},
    {"torch", "per_tensor_affine", G_QSCHEME, WO},
    {"torch", "per_tensor_symmetric", G_QSCHEME, WO},
    {"torch", "per_channel_affine", G_QSCHEME, WO},
    {"torch", "per_channel_symmetric", G_QSCHEME, WO},
    {"torch", "per_channel_affine_float_qparams", G_QSCHEME, WO},
    {"collections", "OrderedDict", G_ORDERED_DICT, WO},
    {"collections", "Counter", G_COUNTER, WO},
    {"_codecs", "encode", G_CODECS_ENCODE, WO},
    {"builtins", "bytearray", G_BYTEARRAY, WO},
    {"builtins", "bytes", G_BYTES, WO},
    {"builtins", "set", G_SET, WO},
    {"builtins", "complex", G_COMPLEX, WO},
    {"builtins", "frozenset", G_FROZENSET, 0},
    {"builtins", "slice", G_SLICE, 0},
    {"builtins", "range", G_RANGE, 0},
    {"argparse", "Namespace", G_NAMESPACE, WO},
    {"numpy._core.multiarray", "_reconstruct", G_NP_RECONSTRUCT, WO},
    {"numpy", "ndarray", G_NP_NDARRAY, WO},
    {"numpy", "dtype", G_NP_DTYPE, WO},
    {"numpy._core.multiarray", "scalar", G_NP_SCALAR, WO},
    {"torch.jit._pickle", "build_intlist", G_JIT_BUILD_LIST, TS},
    {"torch.jit._pickle", "build_tensorlist", G_JIT_BUILD_LIST, TS},
    {"torch.jit._pickle", "build_doublelist", G_JIT_BUILD_LIST, TS},
    {"torch.jit._pickle", "build_boollist", G_JIT_BUILD_LIST, TS},
    {"torch.jit._pickle", "build_tensor_from_id", G_JIT_BUILD_TENSOR_FROM_ID, TS},
    {"torch.jit._pickle", "restore_type_tag", G_JIT_RESTORE_TYPE_TAG, TS},
};
#undef WO
#undef TS

/* Python 2 -> 3 names, as pickle's fix_imports maps them in protocol 0-2 pickles: CPython's
 * Lib/_compat_pickle.py (3.11), NAME_MAPPING first, else IMPORT_MAPPING on the module. */
typedef struct {
    const char *module, *name;       /* Python 2 */
    const char *to_module, *to_name; /* Python 3 */
} Py2Name;

static const Py2Name py2_names[] = {
    {"__builtin__", "xrange", "builtins", "range"},
    {"__builtin__", "reduce", "functools", "reduce"},
    {"__builtin__", "intern", "sys", "intern"},
    {"__builtin__", "unichr", "builtins", "chr"},
    {"__builtin__", "unicode", "builtins", "str"},
    {"__builtin__", "long", "builtins", "int"},
    {"itertools", "izip", "builtins", "zip"},
    {"itertools", "imap", "builtins", "map"},
    {"itertools", "ifilter", "builtins", "filter"},
    {"itertools", "ifilterfalse", "itertools", "filterfalse"},
    {"itertools", "izip_longest", "itertools", "zip_longest"},
    {"UserDict", "IterableUserDict", "collections", "UserDict"},
    {"UserList", "UserList", "collections", "UserList"},
    {"UserString", "UserString", "collections", "UserString"},
    {"whichdb", "whichdb", "dbm", "whichdb"},
    {"_socket", "fromfd", "socket", "fromfd"},
    {"_multiprocessing", "Connection", "multiprocessing.connection", "Connection"},
    {"multiprocessing.process", "Process", "multiprocessing.context", "Process"},
    {"multiprocessing.forking", "Popen", "multiprocessing.popen_fork", "Popen"},
    {"urllib", "ContentTooShortError", "urllib.error", "ContentTooShortError"},
    {"urllib", "getproxies", "urllib.request", "getproxies"},
    {"urllib", "pathname2url", "urllib.request", "pathname2url"},
    {"urllib", "quote_plus", "urllib.parse", "quote_plus"},
    {"urllib", "quote", "urllib.parse", "quote"},
    {"urllib", "unquote_plus", "urllib.parse", "unquote_plus"},
    {"urllib", "unquote", "urllib.parse", "unquote"},
    {"urllib", "url2pathname", "urllib.request", "url2pathname"},
    {"urllib", "urlcleanup", "urllib.request", "urlcleanup"},
    {"urllib", "urlencode", "urllib.parse", "urlencode"},
    {"urllib", "urlopen", "urllib.request", "urlopen"},
    {"urllib", "urlretrieve", "urllib.request", "urlretrieve"},
    {"urllib2", "HTTPError", "urllib.error", "HTTPError"},
    {"urllib2", "URLError", "urllib.error", "URLError"},
    {"exceptions", "ArithmeticError", "builtins", "ArithmeticError"},
    {"exceptions", "AssertionError", "builtins", "AssertionError"},
    {"exceptions", "AttributeError", "builtins", "AttributeError"},
    {"exceptions", "BaseException", "builtins", "BaseException"},
    {"exceptions", "BufferError", "builtins", "BufferError"},
    {"exceptions", "BytesWarning", "builtins", "BytesWarning"},
    {"exceptions", "DeprecationWarning", "builtins", "DeprecationWarning"},
    {"exceptions", "EOFError", "builtins", "EOFError"},
    {"exceptions", "EnvironmentError", "builtins", "EnvironmentError"},
    {"exceptions", "Exception", "builtins", "Exception"},
    {"exceptions", "FloatingPointError", "builtins", "FloatingPointError"},
    {"exceptions", "FutureWarning", "builtins", "FutureWarning"},
    {"exceptions", "GeneratorExit", "builtins", "GeneratorExit"},
    {"exceptions", "IOError", "builtins", "IOError"},
    {"exceptions", "ImportError", "builtins", "ImportError"},
    {"exceptions", "ImportWarning", "builtins", "ImportWarning"},
    {"exceptions", "IndentationError", "builtins", "IndentationError"},
    {"exceptions", "IndexError", "builtins", "IndexError"},
    {"exceptions", "KeyError", "builtins", "KeyError"},
    {"exceptions", "KeyboardInterrupt", "builtins", "KeyboardInterrupt"},
    {"exceptions", "LookupError", "builtins", "LookupError"},
    {"exceptions", "MemoryError", "builtins", "MemoryError"},
    {"exceptions", "NameError", "builtins", "NameError"},
    {"exceptions", "NotImplementedError", "builtins", "NotImplementedError"},
    {"exceptions", "OSError", "builtins", "OSError"},
    {"exceptions", "OverflowError", "builtins", "OverflowError"},
    {"exceptions", "PendingDeprecationWarning", "builtins", "PendingDeprecationWarning"},
    {"exceptions", "ReferenceError", "builtins", "ReferenceError"},
    {"exceptions", "RuntimeError", "builtins", "RuntimeError"},
    {"exceptions", "RuntimeWarning", "builtins", "RuntimeWarning"},
    {"exceptions", "StopIteration", "builtins", "StopIteration"},
    {"exceptions", "SyntaxError", "builtins", "SyntaxError"},
    {"exceptions", "SyntaxWarning", "builtins", "SyntaxWarning"},
    {"exceptions", "SystemError", "builtins", "SystemError"},
    {"exceptions", "SystemExit", "builtins", "SystemExit"},
    {"exceptions", "TabError", "builtins", "TabError"},
    {"exceptions", "TypeError", "builtins", "TypeError"},
    {"exceptions", "UnboundLocalError", "builtins", "UnboundLocalError"},
    {"exceptions", "UnicodeDecodeError", "builtins", "UnicodeDecodeError"},
    {"exceptions", "UnicodeEncodeError", "builtins", "UnicodeEncodeError"},
    {"exceptions", "UnicodeError", "builtins", "UnicodeError"},
    {"exceptions", "UnicodeTranslateError", "builtins", "UnicodeTranslateError"},
    {"exceptions", "UnicodeWarning", "builtins", "UnicodeWarning"},
    {"exceptions", "UserWarning", "builtins", "UserWarning"},
    {"exceptions", "ValueError", "builtins", "ValueError"},
    {"exceptions", "Warning", "builtins", "Warning"},
    {"exceptions", "ZeroDivisionError", "builtins", "ZeroDivisionError"},
    {"multiprocessing", "AuthenticationError", "multiprocessing.context", "AuthenticationError"},
    {"multiprocessing", "BufferTooShort", "multiprocessing.context", "BufferTooShort"},
    {"multiprocessing", "ProcessError", "multiprocessing.context", "ProcessError"},
    {"multiprocessing", "TimeoutError", "multiprocessing.context", "TimeoutError"},
    {"__builtin__", "basestring", "builtins", "str"},
    {"exceptions", "StandardError", "builtins", "Exception"},
    {"UserDict", "UserDict", "collections", "UserDict"},
    {"socket", "_socketobject", "socket", "SocketType"},
};

static const char *const py2_modules[][2] = {
    {"__builtin__", "builtins"},
    {"copy_reg", "copyreg"},
    {"Queue", "queue"},
    {"SocketServer", "socketserver"},
    {"ConfigParser", "configparser"},
    {"repr", "reprlib"},
    {"tkFileDialog", "tkinter.filedialog"},
    {"tkSimpleDialog", "tkinter.simpledialog"},
    {"tkColorChooser", "tkinter.colorchooser"},
    {"tkCommonDialog", "tkinter.commondialog"},
    {"Dialog", "tkinter.dialog"},
    {"Tkdnd", "tkinter.dnd"},
    {"tkFont", "tkinter.font"},
    {"tkMessageBox", "tkinter.messagebox"},
    {"ScrolledText", "tkinter.scrolledtext"},
    {"Tkconstants", "tkinter.constants"},
    {"Tix", "tkinter.tix"},
    {"ttk", "tkinter.ttk"},
    {"Tkinter", "tkinter"},
    {"markupbase", "_markupbase"},
    {"_winreg", "winreg"},
    {"thread", "_thread"},
    {"dummy_thread", "_dummy_thread"},
    {"dbhash", "dbm.bsd"},
    {"dumbdbm", "dbm.dumb"},
    {"dbm", "dbm.ndbm"},
    {"gdbm", "dbm.gnu"},
    {"xmlrpclib", "xmlrpc.client"},
    {"SimpleXMLRPCServer", "xmlrpc.server"},
    {"httplib", "http.client"},
    {"htmlentitydefs", "html.entities"},
    {"HTMLParser", "html.parser"},
    {"Cookie", "http.cookies"},
    {"cookielib", "http.cookiejar"},
    {"BaseHTTPServer", "http.server"},
    {"test.test_support", "test.support"},
    {"commands", "subprocess"},
    {"urlparse", "urllib.parse"},
    {"robotparser", "urllib.robotparser"},
    {"urllib2", "urllib.request"},
    {"anydbm", "dbm"},
    {"_abcoll", "collections.abc"},
    {"cPickle", "pickle"},
    {"_elementtree", "xml.etree.ElementTree"},
    {"FileDialog", "tkinter.filedialog"},
    {"SimpleDialog", "tkinter.simpledialog"},
    {"DocXMLRPCServer", "xmlrpc.server"},
    {"SimpleHTTPServer", "http.server"},
    {"CGIHTTPServer", "http.server"},
    {"UserDict", "collections"},
    {"UserList", "collections"},
    {"UserString", "collections"},
    {"whichdb", "dbm"},
    {"StringIO", "io"},
    {"cStringIO", "io"},
};

static const char *const legacy_tensor_prefixes[] = {
    "Double", "Float", "Half", "Long", "Int", "Short", "Char", "Byte", "Bool", "BFloat16",
};

static int eqn(const char *a, size_t alen, const char *b) {
    return strlen(b) == alen && memcmp(a, b, alen) == 0;
}

int globals_blocked_module(const char *module, size_t mlen) {
    static const char *const blocked[] = {"sys", "os", "posix", "nt", "subprocess"};
    for (size_t i = 0; i < sizeof(blocked) / sizeof(blocked[0]); i++) {
        size_t bl = strlen(blocked[i]);
        if (mlen >= bl && memcmp(module, blocked[i], bl) == 0 && (mlen == bl || module[bl] == '.'))
            return 1;
    }
    return 0;
}

int globals_torchscript_class(const char *module, size_t mlen) {
    static const char ns[] = "__torch__";
    size_t nl = sizeof(ns) - 1;
    return mlen >= nl && memcmp(module, ns, nl) == 0 && (mlen == nl || (module[nl] == '.' && mlen > nl + 1));
}

/* A legacy tensor class such as FloatTensor: dtype of its storage, else DT_NONE. */
static DtypeId legacy_tensor_dtype(const char *name, size_t nlen) {
    static const char suffix[] = "Tensor";
    size_t sl = sizeof(suffix) - 1;
    if (nlen <= sl || memcmp(name + nlen - sl, suffix, sl) != 0) return DT_NONE;
    for (size_t i = 0; i < sizeof(legacy_tensor_prefixes) / sizeof(legacy_tensor_prefixes[0]); i++) {
        if (eqn(name, nlen - sl, legacy_tensor_prefixes[i])) {
            char buf[64];
            snprintf(buf, sizeof(buf), "%sStorage", legacy_tensor_prefixes[i]);
            return dtypes_by_storage(buf, strlen(buf));
        }
    }
    return DT_NONE;
}

/* pickle's fix_imports: the Python 3 name of a Python 2 (module, name), in place. */
static void py2_rename(const char **module, size_t *mlen, const char **name, size_t *nlen) {
    for (size_t i = 0; i < sizeof(py2_names) / sizeof(py2_names[0]); i++) {
        if (eqn(*module, *mlen, py2_names[i].module) && eqn(*name, *nlen, py2_names[i].name)) {
            *module = py2_names[i].to_module;
            *mlen = strlen(*module);
            *name = py2_names[i].to_name;
            *nlen = strlen(*name);
            return;
        }
    }
    for (size_t i = 0; i < sizeof(py2_modules) / sizeof(py2_modules[0]); i++) {
        if (eqn(*module, *mlen, py2_modules[i][0])) {
            *module = py2_modules[i][1];
            *mlen = strlen(*module);
            return;
        }
    }
}

void globals_lookup(const char *module, size_t mlen, const char *name, size_t nlen, int fix_imports,
                    GlobalHit *hit, char *canon, size_t canon_size) {
    if (fix_imports) py2_rename(&module, &mlen, &name, &nlen);
    /* modules torch and numpy renamed since (whatever the protocol, as torch's tables) */
    if (eqn(module, mlen, "torch.tensor")) {
        module = "torch._tensor";
        mlen = 13;
    } else if (eqn(module, mlen, "numpy.core.multiarray")) {
        module = "numpy._core.multiarray";
        mlen = 22;
    }
    if (canon != NULL && canon_size > 0)
        snprintf(canon, canon_size, "%.*s.%.*s", (int)mlen, module, (int)nlen, name);

    hit->id = G_UNKNOWN;
    hit->arg = -1;
    hit->flags = 0;
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        if (eqn(module, mlen, rows[i].module) && eqn(name, nlen, rows[i].name)) {
            hit->id = rows[i].id;
            hit->flags = rows[i].flags;
            return;
        }
    }
    int is_torch = eqn(module, mlen, "torch");
    int is_cuda = eqn(module, mlen, "torch.cuda");
    int is_sparse = eqn(module, mlen, "torch.sparse") || eqn(module, mlen, "torch.cuda.sparse");
    if (is_torch || is_cuda) {
        DtypeId dt = dtypes_by_storage(name, nlen);
        if (dt != DT_NONE && (is_torch || !(dtypes_table[dt].flags & DTF_QUANTIZED))) {
            hit->id = G_STORAGE;
            hit->arg = (int)dt;
            hit->flags = GF_WEIGHTS_ONLY;
            return;
        }
    }
    if (is_torch) {
        DtypeId dt = dtypes_by_name(name, nlen);
        if (dt != DT_NONE) {
            hit->id = G_DTYPE;
            hit->arg = (int)dt;
            hit->flags = GF_WEIGHTS_ONLY;
            return;
        }
    }
    if (is_torch || is_cuda || is_sparse) {
        DtypeId dt = legacy_tensor_dtype(name, nlen);
        if (dt != DT_NONE) {
            hit->id = G_LEGACY_TENSOR;
            hit->arg = (int)dt;
            hit->flags = GF_WEIGHTS_ONLY;
        }
    }
}
