/* zipdump.c - command-line driver for src/zipread.c, used by tests/test_zipread_c.py.
 *
 *   zipdump [options] FILE
 *
 * Default: print "PREFIX <prefix>", then one line per entry
 *   "<name> <method> <csize> <usize> <data_offset> <crc32 hex>"
 * resolving every data offset, or "ERROR <status> <offset> <detail>" and exit 1.
 *
 * Options:
 *   --mem              read through memcpy from a buffer holding the whole file
 *                      (default: pread on the file descriptor)
 *   --verify           also extract every entry, append the crc32 (hex) of the
 *                      extracted bytes to its line, and check zipread_find
 *   --extract NAME     write the bytes of entry NAME (after the prefix) to stdout
 *   --records N        override the records limit
 *   --name-limit N     override the name-length limit
 *   --bench N          open and close N times, print "BENCH <microseconds per open>"
 *   --sweep-truncate   for every prefix length k of the file, open + extract
 *                      everything from the first k bytes (in-process, for sanitizers)
 *   --sweep-flip       for every byte, try a few replacement values and open +
 *                      extract everything; print "SWEEP ok=N err=M"
 *
 * The memory read_at aborts on any read outside the input: the reader must
 * check every range before reading, so such a read is a bug, not an error. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

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

static TfStatus fd_read_at(void *ctx, uint64_t off, void *buf, size_t n, TfErr *err) {
    int fd = *(int *)ctx;
    uint8_t *p = (uint8_t *)buf;
    while (n > 0) {
        size_t want = n > (1u << 30) ? (1u << 30) : n;
        ssize_t got = pread(fd, p, want, (off_t)off);
        if (got < 0) {
            if (errno == EINTR) continue;
            return tf_fail(err, TF_ERR_IO, off, "pread failed: %s", strerror(errno));
        }
        if (got == 0) return tf_fail(err, TF_ERR_IO, off, "unexpected end of file");
        p += got;
        off += (uint64_t)got;
        n -= (size_t)got;
    }
    return TF_OK;
}

static int print_error(const TfErr *err) {
    printf("ERROR %d %llu %s\n", (int)err->status, (unsigned long long)err->offset, err->detail);
    return 1;
}

static uint8_t *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    size_t cap = 0, len = 0;
    if (!f) return NULL;
    for (;;) {
        if (len == cap) {
            cap = cap ? cap * 2 : 65536;
            uint8_t *nb = (uint8_t *)realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (got == 0) break;
    }
    fclose(f);
    *size = len;
    return buf;
}

/* Extract one entry into a fresh buffer (usize has been bounded by open). */
static TfStatus extract_alloc(ZipReader *z, ZipEntry *e, uint8_t **out, TfErr *err) {
    *out = (uint8_t *)malloc(e->usize ? (size_t)e->usize : 1);
    if (!*out) return tf_fail(err, TF_ERR_NOMEM, 0, "out of memory for %llu bytes", (unsigned long long)e->usize);
    TfStatus st = zipread_extract(z, e, *out, err);
    if (st != TF_OK) {
        free(*out);
        *out = NULL;
    }
    return st;
}

/* One in-process trial for the sweeps: open, find, locate and extract all. */
static int trial(const uint8_t *data, size_t size, const TfLimits *lim) {
    /* Copy into an exact-size allocation so ASan sees any over-read. */
    uint8_t *copy = (uint8_t *)malloc(size ? size : 1);
    MemCtx m;
    ZipReader z;
    TfErr err;
    int ok = 1;
    if (!copy) abort();
    if (size) memcpy(copy, data, size);
    m.buf = copy;
    m.size = size;
    if (zipread_open(&z, mem_read_at, &m, size, lim, &err) != TF_OK) {
        zipread_close(&z); /* must be harmless after a failed open */
        free(copy);
        return 0;
    }
    for (size_t i = 0; i < z.n_entries; i++) {
        ZipEntry *e = &z.entries[i];
        if (zipread_find(&z, e->name, e->name_len) != e) {
            fprintf(stderr, "BUG: zipread_find failed for entry %zu\n", i);
            abort();
        }
        uint8_t *out;
        if (extract_alloc(&z, e, &out, &err) != TF_OK) {
            ok = 0;
            continue;
        }
        free(out);
    }
    zipread_close(&z);
    zipread_close(&z); /* twice: close must leave a closed reader */
    free(copy);
    return ok;
}

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

int main(int argc, char **argv) {
    TfLimits lim = TF_LIMITS_DEFAULT;
    const char *path = NULL, *extract = NULL;
    int use_mem = 0, verify = 0, sweep_trunc = 0, sweep_flip = 0;
    long bench = 0;

    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mem")) use_mem = 1;
        else if (!strcmp(argv[i], "--verify")) verify = 1;
        else if (!strcmp(argv[i], "--sweep-truncate")) sweep_trunc = 1;
        else if (!strcmp(argv[i], "--sweep-flip")) sweep_flip = 1;
        else if (!strcmp(argv[i], "--extract") && i + 1 < argc) extract = argv[++i];
        else if (!strcmp(argv[i], "--records") && i + 1 < argc) lim.records = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--name-limit") && i + 1 < argc) lim.name = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--bench") && i + 1 < argc) bench = strtol(argv[++i], NULL, 10);
        else if (argv[i][0] == '-' && argv[i][1] == '-') {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        } else path = argv[i];
    }
    if (!path) {
        fprintf(stderr, "usage: zipdump [--mem] [--verify] [--extract NAME] [--sweep-truncate] [--sweep-flip] FILE\n");
        return 2;
    }

    size_t fsize = 0;
    uint8_t *fbuf = NULL;
    int fd = -1;
    MemCtx m;
    void *ctx;
    TfReadAt read_at;
    if (use_mem || sweep_trunc || sweep_flip || bench) {
        fbuf = read_file(path, &fsize);
        if (!fbuf) {
            fprintf(stderr, "cannot read %s\n", path);
            return 2;
        }
        m.buf = fbuf;
        m.size = fsize;
        ctx = &m;
        read_at = mem_read_at;
    } else {
        fd = open(path, O_RDONLY);
        if (fd < 0) {
            fprintf(stderr, "cannot open %s\n", path);
            return 2;
        }
        off_t end = lseek(fd, 0, SEEK_END);
        if (end < 0) return 2;
        fsize = (size_t)end;
        ctx = &fd;
        read_at = fd_read_at;
    }

    if (sweep_trunc || sweep_flip) {
        long ok = 0, bad = 0;
        if (sweep_trunc)
            for (size_t k = 0; k <= fsize; k++) trial(fbuf, k, &lim) ? ok++ : bad++;
        if (sweep_flip) {
            for (size_t i = 0; i < fsize; i++) {
                const uint8_t orig = fbuf[i];
                const uint8_t vals[4] = {0x00, 0xFF, (uint8_t)(orig ^ 0x01), (uint8_t)(orig ^ 0x80)};
                for (int v = 0; v < 4; v++) {
                    if (vals[v] == orig) continue;
                    fbuf[i] = vals[v];
                    trial(fbuf, fsize, &lim) ? ok++ : bad++;
                }
                fbuf[i] = orig;
            }
        }
        printf("SWEEP ok=%ld err=%ld\n", ok, bad);
        free(fbuf);
        return 0;
    }

    ZipReader z;
    TfErr err;
    if (bench > 0) {
        double t0 = now_us();
        for (long r = 0; r < bench; r++) {
            if (zipread_open(&z, read_at, ctx, fsize, &lim, &err) != TF_OK) return print_error(&err);
            zipread_close(&z);
        }
        printf("BENCH %.1f\n", (now_us() - t0) / (double)bench);
        free(fbuf);
        return 0;
    }

    if (zipread_open(&z, read_at, ctx, fsize, &lim, &err) != TF_OK) {
        zipread_close(&z);
        free(fbuf);
        return print_error(&err);
    }
    int rc = 0;
    if (extract) {
        ZipEntry *e = zipread_find(&z, extract, strlen(extract));
        uint8_t *out;
        if (!e) {
            tf_fail(&err, TF_ERR_FORMAT, 0, "no entry named '%s'", extract);
            rc = print_error(&err);
        } else if (extract_alloc(&z, e, &out, &err) != TF_OK) {
            rc = print_error(&err);
        } else {
            fwrite(out, 1, (size_t)e->usize, stdout);
            free(out);
        }
    } else {
        printf("PREFIX %s\n", z.prefix);
        for (size_t i = 0; i < z.n_entries && rc == 0; i++) {
            ZipEntry *e = &z.entries[i];
            if (zipread_locate(&z, e, &err) != TF_OK) {
                rc = print_error(&err);
                break;
            }
            printf("%s %u %llu %llu %llu %08x", e->name, (unsigned)e->method, (unsigned long long)e->csize,
                   (unsigned long long)e->usize, (unsigned long long)e->data_offset, (unsigned)e->crc32);
            if (verify) {
                uint8_t *out;
                if (zipread_find(&z, e->name, e->name_len) != e) {
                    printf("\n");
                    tf_fail(&err, TF_ERR_FORMAT, 0, "zipread_find did not return entry %zu", i);
                    rc = print_error(&err);
                    break;
                }
                if (extract_alloc(&z, e, &out, &err) != TF_OK) {
                    printf("\n");
                    rc = print_error(&err);
                    break;
                }
                uLong c = crc32(0L, Z_NULL, 0);
                /* zlib's crc32 takes uInt lengths: feed in pieces. */
                for (uint64_t done = 0; done < e->usize;) {
                    uint64_t left = e->usize - done;
                    uInt n = (uInt)(left > (1u << 30) ? (1u << 30) : left);
                    c = crc32(c, out + done, n);
                    done += n;
                }
                free(out);
                printf(" %08lx", (unsigned long)c);
            }
            printf("\n");
        }
        if (rc == 0 && verify && zipread_find(&z, "no/such/entry", 13) != NULL) {
            tf_fail(&err, TF_ERR_FORMAT, 0, "zipread_find found an absent name");
            rc = print_error(&err);
        }
    }
    zipread_close(&z);
    if (fd >= 0) close(fd);
    free(fbuf);
    return rc;
}
