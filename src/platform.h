/* platform.h - the calls that differ between Linux and the other POSIX systems (macOS, the
 * BSDs), in one place.
 *
 * Each Linux-only call is made where the kernel is Linux (__linux__) and the C library
 * declares it (the macro that comes with it); elsewhere the portable equivalent below runs.
 * None of them changes what is written or read: they are hints (writeback, block reservation)
 * or a CPU count. A Linux build compiled with -U__linux__ takes every fallback here, which is
 * how they are tested.
 *
 * Durability is the caller's (torchfree's Python side fsyncs the file and its folder): fsync(2)
 * everywhere. On macOS that hands the data to the drive, whose cache may still lose it at power
 * loss; only fcntl(F_FULLFSYNC) flushes that cache too, at a large cost, and neither os.fsync
 * nor torch.save uses it.
 *
 * Include after Python.h (state.h) where both are needed: Python.h selects the C library's
 * feature set (_GNU_SOURCE comes from setup.py). */
#ifndef TORCHFREE_PLATFORM_H
#define TORCHFREE_PLATFORM_H

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

#include "common.h"

#if defined(__linux__) && defined(SYNC_FILE_RANGE_WRITE)
#define TF_HAVE_SYNC_FILE_RANGE 1
#endif
#if defined(__linux__) && defined(FALLOC_FL_KEEP_SIZE)
#include <sys/vfs.h>
#define TF_HAVE_EXT4_RESERVE 1
#ifndef EXT4_SUPER_MAGIC
#define EXT4_SUPER_MAGIC 0xEF53
#endif
#endif
#if defined(__linux__) && defined(MADV_NOHUGEPAGE)
#define TF_HAVE_THP 1
#endif
#if defined(__linux__) && defined(CPU_COUNT)
#define TF_HAVE_SCHED_GETAFFINITY 1
#endif

/* The CPUs this process may run on: on Linux its affinity mask (taskset, a container's cpuset
 * may allow fewer than are online), elsewhere the online ones. */
TF_INLINE long tf_usable_cpus(void) {
#ifdef TF_HAVE_SCHED_GETAFFINITY
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
    return sysconf(_SC_NPROCESSORS_ONLN);
}

/* Start the writeback of bytes [off, off + n) of fd without waiting for it, so that a later
 * fsync has little left to do. -1 (errno set) where it cannot: not a regular file, or no such
 * call (macOS and the BSDs have only synchronous flushes: fsync, F_FULLFSYNC; the fsync that
 * follows then does all the work, as it would without the head start). */
TF_INLINE int tf_writeback_start(int fd, int64_t off, int64_t n) {
#ifdef TF_HAVE_SYNC_FILE_RANGE
    return sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE);
#else
    (void)fd;
    (void)off;
    (void)n;
    errno = ENOSYS;
    return -1;
#endif
}

/* Whether fd's file lies on ext4, the one file system where reserving its blocks before the
 * writes was measured to pay (writer.c, sink_reserve). 0 where that cannot be asked (not Linux). */
TF_INLINE int tf_fd_on_ext4(int fd) {
#ifdef TF_HAVE_EXT4_RESERVE
    struct statfs fs;
    return fstatfs(fd, &fs) == 0 && fs.f_type == EXT4_SUPER_MAGIC;
#else
    (void)fd;
    return 0;
#endif
}

/* Ask for the blocks of n bytes at offset at of fd's file, keeping its size (blocks past the
 * end are freed by truncating the file to its own size). A hint: failures are ignored. Where
 * there is no FALLOC_FL_KEEP_SIZE nothing is asked (tf_fd_on_ext4 is then 0 and this is not
 * called): posix_fallocate would grow the file, and macOS's F_PREALLOCATE was never measured. */
TF_INLINE void tf_reserve_keep_size(int fd, off_t at, off_t n) {
#ifdef TF_HAVE_EXT4_RESERVE
    (void)fallocate(fd, FALLOC_FL_KEEP_SIZE, at, n);
#else
    (void)fd;
    (void)at;
    (void)n;
#endif
}

/* qsort_r in the argument order of glibc, musl, FreeBSD 14 and POSIX.1-2024: cmp(a, b, arg),
 * arg last. Apple's libc and FreeBSD before 14 have the older BSD order, qsort_r(base, n, size,
 * arg, cmp(arg, a, b)): adapted here through a thunk. */
typedef int (*TfCmpR)(const void *, const void *, void *);
#if defined(__APPLE__) || (defined(__FreeBSD__) && __FreeBSD__ < 14)
typedef struct {
    TfCmpR cmp;
    void *arg;
} TfSortThunk;
TF_INLINE int tf_sort_thunk(void *t, const void *a, const void *b) {
    const TfSortThunk *s = t;
    return s->cmp(a, b, s->arg);
}
TF_INLINE void tf_qsort_r(void *base, size_t n, size_t size, TfCmpR cmp, void *arg) {
    TfSortThunk t = {cmp, arg};
    qsort_r(base, n, size, &t, tf_sort_thunk);
}
#else
TF_INLINE void tf_qsort_r(void *base, size_t n, size_t size, TfCmpR cmp, void *arg) {
    qsort_r(base, n, size, cmp, arg);
}
#endif

/* ---- transparent huge pages (Linux) ----
 * numpy asks for huge pages (madvise MADV_HUGEPAGE) on every array of 4 MB or more. Where the
 * kernel's THP `defrag` setting makes such regions compact memory on fault (always, madvise,
 * defer+madvise), each 2 MB fault of a fresh buffer may stall in direct compaction when free
 * memory is fragmented (a page cache full of 4 kB pages). These three calls let storage.c see
 * that case and ask for small pages instead (see storage_thp_fit). Elsewhere they do nothing. */

/* The size of a huge page in bytes when the kernel may stall a fault of a MADV_HUGEPAGE region
 * in direct compaction (THP enabled, not `never`; defrag one of always, madvise, defer+madvise);
 * 0 when it never does or this cannot be known. Reads two or three small sysfs files. */
TF_INLINE uint64_t tf_thp_stall_size(void) {
#ifdef TF_HAVE_THP
    char b[256];
    uint64_t hp = 0;
    int stalls = 0;
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (f != NULL) {
        stalls = fgets(b, sizeof b, f) != NULL && strstr(b, "[never]") == NULL;
        fclose(f);
    }
    f = stalls ? fopen("/sys/kernel/mm/transparent_hugepage/defrag", "r") : NULL;
    stalls = 0;
    if (f != NULL) {
        stalls = fgets(b, sizeof b, f) != NULL && (strstr(b, "[always]") != NULL || strstr(b, "[madvise]") != NULL ||
                                                   strstr(b, "[defer+madvise]") != NULL);
        fclose(f);
    }
    f = stalls ? fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "r") : NULL;
    if (f != NULL) {
        unsigned long long v = 0;
        if (fscanf(f, "%llu", &v) == 1) hp = v;
        fclose(f);
    }
    return (hp & (hp - 1)) == 0 ? hp : 0; /* a power of two */
#else
    return 0;
#endif
}

/* The bytes of free memory held in blocks of at least hp bytes (huge pages that a fault gets
 * without compaction), from /proc/buddyinfo (every zone but DMA); -1 where it cannot be read. */
TF_INLINE int64_t tf_free_huge_bytes(uint64_t hp) {
#ifdef TF_HAVE_THP
    long ps = sysconf(_SC_PAGESIZE);
    FILE *f = fopen("/proc/buddyinfo", "r");
    if (f == NULL || ps <= 0) {
        if (f != NULL) fclose(f);
        return -1;
    }
    int64_t total = 0;
    char line[512];
    while (fgets(line, sizeof line, f) != NULL) {
        char *z = strstr(line, "zone");
        if (z == NULL) continue;
        z += 4;
        while (*z == ' ') z++;
        if (strncmp(z, "DMA ", 4) == 0) continue; /* the 16 MB ISA zone: not for user pages */
        while (*z != ' ' && *z != '\0') z++;      /* past the zone's name */
        uint64_t block = (uint64_t)ps;
        for (int order = 0; order < 20; order++, block *= 2) {
            char *end;
            unsigned long long n = strtoull(z, &end, 10);
            if (end == z) break;
            z = end;
            if (block >= hp && n < ((uint64_t)1 << 40) / block) total += (int64_t)(n * block);
        }
    }
    fclose(f);
    return total;
#else
    (void)hp;
    return -1;
#endif
}

/* Ask for small pages over the whole pages within [p, p + n) (numpy's own madvise covers the
 * same pages); a hint, nothing is faulted. */
TF_INLINE void tf_no_hugepage(void *p, size_t n) {
#ifdef TF_HAVE_THP
    long ps = sysconf(_SC_PAGESIZE);
    if (ps <= 0) return;
    uintptr_t a = ((uintptr_t)p + (uintptr_t)ps - 1) & ~((uintptr_t)ps - 1);
    uintptr_t e = ((uintptr_t)p + n) & ~((uintptr_t)ps - 1);
    if (e > a) (void)madvise((void *)a, e - a, MADV_NOHUGEPAGE);
#else
    (void)p;
    (void)n;
#endif
}

#endif
