/* What the one-pass kernels (_fastpair.c, _fastmask.c) share: blocks of LANES elements, vectors of
 * four doubles, and the compare of stored bits that finds the lanes a block may have moved in.
 *
 * Kinds of stored element: 0 = bfloat16 bits (uint16), 1 = float32, 2 = float64. */
#ifndef DELTALENS_LANES_H
#define DELTALENS_LANES_H
#include <stdint.h>

#define LANES 16 /* one 32-byte load of bfloat16 bits; four vectors of doubles */
#define QUARTERS (LANES / 4)
#define ALWAYS_INLINE static inline __attribute__((always_inline))

#pragma GCC diagnostic ignored "-Wpsabi" /* vector arguments only between always-inlined functions */
/* GCC/Clang vector extensions: AVX2 registers in an AVX2 build, pairs of SSE2 or NEON ones
 * elsewhere. Comparisons give -1 (true) or 0 per lane; casts between vector types of one size keep
 * the bits. */
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4i __attribute__((vector_size(32)));
typedef uint64_t v4u __attribute__((vector_size(32)));

/* Bit i set where lane i may have moved: its stored bits differ, or the base is NaN or ±Inf (all
 * exponent bits set), whose Δ is NaN even against the same bits. Every other lane has Δ = 0.
 * SSE2 (VEX-encoded in an AVX2 build) for bfloat16 and float32, plain loops otherwise. */
#define VISIT(BITS, EXPONENT)                                                                      \
    for (int i = 0; i < LANES; i++) {                                                             \
        BITS x = ((const BITS *)b)[i];                                                            \
        visit |= (uint32_t)((x != ((const BITS *)t)[i]) | ((x & (EXPONENT)) == (EXPONENT))) << i; \
    }
#if defined(__SSE2__)
#include <emmintrin.h>
/* lanes (8 of bfloat16, 4 of float32) equal and with a finite base: -1 per lane */
ALWAYS_INLINE __m128i still16(__m128i x, __m128i y) {
    const __m128i e = _mm_set1_epi16(0x7F80);
    return _mm_andnot_si128(_mm_cmpeq_epi16(_mm_and_si128(x, e), e), _mm_cmpeq_epi16(x, y));
}
ALWAYS_INLINE __m128i still32(__m128i x, __m128i y) {
    const __m128i e = _mm_set1_epi32(0x7F800000);
    return _mm_andnot_si128(_mm_cmpeq_epi32(_mm_and_si128(x, e), e), _mm_cmpeq_epi32(x, y));
}
#define LOAD(p, i) _mm_loadu_si128((const __m128i *)(p) + (i))
ALWAYS_INLINE uint32_t lanes_to_visit(int kind, const void *b, const void *t) {
    uint32_t visit = 0;
    if (kind == 0)
        return ~(uint32_t)_mm_movemask_epi8(_mm_packs_epi16(still16(LOAD(b, 0), LOAD(t, 0)),
                                                            still16(LOAD(b, 1), LOAD(t, 1)))) & 0xFFFFu;
    if (kind == 1) {
        __m128i lo = _mm_packs_epi32(still32(LOAD(b, 0), LOAD(t, 0)), still32(LOAD(b, 1), LOAD(t, 1)));
        __m128i hi = _mm_packs_epi32(still32(LOAD(b, 2), LOAD(t, 2)), still32(LOAD(b, 3), LOAD(t, 3)));
        return ~(uint32_t)_mm_movemask_epi8(_mm_packs_epi16(lo, hi)) & 0xFFFFu;
    }
    VISIT(uint64_t, 0x7FF0000000000000ull)
    return visit;
}
#else
ALWAYS_INLINE uint32_t lanes_to_visit(int kind, const void *b, const void *t) {
    uint32_t visit = 0;
    if (kind == 0)
        VISIT(uint16_t, 0x7F80u)
    else if (kind == 1)
        VISIT(uint32_t, 0x7F800000u)
    else
        VISIT(uint64_t, 0x7FF0000000000000ull)
    return visit;
}
#endif
#endif
