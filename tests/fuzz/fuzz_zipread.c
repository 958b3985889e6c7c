/* fuzz_zipread.c - libFuzzer target for the Python-free zip reader (src/zipread.c).
 *
 * One input is one whole file. It is opened through a memcpy read_at that
 * aborts on any read outside the input (the reader must check every range
 * before reading, so such a read is a bug, not an error); every entry found
 * is looked up by name, located and extracted (bounded: the reader refuses
 * at open any declared size deflate could not honestly produce). Inputs of
 * odd length run with small limits so the limit paths are fuzzed too.
 *
 * Build: tests/fuzz/build.sh (clang -fsanitize=fuzzer,address,undefined, or
 * the gcc driver in driver.c). */
#include <stdio.h>
#include <stdlib.h>

#include "../../src/zipread.h"

typedef struct {
    const uint8_t *buf;
    uint64_t size;
} MemCtx;

static TfStatus mem_read_at(void *ctx, uint64_t off, void *buf, size_t n, TfErr *err) {
    const MemCtx *m = (const MemCtx *)ctx;
    (void)err;
    if (off > m->size || n > m->size - off) {
        fprintf(stderr, "BUG: read of %zu bytes at %llu outside input of %llu bytes\n", n, (unsigned long long)off,
                (unsigned long long)m->size);
        abort();
    }
    if (n) memcpy(buf, m->buf + off, n);
    return TF_OK;
}

/* Largest entry extracted per input (the reader bounds usize by 1032x the input anyway). */
#define MAX_EXTRACT ((uint64_t)64 << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    MemCtx ctx = {data, size};
    ZipReader z;
    TfErr err;
    TfLimits lim = TF_LIMITS_DEFAULT;
    if (size & 1) {
        lim.records = 8;
        lim.name = 40;
    }
    memset(&err, 0, sizeof err);
    if (zipread_open(&z, mem_read_at, &ctx, size, &lim, &err) != TF_OK) {
        if (err.status == TF_OK || err.detail[0] == 0) abort(); /* a failure must say why */
        zipread_close(&z); /* safe after a failed open */
        return 0;
    }
    if (z.n_entries == 0 || z.n_entries > lim.records || z.base > size) abort();
    for (size_t i = 0; i < z.n_entries; i++) {
        ZipEntry *e = &z.entries[i];
        if (zipread_find(&z, e->name, e->name_len) != e) abort(); /* names are unique */
        if (e->method == 0 && e->csize != e->usize) abort();
        memset(&err, 0, sizeof err);
        if (zipread_locate(&z, e, &err) != TF_OK) continue;
        if (e->data_offset > size || e->csize > size - e->data_offset) abort();
        if (e->usize > MAX_EXTRACT) continue;
        uint8_t *dst = (uint8_t *)malloc(e->usize ? (size_t)e->usize : 1);
        if (dst == NULL) continue;
        memset(&err, 0, sizeof err);
        (void)zipread_extract(&z, e, dst, &err);
        free(dst);
    }
    (void)zipread_find(&z, "data.pkl", 8);
    (void)zipread_find(&z, "", 0);
    zipread_close(&z);
    return 0;
}
