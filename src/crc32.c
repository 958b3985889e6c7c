/* crc32.c - CRC-32 folded with carry-less multiplies (see crc32.h).
 *
 * The method is the one of Intel's white paper "Fast CRC Computation for
 * Generic Polynomials Using PCLMULQDQ Instruction" (Gopal et al., 2009), in
 * its bit-reflected form: the buffer is cut into 128-bit blocks; four
 * accumulators each take every fourth block, and an accumulator A is carried
 * 512 bits forward by A.lo * (x^(512+32) mod P) ^ A.hi * (x^(512-32) mod P)
 * (constants bit-reflected and shifted, as the reflected product needs);
 * the four are then folded into one with the 128-bit constants, any whole
 * 16-byte blocks left are folded in one by one, the 128 bits are reduced to
 * 64 then 32 bits, and a Barrett reduction by P gives the remainder. Bytes
 * after the last whole block go through zlib. The constants are
 * x^k mod P for the k each step needs, for P = 0x104C11DB7. */
#include "crc32.h"

#include <zlib.h>

static uint32_t plain(uint32_t crc, const void *buf, size_t len) {
    return (uint32_t)crc32_z(crc, (const Bytef *)buf, len);
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define FOLD_TARGET __attribute__((target("pclmul,sse4.1")))

/* Each fold carries a 128-bit accumulator D bits forward: its low half times
 * x^(D+32) mod P, its high half times x^(D-32) mod P (bit-reflected, shifted
 * left once, as the reflected product needs). */
#define K_2048 0x11542778aULL, 0x1322d1430ULL
#define K_512 0x154442bd4ULL, 0x1c6e41596ULL
#define K_384 0x03db1ecdcULL, 0x174359406ULL
#define K_256 0x0f1da05aaULL, 0x15a546366ULL
#define K_128 0x1751997d0ULL, 0x0ccaa009eULL
/* x^64 mod P (64 -> 32 bits) */
#define K5 0x163cd6124ULL
/* P itself and floor(x^64 / P), for the Barrett step */
#define POLY 0x1db710641ULL
#define MU 0x1f7011641ULL

#define PAIR(lo, hi) _mm_set_epi64x((long long)(hi), (long long)(lo))
#define PAIR_OF(k) PAIR_(k)
#define PAIR_(lo, hi) PAIR(lo, hi)

/* a carried forward over one step of constants k (lo, hi), plus b */
FOLD_TARGET static inline __m128i fold(__m128i a, __m128i k, __m128i b) {
    __m128i lo = _mm_clmulepi64_si128(a, k, 0x00);
    __m128i hi = _mm_clmulepi64_si128(a, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(lo, hi), b);
}

/* The accumulator a covers the bytes before p: fold in the whole 16-byte
 * blocks of [p, p+len) (len a multiple of 16), then reduce to the raw CRC. */
FOLD_TARGET static uint32_t fold_finish(__m128i a, const unsigned char *p, size_t len) {
    const __m128i k = PAIR_OF(K_128);
    for (; len >= 16; p += 16, len -= 16) a = fold(a, k, _mm_loadu_si128((const __m128i *)p));
    /* 128 -> 96 bits: the low half times x^(128-32) mod P, added to the high half */
    const __m128i low32 = _mm_set_epi32(0, -1, 0, -1);
    __m128i t = _mm_clmulepi64_si128(a, k, 0x10);
    a = _mm_xor_si128(_mm_srli_si128(a, 8), t);
    /* 96 -> 64 bits: the low 32 bits times x^64 mod P, added to the rest */
    t = _mm_srli_si128(a, 4);
    a = _mm_clmulepi64_si128(_mm_and_si128(a, low32), PAIR(K5, 0), 0x00);
    a = _mm_xor_si128(a, t);
    /* Barrett: q = (low 32 bits * mu) mod x^32, remainder = a ^ q * P */
    const __m128i pm = PAIR(POLY, MU);
    t = _mm_and_si128(_mm_clmulepi64_si128(_mm_and_si128(a, low32), pm, 0x10), low32);
    t = _mm_clmulepi64_si128(t, pm, 0x00);
    a = _mm_xor_si128(a, t);
    return (uint32_t)_mm_extract_epi32(a, 1);
}

/* The raw (pre- and post-inverted) CRC state after len bytes, len a multiple
 * of 16 and at least 64: four 128-bit accumulators, 64 bytes a step. */
FOLD_TARGET static uint32_t fold_blocks(uint32_t state, const unsigned char *p, size_t len) {
    __m128i a0 = _mm_loadu_si128((const __m128i *)p);
    __m128i a1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i a2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i a3 = _mm_loadu_si128((const __m128i *)(p + 48));
    a0 = _mm_xor_si128(a0, _mm_cvtsi32_si128((int)state));
    p += 64;
    len -= 64;
    __m128i k = PAIR_OF(K_512);
    for (; len >= 64; p += 64, len -= 64) {
        a0 = fold(a0, k, _mm_loadu_si128((const __m128i *)p));
        a1 = fold(a1, k, _mm_loadu_si128((const __m128i *)(p + 16)));
        a2 = fold(a2, k, _mm_loadu_si128((const __m128i *)(p + 32)));
        a3 = fold(a3, k, _mm_loadu_si128((const __m128i *)(p + 48)));
    }
    k = PAIR_OF(K_128);
    a0 = fold(fold(fold(a0, k, a1), k, a2), k, a3);
    return fold_finish(a0, p, len);
}

#define WIDE_TARGET __attribute__((target("pclmul,sse4.1,avx512f,avx512vl,vpclmulqdq")))

/* a carried forward over one step of constants k (each 128-bit lane on its own), plus b */
WIDE_TARGET static inline __m512i fold512(__m512i a, __m512i k, __m512i b) {
    __m512i lo = _mm512_clmulepi64_epi128(a, k, 0x00);
    __m512i hi = _mm512_clmulepi64_epi128(a, k, 0x11);
    return _mm512_ternarylogic_epi64(lo, hi, b, 0x96); /* lo ^ hi ^ b */
}

/* As fold_blocks with four 512-bit accumulators, 256 bytes a step (VPCLMULQDQ);
 * len a multiple of 16 and at least 256. */
WIDE_TARGET static uint32_t fold_blocks_wide(uint32_t state, const unsigned char *p, size_t len) {
    __m512i a0 = _mm512_loadu_si512((const void *)p);
    __m512i a1 = _mm512_loadu_si512((const void *)(p + 64));
    __m512i a2 = _mm512_loadu_si512((const void *)(p + 128));
    __m512i a3 = _mm512_loadu_si512((const void *)(p + 192));
    a0 = _mm512_xor_si512(a0, _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)state)));
    p += 256;
    len -= 256;
    __m512i k = _mm512_broadcast_i32x4(PAIR_OF(K_2048));
    for (; len >= 256; p += 256, len -= 256) {
        a0 = fold512(a0, k, _mm512_loadu_si512((const void *)p));
        a1 = fold512(a1, k, _mm512_loadu_si512((const void *)(p + 64)));
        a2 = fold512(a2, k, _mm512_loadu_si512((const void *)(p + 128)));
        a3 = fold512(a3, k, _mm512_loadu_si512((const void *)(p + 192)));
    }
    k = _mm512_broadcast_i32x4(PAIR_OF(K_512));
    a0 = fold512(fold512(fold512(a0, k, a1), k, a2), k, a3);
    /* the four lanes of a0 into one: lane i is carried (3 - i) * 128 bits forward */
    __m128i x = _mm512_extracti32x4_epi32(a0, 3);
    x = fold(_mm512_extracti32x4_epi32(a0, 2), PAIR_OF(K_128), x);
    x = fold(_mm512_extracti32x4_epi32(a0, 1), PAIR_OF(K_256), x);
    x = fold(_mm512_castsi512_si128(a0), PAIR_OF(K_384), x);
    return fold_finish(x, p, len);
}

static int folds = -1; /* -1: not probed yet; else 0, 1 (128-bit) or 2 (512-bit) */

int tf_crc32_folds(void) {
    int f = __atomic_load_n(&folds, __ATOMIC_RELAXED);
    if (f < 0) {
        __builtin_cpu_init();
        f = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
        if (f && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("vpclmulqdq"))
            f = 2;
        __atomic_store_n(&folds, f, __ATOMIC_RELAXED);
    }
    return f;
}

uint32_t tf_crc32_using(int fold, uint32_t crc, const void *buf, size_t len) {
    const unsigned char *p = buf;
    if (len >= 256 && fold > 0) {
        int f = tf_crc32_folds();
        if (fold < f) f = fold;
        if (f > 0) {
            size_t bulk = len & ~(size_t)15;
            crc = ~(f == 2 && len >= 1024 ? fold_blocks_wide(~crc, p, bulk) : fold_blocks(~crc, p, bulk));
            p += bulk;
            len -= bulk;
        }
    }
    return plain(crc, p, len);
}

uint32_t tf_crc32(uint32_t crc, const void *buf, size_t len) {
    return tf_crc32_using(2, crc, buf, len);
}

#else

int tf_crc32_folds(void) {
    return 0;
}

uint32_t tf_crc32_using(int fold, uint32_t crc, const void *buf, size_t len) {
    (void)fold;
    return plain(crc, buf, len);
}

uint32_t tf_crc32(uint32_t crc, const void *buf, size_t len) {
    return plain(crc, buf, len);
}

#endif
