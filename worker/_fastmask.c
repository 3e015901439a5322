/* One-pass CPU kernel for `series` and `overlap`: the masks of R runs against one base, in one sweep.
 *
 * Called through ctypes (worker/fused_masks.py), which releases the GIL, so Python threads run one
 * call per slice of a chunk in parallel. Same float64 arithmetic as worker.kernels.MaskAccumulator
 * (Δ = t − b, mask |Δ| > τ or |Δ| > τ·|b|; no FMA contraction, -ffp-contract=off): identical counts.
 *
 * Inputs: b and runs[k] (k < R) hold n contiguous elements of one kind: 0 = bfloat16 bits (uint16),
 * 1 = float32 (float32 or widened float16 values), 2 = float64. Accumulators are this call's own and
 * are added to (the record of MaskAccumulator.result()):
 *   overlap: patterns[2^R]   elements per membership code Σ_k M_k << k
 *            same_sign[R][R] |M_i ∧ M_j ∧ (Δ_i > 0) = (Δ_j > 0)|
 *   series:  steps[R][2]     |M_k|, |M_k ∧ ¬M_final|;  union_[2]: |∪M|, |∪M ∧ ¬M_final|
 *            first[2][R+1]   per [in M_final][first step in a mask] (R: never)
 *   both:    sq_delta[R] ΣΔ_k², sq_base Σb²
 *
 * Elements go in blocks of LANES = 16. Per run, one compare of the stored bits finds the lanes that
 * may have moved (bits differ, or the base is NaN/±Inf, whose Δ is NaN even against equal bits); a
 * run with none costs nothing more (its lanes have Δ = 0: in no mask, adding 0 to ΣΔ²). Otherwise
 * its Δ, ΣΔ² and 16 mask and sign bits come from branch-free vector code. Series counts are
 * popcounts of those masks; overlap codes are built 16 lanes at a time and counted for the lanes
 * in some mask. Lanes never counted are in no mask: patterns[0] and
 * first[0][R] are n minus the rest. Σb² runs over every element. Sums are kept per lane and added
 * up at the end (a fixed order, not a plain element loop's: compared with a tolerance).
 *
 * NaN/±Inf as in the torch kernel: a NaN Δ is in no mask and not > 0, and makes ΣΔ² NaN; the caller
 * refuses non-finite sums.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_lanes.h"

/* the narrow vectors a block is widened from (v4d and v4i: _lanes.h) */
typedef float v4f __attribute__((vector_size(16)));
typedef uint32_t v4u32 __attribute__((vector_size(16)));
typedef uint16_t v4u16 __attribute__((vector_size(8)));
typedef union { /* LANES float64 values */
    v4d v[QUARTERS];
    double e[LANES];
} Block;

/* The LANES elements at p of kind 0/1/2 widened to float64 (exact). */
ALWAYS_INLINE void widen(int kind, const void *p, Block *out) {
    for (int q = 0; q < QUARTERS; q++) {
        if (kind == 0) { /* bfloat16 bits are the high half of float32 bits */
            v4u16 h;
            memcpy(&h, (const uint16_t *)p + 4 * q, sizeof h);
            out->v[q] = __builtin_convertvector((v4f)(__builtin_convertvector(h, v4u32) << 16), v4d);
        } else if (kind == 1) {
            v4f f;
            memcpy(&f, (const float *)p + 4 * q, sizeof f);
            out->v[q] = __builtin_convertvector(f, v4d);
        } else
            memcpy(&out->v[q], (const double *)p + 4 * q, sizeof(v4d));
    }
}

/* One run's block against the base's (x; thr: the mask's threshold per lane): ΣΔ² per lane into sq,
 * the mask bits (|Δ| > thr) and the sign bits (Δ > 0). */
ALWAYS_INLINE void run_bits(const Block *x, const Block *thr, const Block *y, v4d *sq, uint32_t *mask,
                            uint32_t *up) {
    const v4i abs_bits = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
    v4i m = {0, 0, 0, 0}, u = m;
    for (int q = 0; q < QUARTERS; q++) {
        const v4i bit = {1LL << 4 * q, 2LL << 4 * q, 4LL << 4 * q, 8LL << 4 * q};
        v4d d = y->v[q] - x->v[q];
        sq[q] += d * d;
        m |= ((v4d)((v4i)d & abs_bits) > thr->v[q]) & bit;
        u |= (d > 0) & bit;
    }
    *mask = (uint32_t)((m[0] | m[1]) | (m[2] | m[3]));
    *up = (uint32_t)((u[0] | u[1]) | (u[2] | u[3]));
}

#if defined(__SSE2__)
/* overlap: each lane's membership code, bit k set when the lane is in mask k */
ALWAYS_INLINE void codes_of(const uint32_t *masks, int64_t R, uint16_t *codes) {
    const __m128i lo = _mm_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128);
    const __m128i hi = _mm_slli_epi16(lo, 8);
    __m128i c0 = _mm_setzero_si128(), c1 = c0;
    for (int64_t k = 0; k < R; k++) {
        __m128i m = _mm_set1_epi16((short)masks[k]), bit = _mm_set1_epi16((short)(1 << k));
        c0 = _mm_or_si128(c0, _mm_and_si128(_mm_cmpeq_epi16(_mm_and_si128(m, lo), lo), bit));
        c1 = _mm_or_si128(c1, _mm_and_si128(_mm_cmpeq_epi16(_mm_and_si128(m, hi), hi), bit));
    }
    _mm_storeu_si128((__m128i *)codes, c0);
    _mm_storeu_si128((__m128i *)codes + 1, c1);
}
#else
ALWAYS_INLINE void codes_of(const uint32_t *masks, int64_t R, uint16_t *codes) {
    for (int i = 0; i < LANES; i++) {
        uint16_t code = 0;
        for (int64_t k = 0; k < R; k++) code |= ((masks[k] >> i) & 1u) << k;
        codes[i] = code;
    }
}
#endif

typedef struct { /* the ctypes arguments (see the header) */
    const void *b;
    const void *const *runs;
    int64_t n_runs, n;
    double tau;
    int relative, series;
    int64_t *patterns, *same_sign, *steps, *union_, *first;
    double *sq_delta, *sq_base;
} Call;

typedef struct {           /* a call's scratch, on the heap: it grows with R */
    v4d *sq;               /* [R][QUARTERS] ΣΔ² per run and lane */
    uint32_t *masks, *ups; /* [R] one block's mask and sign bits */
    int64_t *hist;         /* overlap: [2^R][4] patterns, one counter per lane mod 4 (neighbours that
                              share a code do not wait for each other's increments) */
} Work;

ALWAYS_INLINE double sum4(v4d s) { return (s[0] + s[2]) + (s[1] + s[3]); }

ALWAYS_INLINE void mask_impl(int kind, const Call *call, const Work *w) {
    const Call c = *call;
    const int size = kind == 0 ? 2 : kind == 1 ? 4 : 8;
    const int64_t R = c.n_runs, T1 = R + 1;
    v4d *sq = w->sq;
    uint32_t *masks = w->masks, *ups = w->ups;
    int64_t *hist = w->hist;
    const v4d tau = {c.tau, c.tau, c.tau, c.tau};
    v4d sq_b = {0, 0, 0, 0};
    int64_t touched = 0, counted = 0; /* series: lanes in some mask; overlap: lanes given a code */
    for (int64_t j0 = 0; j0 < c.n; j0 += LANES) {
        const char *bp = (const char *)c.b + j0 * size;
        uint64_t pad_b[LANES], pad_t[LANES];
        int tail = c.n - j0 < LANES;
        if (tail) { /* zero-padded: padding lanes are equal zeros, in no mask */
            memset(pad_b, 0, sizeof pad_b);
            memcpy(pad_b, bp, (c.n - j0) * size);
            bp = (const char *)pad_b;
        }
        Block x, thr, y;
        widen(kind, bp, &x);
        for (int q = 0; q < QUARTERS; q++) {
            v4d v = x.v[q];
            sq_b += v * v;
            thr.v[q] = c.relative ? tau * (v4d)((v4i)v & INT64_MAX) : tau;
        }
        uint32_t any = 0;
        for (int64_t k = 0; k < R; k++) {
            const char *tp = (const char *)c.runs[k] + j0 * size;
            if (tail) {
                memset(pad_t, 0, sizeof pad_t);
                memcpy(pad_t, tp, (c.n - j0) * size);
                tp = (const char *)pad_t;
            }
            masks[k] = ups[k] = 0;
            if (lanes_to_visit(kind, bp, tp)) {
                widen(kind, tp, &y);
                run_bits(&x, &thr, &y, sq + k * QUARTERS, masks + k, ups + k);
            }
            any |= masks[k];
        }
        if (!any) continue;
        if (c.series) {
            uint32_t final = masks[R - 1], seen = 0;
            for (int64_t k = 0; k < R; k++) {
                uint32_t m = masks[k], fresh = m & ~seen;
                seen |= m;
                c.steps[2 * k] += __builtin_popcount(m);
                c.steps[2 * k + 1] += __builtin_popcount(m & ~final);
                c.first[k] += __builtin_popcount(fresh & ~final);
                c.first[T1 + k] += __builtin_popcount(fresh & final);
            }
            c.union_[0] += __builtin_popcount(seen);
            c.union_[1] += __builtin_popcount(seen & ~final);
            touched += __builtin_popcount(seen);
            continue;
        }
        uint16_t codes[LANES];
        codes_of(masks, R, codes);
        for (uint32_t lanes = any; lanes; lanes &= lanes - 1) { /* the lanes in some mask (never padding) */
            int i = __builtin_ctz(lanes);
            hist[(int64_t)codes[i] << 2 | (i & 3)]++;
        }
        counted += __builtin_popcount(any);
        for (int64_t i = 0; i < R; i++)
            for (int64_t j = i; j < R; j++) {
                int64_t both = __builtin_popcount(masks[i] & masks[j] & ~(ups[i] ^ ups[j]));
                c.same_sign[i * R + j] += both;
                if (i != j) c.same_sign[j * R + i] += both;
            }
    }
    if (c.series)
        c.first[R] += c.n - touched; /* in no mask, so not in the final one */
    else {
        for (int64_t code = 0; code < (int64_t)1 << R; code++) {
            const int64_t *h = hist + 4 * code;
            c.patterns[code] += (h[0] + h[1]) + (h[2] + h[3]);
        }
        c.patterns[0] += c.n - counted;
    }
    for (int64_t k = 0; k < R; k++) {
        const v4d *s = sq + k * QUARTERS;
        c.sq_delta[k] += sum4((s[0] + s[1]) + (s[2] + s[3]));
    }
    *c.sq_base += sum4(sq_b);
}

/* One kernel per element kind, each built twice on x86-64 (AVX2 and baseline), picked at load time. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif
CLONES static void mask_bf16(const Call *c, const Work *w) { mask_impl(0, c, w); }
CLONES static void mask_f32(const Call *c, const Work *w) { mask_impl(1, c, w); }
CLONES static void mask_f64(const Call *c, const Work *w) { mask_impl(2, c, w); }
static void (*const by_kind[])(const Call *, const Work *) = {mask_bf16, mask_f32, mask_f64};

/* Entry point for ctypes; returns 0, or -1 when out of memory (nothing counted). */
int mask_rows(int kind, const void *b, const void *const *runs, int64_t n_runs, int64_t n, double tau,
              int relative, int series, int64_t *patterns, int64_t *same_sign, int64_t *steps,
              int64_t *union_, int64_t *first, double *sq_delta, double *sq_base) {
    Call c = {b,        runs,      n_runs, n,      tau,   relative, series,
              patterns, same_sign, steps,  union_, first, sq_delta, sq_base};
    size_t R = (size_t)n_runs;
    Work w = {aligned_alloc(sizeof(v4d), R * sizeof(v4d) * QUARTERS), malloc(2 * R * sizeof(uint32_t)), NULL,
              calloc(series ? 4 : (size_t)4 << R, sizeof(int64_t))};
    int ok = w.sq && w.masks && w.hist;
    if (ok) {
        memset(w.sq, 0, R * sizeof(v4d) * QUARTERS);
        w.ups = w.masks + R;
        by_kind[kind](&c, &w);
    }
    free(w.sq);
    free(w.masks);
    free(w.hist);
    return ok ? 0 : -1;
}

/* Built as an extension module only so that `pip install` compiles it; Python never calls into
 * the module itself. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastmask", "deltalens mask kernel (loaded via ctypes)", -1, NULL};
PyMODINIT_FUNC PyInit__fastmask(void) { return PyModule_Create(&module); }
