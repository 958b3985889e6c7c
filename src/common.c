/* common.c - the error-record helper of the Python-free layer. */
#include "common.h"

#include <stdarg.h>
#include <stdio.h>

TfStatus tf_fail(TfErr *err, TfStatus status, uint64_t offset, const char *fmt, ...) {
    va_list ap;
    err->status = status;
    err->offset = offset;
    va_start(ap, fmt);
    vsnprintf(err->detail, sizeof(err->detail), fmt, ap);
    va_end(ap);
    return status;
}
