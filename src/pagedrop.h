/* pagedrop.h - dropping the pages of a one-shot mmap load's local headers as it goes, and the
 * thread that prefaults them (pagedrop.c). */
#ifndef TORCHFREE_PAGEDROP_H
#define TORCHFREE_PAGEDROP_H

#include "loader.h"

#include <pthread.h>

/* Decide whether this load drops pages (L->drop_ok was the request). */
void loader_drop_start(Loader *L);
/* A local header of the mapping was read (zipread_locate): its page may be dropped soon. */
void loader_drop_note(Loader *L, const ZipEntry *e);
/* No page of the mapping is dropped from now on (none is being dropped when it returns): call it
 * before running Python code or releasing the GIL during a load, as user code could then see an
 * array over the mapping and write to it. */
void loader_drop_off(Loader *L);
/* The load is over: every page of the mapping goes. */
void loader_drop_all(Loader *L);

/* The prefault thread of a mapped archive's local headers, run while the VM runs. */
typedef struct Prefault Prefault;
struct Prefault {
    const volatile uint8_t *base;
    uint64_t size;
    const ZipEntry *entries;
    size_t n;
    volatile int stop;
    Loader *drop;     /* the loader whose pages are dropped, or NULL */
    uint64_t dropped; /* end of the span dropped so far */
    int dropping;     /* cleared by loader_drop_off (under mu): no madvise after that */
    pthread_mutex_t mu;
};
/* 1 when it started the thread (p, *tid: its state), 0 when not (nothing to stop). */
int prefault_start(Loader *L, Prefault *p, pthread_t *tid);
void prefault_stop(Loader *L, Prefault *p, pthread_t tid, int started);

#endif
