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
 * Include after Python.h (module.h) where both are needed: Python.h selects the C library's
 * feature set (_GNU_SOURCE comes from setup.py). */
#ifndef TORCHFREE_PLATFORM_H
#define TORCHFREE_PLATFORM_H

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdlib.h>
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

#endif
