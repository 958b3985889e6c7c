/* fuzz_pickscan.c - libFuzzer target for the pickle parsing layer: the
 * Python-free static walker src/pickscan.c (the VM's framing rules, length
 * checks, dense memo and limits) and the allowlist lookup of src/globals.c.
 *
 * Each input is a data.pkl. It is walked twice, with the default limits and
 * with tiny ones; properties checked: a walk that passes the tiny limits also
 * passes the defaults with the same globals, every global name lies inside the
 * input, and a failure always says why. */
#include <stdio.h>
#include <stdlib.h>

#include "../../src/globals.h"
#include "../../src/pickscan.h"

static void check_names(const PickScan *ps, const uint8_t *data, size_t size) {
    char canon[2 * 4096 + 40];
    for (size_t i = 0; i < ps->n_globals; i++) {
        const PickGlobal *g = &ps->globals[i];
        if (g->offset >= size) abort();
        if (g->module == NULL) continue;
        const uint8_t *m = (const uint8_t *)g->module, *n = (const uint8_t *)g->name;
        if (m < data || g->module_len > size || m + g->module_len > data + size) abort();
        if (n < data || g->name_len > size || n + g->name_len > data + size) abort();
        if (g->module_len <= 4096 && g->name_len <= 4096) {
            GlobalHit hit;
            globals_lookup(g->module, g->module_len, g->name, g->name_len, g->protocol < 3, &hit, canon, sizeof canon);
            if (hit.id < G_UNKNOWN || hit.id >= G_COUNT) abort();
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    PickScan big, small;
    TfErr err;
    TfLimits tiny = TF_LIMITS_DEFAULT;
    tiny.stack = 64;
    tiny.marks = 8;
    tiny.memo = 16;
    tiny.name = 32;
    tiny.pickle_bytes = 4096;

    memset(&err, 0, sizeof err);
    TfStatus rb = pickscan_run(data, size, NULL, &big, &err);
    if (rb != TF_OK && (err.status != rb || err.detail[0] == 0)) abort();
    if (rb == TF_OK) check_names(&big, data, size);

    memset(&err, 0, sizeof err);
    TfStatus rs = pickscan_run(data, size, &tiny, &small, &err);
    if (rs != TF_OK && (err.status != rs || err.detail[0] == 0)) abort();
    if (rs == TF_OK) {
        /* tighter limits can only turn a pass into a LimitError, never the reverse */
        if (rb != TF_OK) abort();
        if (small.n_globals != big.n_globals || small.n_ops != big.n_ops) abort();
        for (size_t i = 0; i < small.n_globals; i++)
            if (small.globals[i].offset != big.globals[i].offset || small.globals[i].module != big.globals[i].module)
                abort();
        if (small.max_stack > tiny.stack || small.max_marks > tiny.marks || small.memo_len > tiny.memo) abort();
        pickscan_free(&small);
    } else if (rs != TF_ERR_LIMIT && rb == TF_OK) {
        abort(); /* only a limit may separate the two walks */
    }
    if (rb == TF_OK) pickscan_free(&big);
    return 0;
}
