/* driver.c - a libFuzzer-compatible main for compilers without libFuzzer (gcc).
 *
 * Links with one fuzz_*.c target. Runs every seed once, then random
 * mutations of them (bit flips, interesting integers, inserts, deletes,
 * duplications, splices) until -runs or -max_total_time is reached. Built
 * with -fsanitize=address,undefined; on a sanitizer report the input being
 * run is written to <dump dir>/crash-<hash> first, as libFuzzer does.
 *
 *   driver [-runs=N] [-max_total_time=S] [-seed=N] [-max_len=N] [-artifact_prefix=DIR/] PATH...
 *
 * PATH: seed files or folders of them. Prints "DRIVER runs=N seeds=M secs=S". */
#define _POSIX_C_SOURCE 200809L

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#if defined(__has_include)
#if __has_include(<sanitizer/common_interface_defs.h>)
#include <sanitizer/common_interface_defs.h>
#define HAVE_DEATH_CALLBACK 1
#endif
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct {
    uint8_t *buf;
    size_t len;
} Blob;

static Blob *seeds;
static size_t n_seeds, cap_seeds;
static const uint8_t *cur;
static size_t cur_len;
static char prefix[4096] = "./";

static void add_seed(uint8_t *buf, size_t len) {
    if (n_seeds == cap_seeds) {
        cap_seeds = cap_seeds ? cap_seeds * 2 : 256;
        seeds = (Blob *)realloc(seeds, cap_seeds * sizeof(Blob));
        if (!seeds) abort();
    }
    seeds[n_seeds].buf = buf;
    seeds[n_seeds].len = len;
    n_seeds++;
}

static void load_file(const char *path, size_t max_len) {
    FILE *f = fopen(path, "rb");
    if (!f) return;
    uint8_t *buf = (uint8_t *)malloc(max_len ? max_len : 1);
    size_t n = buf ? fread(buf, 1, max_len, f) : 0;
    fclose(f);
    if (!buf) return;
    uint8_t *exact = (uint8_t *)realloc(buf, n ? n : 1); /* exact size: overreads are caught */
    add_seed(exact ? exact : buf, n);
}

static void load_path(const char *path, size_t max_len) {
    struct stat st;
    if (stat(path, &st) != 0) return;
    if (!S_ISDIR(st.st_mode)) {
        load_file(path, max_len);
        return;
    }
    DIR *d = opendir(path);
    if (!d) return;
    struct dirent *ent;
    while ((ent = readdir(d)) != NULL) {
        if (ent->d_name[0] == '.') continue;
        char full[8192];
        snprintf(full, sizeof full, "%s/%s", path, ent->d_name);
        load_path(full, max_len);
    }
    closedir(d);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) {
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1Dull;
}
static size_t below(size_t n) { return n ? (size_t)(rnd() % n) : 0; }

static uint64_t fnv(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static void dump_current(void) {
    if (!cur) return;
    char path[8192];
    snprintf(path, sizeof path, "%scrash-%016llx", prefix, (unsigned long long)fnv(cur, cur_len));
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(cur, 1, cur_len, f);
        fclose(f);
        fprintf(stderr, "DRIVER: wrote the crashing input to %s\n", path);
    }
}

static void run_one(const uint8_t *p, size_t n) {
    cur = p;
    cur_len = n;
    LLVMFuzzerTestOneInput(p, n);
    cur = NULL;
}

/* Apply one random mutation to buf[0, *len) (capacity cap). */
static void mutate(uint8_t *buf, size_t *len, size_t cap) {
    static const uint64_t interesting[] = {0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x10000,
                                           0x7fffffff, 0x80000000u, 0xffffffffu, 0x100000000ull,
                                           0x7fffffffffffffffull, 0xffffffffffffffffull, 1000000000000000000ull};
    size_t n = *len;
    switch (below(9)) {
    case 0: /* flip a bit */
        if (n) buf[below(n)] ^= (uint8_t)(1u << below(8));
        break;
    case 1: /* random byte */
        if (n) buf[below(n)] = (uint8_t)rnd();
        break;
    case 2: { /* interesting little-endian integer of 1, 2, 4 or 8 bytes */
        size_t w = (size_t)1 << below(4);
        if (n < w) break;
        size_t at = below(n - w + 1);
        uint64_t v = interesting[below(sizeof interesting / sizeof interesting[0])];
        if (rnd() & 1) v += (rnd() & 3) - 1;
        for (size_t i = 0; i < w; i++) buf[at + i] = (uint8_t)(v >> (8 * i));
        break;
    }
    case 3: { /* add or subtract a small number to a 16/32-bit field */
        size_t w = rnd() & 1 ? 4 : 2;
        if (n < w) break;
        size_t at = below(n - w + 1);
        uint32_t v = 0;
        for (size_t i = 0; i < w; i++) v |= (uint32_t)buf[at + i] << (8 * i);
        v += (uint32_t)(below(33)) - 16u;
        for (size_t i = 0; i < w; i++) buf[at + i] = (uint8_t)(v >> (8 * i));
        break;
    }
    case 4: { /* insert random bytes */
        size_t k = 1 + below(16);
        if (n + k > cap) break;
        size_t at = below(n + 1);
        memmove(buf + at + k, buf + at, n - at);
        for (size_t i = 0; i < k; i++) buf[at + i] = (uint8_t)rnd();
        *len = n + k;
        break;
    }
    case 5: { /* delete a range */
        if (!n) break;
        size_t at = below(n), k = 1 + below(n - at < 64 ? n - at : 64);
        memmove(buf + at, buf + at + k, n - at - k);
        *len = n - k;
        break;
    }
    case 6: { /* duplicate a range */
        if (!n) break;
        size_t at = below(n), k = 1 + below(n - at < 256 ? n - at : 256);
        if (n + k > cap) break;
        size_t to = below(n + 1);
        uint8_t tmp[256];
        memcpy(tmp, buf + at, k);
        memmove(buf + to + k, buf + to, n - to);
        memcpy(buf + to, tmp, k);
        *len = n + k;
        break;
    }
    case 7: { /* overwrite with a chunk of another seed */
        const Blob *o = &seeds[below(n_seeds)];
        if (!o->len || !n) break;
        size_t from = below(o->len), k = 1 + below(o->len - from < 512 ? o->len - from : 512);
        size_t to = below(n);
        if (k > n - to) k = n - to;
        memcpy(buf + to, o->buf + from, k);
        break;
    }
    case 8: /* truncate */
        if (n) *len = below(n + 1);
        break;
    }
}

int main(int argc, char **argv) {
    uint64_t runs = 100000, secs = 0;
    size_t max_len = 1 << 20;
    int npaths = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "-runs=", 6)) runs = strtoull(a + 6, NULL, 10);
        else if (!strncmp(a, "-max_total_time=", 16)) secs = strtoull(a + 16, NULL, 10);
        else if (!strncmp(a, "-seed=", 6)) rng_state = strtoull(a + 6, NULL, 10) * 0x9E3779B97F4A7C15ull + 1;
        else if (!strncmp(a, "-max_len=", 9)) max_len = (size_t)strtoull(a + 9, NULL, 10);
        else if (!strncmp(a, "-artifact_prefix=", 17)) snprintf(prefix, sizeof prefix, "%s", a + 17);
        else if (a[0] == '-') continue; /* other libFuzzer flags: ignored */
        else npaths++;
    }
#ifdef HAVE_DEATH_CALLBACK
    __sanitizer_set_death_callback(dump_current);
#endif
    for (int i = 1; i < argc; i++)
        if (argv[i][0] != '-') load_path(argv[i], max_len);
    if (n_seeds == 0) add_seed((uint8_t *)calloc(1, 1), 0);
    time_t t0 = time(NULL);
    uint64_t done = 0;
    for (size_t i = 0; i < n_seeds; i++, done++) run_one(seeds[i].buf, seeds[i].len);
    size_t cap = max_len + 1024;
    uint8_t *buf = (uint8_t *)malloc(cap);
    if (!buf) abort();
    while (done < runs) {
        if (secs && (done & 255) == 0 && (uint64_t)(time(NULL) - t0) >= secs) break;
        const Blob *s = &seeds[below(n_seeds)];
        size_t len = s->len < max_len ? s->len : max_len;
        memcpy(buf, s->buf, len);
        size_t k = 1 + below(8);
        for (size_t j = 0; j < k; j++) mutate(buf, &len, max_len);
        /* run from a buffer of the exact size, so reads past the end are caught */
        uint8_t *exact = (uint8_t *)malloc(len ? len : 1);
        if (!exact) abort();
        memcpy(exact, buf, len);
        run_one(exact, len);
        free(exact);
        done++;
    }
    printf("DRIVER runs=%llu seeds=%zu secs=%lld\n", (unsigned long long)done, n_seeds, (long long)(time(NULL) - t0));
    free(buf);
    for (size_t i = 0; i < n_seeds; i++) free(seeds[i].buf);
    free(seeds);
    return 0;
}
