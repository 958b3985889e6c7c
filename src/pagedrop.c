/* pagedrop.c - one-shot mmap loads: the pages of local headers already read are dropped as the
 * load goes (and the whole mapping at its end), and a thread prefaults the headers ahead of the
 * VM. Below state.c: it uses only the Loader's fields and the OS. */
#include "pagedrop.h"

#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* ---- dropping the pages of local headers already read -----------------------------------
 *
 * Reading each storage's local header through the mapping maps its page into this process,
 * with the pages around it (the kernel's fault-around): on a file of many small tensors that
 * is every page of the file, so an mmap load that should add only metadata to the RSS adds the
 * file's size (page-cache pages, not private memory, but counted all the same). Source() maps
 * the file privately for one load and says so (drop_pages); then, in an archive of
 * DROP_MIN_RECORDS records or more, the pages behind the last header read are dropped
 * (MADV_DONTNEED) as the load goes, by the prefault thread below or, without one, by the
 * loading thread every DROP_BATCH headers, and the whole mapping when the load ends: arrays
 * over those pages fault them back in from the page cache when used.
 *
 * Dropping a page of a private mapping is only harmless when the page is clean: a page that
 * was written to (copy-on-write) would lose the writes. Nothing of ours writes to the mapping
 * except the byte swap of a big-endian file, and no user code can see an array or storage
 * before the load returns unless the load calls it: a map_location callable, safe_globals,
 * torch mode. loader_drop_start turns dropping off in all those cases, for lazy archives
 * (Archive, whose arrays outlive any one call) and for any buffer the caller did not map for
 * this load alone; loader_drop_off turns it off for the rest of the load before anything that
 * may run Python code (our helpers, and so any trace or profile hook) or release the GIL. */

#define DROP_BATCH 256u
/* Fewer records than this leave few header pages mapped (a few large tensors): not worth a
 * madvise over the whole file */
#define DROP_MIN_RECORDS 512u

static uintptr_t page_size(void) {
    static uintptr_t ps;
    if (ps == 0) {
        long v = sysconf(_SC_PAGESIZE);
        ps = v > 0 ? (uintptr_t)v : 4096;
    }
    return ps;
}

/* Drop the whole pages of the mapping within file offsets [lo, hi). */
static void drop_span(Loader *L, uint64_t lo, uint64_t hi) {
    uintptr_t ps = page_size();
    if (hi > L->size) hi = L->size;
    if (lo >= hi) return;
    uintptr_t a = ((uintptr_t)(L->src + lo) + ps - 1) & ~(ps - 1);
    uintptr_t b = ((uintptr_t)(L->src + hi)) & ~(ps - 1);
    if (b > a) (void)madvise((void *)a, b - a, MADV_DONTNEED);
}

void loader_drop_start(Loader *L) {
    L->drop_ok = L->drop_ok && L->format == FMT_ZIP && L->mode == SRC_MAP && L->src != NULL &&
                 !L->big_endian && L->ml_kind != ML_CALL && L->safe_globals == NULL && L->torch == NULL &&
                 !L->lazy && L->zip.n_entries >= DROP_MIN_RECORDS;
    L->drop_n = 0;
    L->drop_end = 0;
    L->drop_seen = 0;
    L->drop_async = 0;
    (void)page_size(); /* set before the prefault thread may read it */
}

void loader_drop_note(Loader *L, const ZipEntry *e) {
    uint64_t off = e->header_offset;
    if (L->drop_n == 0 || off < L->drop_min) L->drop_min = off;
    if (L->drop_n == 0 || off > L->drop_max) L->drop_max = off;
    if (off > L->drop_seen) __atomic_store_n(&L->drop_seen, off, __ATOMIC_RELAXED);
    if (L->drop_async || ++L->drop_n < DROP_BATCH) return;
    /* from the end of the last span (or the lowest header, if below it) to the page of the highest
     * header, which the next header may share */
    uint64_t lo = L->drop_min < L->drop_end ? L->drop_min : L->drop_end;
    uint64_t hi = L->drop_max & ~(uint64_t)(page_size() - 1);
    drop_span(L, lo, hi);
    if (hi > L->drop_end) L->drop_end = hi;
    L->drop_n = 0;
}

void loader_drop_all(Loader *L) {
    if (L->drop_ok) drop_span(L, 0, L->size);
    L->drop_ok = 0;
}

/* ---- prefaulting the local headers of a mapped archive ------------------------------
 *
 * Each storage's local zip header must be read (it fixes where the data starts), and in a
 * fresh mapping every such read is a page fault: ~3,000 of them for a 50,000-storage
 * optimizer checkpoint, a fifth of the load. While the VM builds objects on this thread, a
 * second thread touches those pages in directory order, so the faults are taken off the
 * critical path. It only reads the mapping, which stays alive (the Loader holds it) until
 * the thread is joined.
 *
 * When pages are dropped (drop_ok) the same thread drops them too, behind the highest header
 * the loader has read (drop_seen), and touches pages at most PREFAULT_AHEAD bytes ahead of it:
 * the cost of unmapping stays off the critical path, and what is resident at once stays small.
 * It is joined before the load returns, so no page is dropped once user code holds the arrays. */

#define PREFAULT_AHEAD ((uint64_t)2 << 20)
#define DROP_STEP ((uint64_t)1 << 20)
#define DROP_BEHIND ((uint64_t)8 << 20) /* dropped even when not ahead, past this far behind */

/* Drop up to DROP_STEP * 4 bytes behind the loader (the page of the last header it read stays).
 * Returns 1 when it dropped something. */
static int prefault_drop(Prefault *p, uint64_t seen) {
    uint64_t hi = seen & ~(uint64_t)(page_size() - 1);
    if (hi < p->dropped + DROP_STEP) return 0;
    if (hi > p->dropped + 4 * DROP_STEP) hi = p->dropped + 4 * DROP_STEP;
    int done = 0;
    pthread_mutex_lock(&p->mu);
    if (p->dropping) {
        drop_span(p->drop, p->dropped, hi);
        p->dropped = hi;
        done = 1;
    }
    pthread_mutex_unlock(&p->mu);
    return done;
}

static int prefault_dropping(Prefault *p) { return __atomic_load_n(&p->dropping, __ATOMIC_RELAXED); }

void loader_drop_off(Loader *L) {
    if (!L->drop_ok) return;
    L->drop_ok = 0;
    Prefault *p = L->prefault;
    if (p != NULL && p->drop != NULL) {
        /* once the lock is released no madvise is running, and none starts */
        pthread_mutex_lock(&p->mu);
        __atomic_store_n(&p->dropping, 0, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&p->mu);
    }
}

static void *prefault_run(void *arg) {
    Prefault *p = arg;
    uint64_t last_page = UINT64_MAX;
    for (size_t i = 0; i < p->n && !p->stop; i++) {
        uint64_t off = p->entries[i].header_offset;
        if (off >= p->size || off >> 12 == last_page) continue;
        if (p->drop != NULL && !prefault_dropping(p)) p->drop = NULL; /* loader_drop_off: plain prefaulting */
        if (p->drop != NULL && __atomic_load_n(&p->drop->drop_seen, __ATOMIC_RELAXED) > p->dropped + DROP_BEHIND)
            prefault_drop(p, __atomic_load_n(&p->drop->drop_seen, __ATOMIC_RELAXED)); /* too far behind */
        if (p->drop != NULL) {
            /* Touch only pages ahead of the loader (a page it has read may be gone already),
             * at most PREFAULT_AHEAD bytes ahead (pages faulted too early would all be resident
             * at once). Faulting comes first: pages are dropped only while far enough ahead. */
            uint64_t seen;
            while ((seen = __atomic_load_n(&p->drop->drop_seen, __ATOMIC_RELAXED)) + PREFAULT_AHEAD < off &&
                   !p->stop && prefault_dropping(p)) {
                if (!prefault_drop(p, seen)) {
                    struct timespec ts = {0, 20000};
                    nanosleep(&ts, NULL);
                }
            }
            if (off <= seen) continue;
        }
        last_page = off >> 12;
        (void)p->base[off];
    }
    while (p->drop != NULL && !p->stop && prefault_dropping(p)) { /* every header touched: keep dropping until joined */
        if (!prefault_drop(p, __atomic_load_n(&p->drop->drop_seen, __ATOMIC_RELAXED))) {
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

int prefault_start(Loader *L, Prefault *p, pthread_t *tid) {
    if (L->mode != SRC_MAP || L->zip.n_entries < 1024) return 0;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 2) return 0;
    p->base = L->src;
    p->size = L->size;
    p->entries = L->zip.entries;
    p->n = L->zip.n_entries;
    p->stop = 0;
    p->drop = L->drop_ok ? L : NULL;
    p->dropped = L->drop_end;
    p->dropping = p->drop != NULL;
    if (p->drop != NULL && pthread_mutex_init(&p->mu, NULL) != 0) return 0;
    if (pthread_create(tid, NULL, prefault_run, p) != 0) {
        if (p->drop != NULL) pthread_mutex_destroy(&p->mu);
        return 0;
    }
    L->drop_async = p->drop != NULL; /* loader_drop_note leaves the dropping to the thread */
    L->prefault = p;
    return 1;
}

void prefault_stop(Loader *L, Prefault *p, pthread_t tid, int started) {
    if (!started) return;
    p->stop = 1;
    pthread_join(tid, NULL);
    if (L->drop_async) pthread_mutex_destroy(&p->mu);
    L->drop_async = 0;
    L->prefault = NULL;
}

