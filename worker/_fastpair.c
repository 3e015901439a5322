/* One-pass CPU kernel for `pair`: every per-element figure of a block of rows in a single sweep.
 *
 * Called through ctypes (worker/fused.py), which releases the GIL, so Python threads run one
 * call per row partition in parallel. Arithmetic is float64 throughout, with no reassociation
 * and no FMA contraction (-ffp-contract=off): counts equal the torch kernel's and a float64
 * NumPy reference's to the last weight.
 *
 * Inputs: b, t hold `rows` rows of `cols` contiguous elements of one kind: 0 = bfloat16 bits
 * (uint16), 1 = float32, 2 = float64. Accumulators are this partition's own (no sharing):
 *   hist_abs, hist_rel  fine histogram slots (see worker/contract.py), |Δ| and |Δ|/|b|
 *   changed             [2][n_taus]: |Δ| > τ, |Δ| > τ·|b|
 *   moments             ΣΔ², Σb², Σ|Δ|;  max_abs: max |Δ|
 *   row_counts[rows], col_counts[cols], grid[grid_rows][grid_cols]: update map at taus[0]
 *   ulp_hist            |Δ| in ULPs of the base's stored dtype (ulp_p mantissa bits, ulp_emin its
 *                       smallest normal exponent; ulp_p < 0: not counted), bins of contract.ULP_EDGES
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_TAUS 16  /* the API and CLI accept at most 16 tolerances */

static inline double from_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return (double)f;
}

static inline int64_t slot(double x, int64_t offset, int64_t top) {
    int64_t bits;
    memcpy(&bits, &x, sizeof bits);
    int64_t c = ((bits - 1) >> 45) - offset;
    return c < 1 ? 1 : (c > top ? top : c);
}

/* 2^n for -1022 <= n <= 1023, from its bits */
static inline double pow2(int64_t n) {
    uint64_t bits = (uint64_t)(n + 1023) << 52;
    double x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* ULP bin of a change a > 0 at base value `base` (contract.ULP_EDGES): u = a / ulp(base) with
 * ulp(base) = 2^(max(e, emin) - p), e the exponent of |base| (its float64 exponent field, so zero and
 * subnormals clamp to emin). u = a * 2^k is exact: two power-of-two factors, each in range, no
 * division. Bins 1..16: u in (k-1, k]; then octaves (2^j, 2^(j+1)] for j = 4..63; then above 2^64. */
#define ULP_EXACT 16
#define ULP_TOP_OCTAVE 64
static inline int64_t ulp_slot(double a, double base, int64_t p, int64_t emin) {
    uint64_t bits;
    memcpy(&bits, &base, sizeof bits);
    int64_t e = (int64_t)((bits >> 52) & 0x7FF) - 1023;
    int64_t k = p - (e > emin ? e : emin), h = k / 2;
    double u = a * pow2(h) * pow2(k - h);
    if (u <= ULP_EXACT) {
        int64_t c = (int64_t)u;
        return c + ((double)c < u);
    }
    memcpy(&bits, &u, sizeof bits);
    int64_t j = (int64_t)((bits - 1) >> 52) - 1023; /* u in (2^j, 2^(j+1)] */
    return j >= ULP_TOP_OCTAVE ? ULP_EXACT + ULP_TOP_OCTAVE - 3 : j + ULP_EXACT - 3;
}

/* Elements are visited in blocks of 16: one vectorised bit comparison finds the stored values
 * that differ, and only those are processed (lowest index first, so every sum keeps the order
 * of a plain element loop). Equal bits mean Δ = 0; differing bits can still give Δ = 0 (+0 vs
 * -0), which the element step counts as a zero. NaN/Inf inputs are refused by the caller (Σb²
 * and ΣΔ² turn non-finite), so equal NaN bits need no special case. */
#define BLOCK 16
/* Bit i set where element i of the 16 differs. */
#define DIFFERING(NAME, BITS)                                                                         \
    static inline uint32_t NAME(const BITS *b, const BITS *t) {                                        \
        uint32_t diff = 0;                                                                             \
        for (int i = 0; i < BLOCK; i++) diff |= (uint32_t)(b[i] != t[i]) << i;                         \
        return diff;                                                                                   \
    }
#if defined(__SSE2__)
#include <emmintrin.h>
/* bfloat16 (the common case): two 8-lane compares, packed to bytes, one movemask */
static inline uint32_t differing_u16(const uint16_t *b, const uint16_t *t) {
    __m128i lo = _mm_cmpeq_epi16(_mm_loadu_si128((const __m128i *)b), _mm_loadu_si128((const __m128i *)t));
    __m128i hi = _mm_cmpeq_epi16(_mm_loadu_si128((const __m128i *)(b + 8)), _mm_loadu_si128((const __m128i *)(t + 8)));
    return ~(uint32_t)_mm_movemask_epi8(_mm_packs_epi16(lo, hi)) & 0xFFFFu;
}
#else
DIFFERING(differing_u16, uint16_t)
#endif
DIFFERING(differing_u32, uint32_t)
DIFFERING(differing_u64, uint64_t)

#define PAIR_ROWS(NAME, TYPE, BITS, WIDEN, differing)                                                 \
    __attribute__((target_clones("avx2", "default")))                                                  \
    static void NAME(const TYPE *restrict b, const TYPE *restrict t, int64_t rows, int64_t cols,       \
                     const double *taus, int64_t n_taus, int relative, int want_map,                   \
                     const int64_t *row_bin, const int64_t *col_bin, int64_t slot_offset,              \
                     int64_t top_slot, int64_t *restrict hist_abs, int64_t *restrict hist_rel,         \
                     int64_t *changed, double *moments, double *max_abs, int64_t *row_counts,          \
                     int64_t *restrict col_counts, int64_t *restrict grid, int64_t grid_cols,          \
                     int64_t ulp_p, int64_t ulp_emin, int64_t *restrict ulp_hist) {                    \
        double sq_d = 0, sq_b = 0, sum_a = 0, top = *max_abs, tau0 = taus[0];                          \
        double tau[MAX_TAUS];                                                                          \
        int64_t ch_abs[MAX_TAUS] = {0}, ch_rel[MAX_TAUS] = {0}, moved = 0;                             \
        for (int64_t k = 0; k < n_taus; k++) tau[k] = taus[k];                                         \
        for (int64_t r = 0; r < rows; r++) {                                                           \
            const TYPE *br = b + r * cols, *tr = t + r * cols;                                          \
            const BITS *bb = (const BITS *)br, *tb = (const BITS *)tr;                                  \
            int64_t *g = grid + (want_map ? row_bin[r] * grid_cols : 0), in_row = 0;                   \
            double s[BLOCK] = {0}; /* Σb² in one partial sum per lane: vectorised, read once */          \
            for (int64_t j0 = 0; j0 < cols; j0 += BLOCK) {                                             \
                int64_t n = cols - j0 < BLOCK ? cols - j0 : BLOCK;                                     \
                uint32_t diff = 0;                                                                     \
                if (n == BLOCK) {                                                                      \
                    for (int i = 0; i < BLOCK; i++) {                                                  \
                        double x = WIDEN(br[j0 + i]);                                                  \
                        s[i] += x * x;                                                                 \
                    }                                                                                  \
                    diff = differing(bb + j0, tb + j0);                                                \
                } else {                                                                               \
                    for (int i = 0; i < n; i++) {                                                      \
                        double x = WIDEN(br[j0 + i]);                                                  \
                        s[i] += x * x;                                                                 \
                        diff |= (uint32_t)(bb[j0 + i] != tb[j0 + i]) << i;                             \
                    }                                                                                  \
                }                                                                                      \
                while (diff) {                                                                         \
                    int64_t j = j0 + __builtin_ctz(diff);                                              \
                    diff &= diff - 1;                                                                  \
                    double base = WIDEN(br[j]), d = WIDEN(tr[j]) - base;                               \
                    if (d == 0.0) continue; /* +0 vs -0 */                                             \
                    double a = __builtin_fabs(d), ab = __builtin_fabs(base); /* fabs: |-0.0| = +0.0 */ \
                    moved++;                                                                           \
                    sq_d += d * d;                                                                     \
                    sum_a += a;                                                                        \
                    if (a > top) top = a;                                                              \
                    for (int64_t k = 0; k < n_taus; k++) {                                             \
                        ch_abs[k] += a > tau[k];                                                       \
                        ch_rel[k] += a > tau[k] * ab;                                                  \
                    }                                                                                  \
                    if (want_map && (relative ? a > tau0 * ab : a > tau0)) {                           \
                        in_row++;                                                                      \
                        col_counts[j]++;                                                               \
                        g[col_bin[j]]++;                                                               \
                    }                                                                                  \
                    hist_abs[slot(a, slot_offset, top_slot)]++;                                        \
                    hist_rel[slot(a / ab, slot_offset, top_slot)]++;                                   \
                    if (ulp_p >= 0) ulp_hist[ulp_slot(a, base, ulp_p, ulp_emin)]++;                    \
                }                                                                                      \
            }                                                                                          \
            for (int w = BLOCK / 2; w > 0; w /= 2)                                                     \
                for (int i = 0; i < w; i++) s[i] += s[i + w];                                          \
            sq_b += s[0];                                                                              \
            if (want_map) row_counts[r] = in_row;                                                      \
        }                                                                                              \
        hist_abs[0] += rows * cols - moved;                                                            \
        hist_rel[0] += rows * cols - moved;                                                            \
        if (ulp_p >= 0) ulp_hist[0] += rows * cols - moved;                                            \
        for (int64_t k = 0; k < n_taus; k++) { changed[k] += ch_abs[k]; changed[n_taus + k] += ch_rel[k]; } \
        moments[0] += sq_d; moments[1] += sq_b; moments[2] += sum_a;                                   \
        *max_abs = top;                                                                                \
    }

#define AS_DOUBLE(x) ((double)(x))
PAIR_ROWS(pair_rows_bf16, uint16_t, uint16_t, from_bf16, differing_u16)
PAIR_ROWS(pair_rows_f32, float, uint32_t, AS_DOUBLE, differing_u32)
PAIR_ROWS(pair_rows_f64, double, uint64_t, AS_DOUBLE, differing_u64)

/* Entry point for ctypes: kind selects the element type of b and t. */
void pair_rows(int kind, const void *b, const void *t, int64_t rows, int64_t cols, const double *taus,
               int64_t n_taus, int relative, int want_map, const int64_t *row_bin, const int64_t *col_bin,
               int64_t slot_offset, int64_t top_slot, int64_t *hist_abs, int64_t *hist_rel, int64_t *changed,
               double *moments, double *max_abs, int64_t *row_counts, int64_t *col_counts, int64_t *grid,
               int64_t grid_cols, int64_t ulp_p, int64_t ulp_emin, int64_t *ulp_hist) {
    if (kind == 0)
        pair_rows_bf16(b, t, rows, cols, taus, n_taus, relative, want_map, row_bin, col_bin, slot_offset, top_slot,
                       hist_abs, hist_rel, changed, moments, max_abs, row_counts, col_counts, grid, grid_cols,
                      ulp_p, ulp_emin, ulp_hist);
    else if (kind == 1)
        pair_rows_f32(b, t, rows, cols, taus, n_taus, relative, want_map, row_bin, col_bin, slot_offset, top_slot,
                      hist_abs, hist_rel, changed, moments, max_abs, row_counts, col_counts, grid, grid_cols,
                      ulp_p, ulp_emin, ulp_hist);
    else
        pair_rows_f64(b, t, rows, cols, taus, n_taus, relative, want_map, row_bin, col_bin, slot_offset, top_slot,
                      hist_abs, hist_rel, changed, moments, max_abs, row_counts, col_counts, grid, grid_cols,
                      ulp_p, ulp_emin, ulp_hist);
}

/* Built as an extension module only so that `pip install` compiles it; Python never calls into
 * the module itself. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpair", "deltalens pair kernel (loaded via ctypes)", -1, NULL};
PyMODINIT_FUNC PyInit__fastpair(void) { return PyModule_Create(&module); }
