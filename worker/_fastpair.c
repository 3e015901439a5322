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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

#define PAIR_ROWS(NAME, TYPE, WIDEN)                                                                  \
    static void NAME(const TYPE *b, const TYPE *t, int64_t rows, int64_t cols, const double *taus,     \
                     int64_t n_taus, int relative, int want_map, const int64_t *row_bin,               \
                     const int64_t *col_bin, int64_t slot_offset, int64_t top_slot, int64_t *hist_abs, \
                     int64_t *hist_rel, int64_t *changed, double *moments, double *max_abs,            \
                     int64_t *row_counts, int64_t *col_counts, int64_t *grid, int64_t grid_cols) {     \
        double sq_d = 0, sq_b = 0, sum_a = 0, top = *max_abs, tau0 = taus[0];                          \
        int64_t zeros = 0;                                                                             \
        for (int64_t r = 0; r < rows; r++) {                                                           \
            const TYPE *br = b + r * cols, *tr = t + r * cols;                                          \
            int64_t *g = grid + (want_map ? row_bin[r] * grid_cols : 0), in_row = 0;                   \
            double s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                     \
            int64_t j = 0;                                                                             \
            for (; j + 4 <= cols; j += 4) {                                                            \
                double x0 = WIDEN(br[j]), x1 = WIDEN(br[j + 1]), x2 = WIDEN(br[j + 2]), x3 = WIDEN(br[j + 3]); \
                s0 += x0 * x0; s1 += x1 * x1; s2 += x2 * x2; s3 += x3 * x3;                            \
            }                                                                                          \
            for (; j < cols; j++) { double x = WIDEN(br[j]); s0 += x * x; }                            \
            sq_b += (s0 + s1) + (s2 + s3);                                                             \
            for (j = 0; j < cols; j++) {                                                               \
                double base = WIDEN(br[j]), d = WIDEN(tr[j]) - base;                                   \
                if (d == 0.0) { zeros++; continue; }                                                   \
                double a = __builtin_fabs(d), ab = __builtin_fabs(base); /* fabs: |-0.0| = +0.0 */    \
                sq_d += d * d;                                                                         \
                sum_a += a;                                                                            \
                if (a > top) top = a;                                                                  \
                for (int64_t k = 0; k < n_taus; k++) {                                                 \
                    changed[k] += a > taus[k];                                                         \
                    changed[n_taus + k] += a > taus[k] * ab;                                           \
                }                                                                                      \
                if (want_map && (relative ? a > tau0 * ab : a > tau0)) {                               \
                    in_row++;                                                                          \
                    col_counts[j]++;                                                                   \
                    g[col_bin[j]]++;                                                                   \
                }                                                                                      \
                hist_abs[slot(a, slot_offset, top_slot)]++;                                            \
                hist_rel[slot(a / ab, slot_offset, top_slot)]++;                                       \
            }                                                                                          \
            if (want_map) row_counts[r] = in_row;                                                      \
        }                                                                                              \
        hist_abs[0] += zeros;                                                                          \
        hist_rel[0] += zeros;                                                                          \
        moments[0] += sq_d; moments[1] += sq_b; moments[2] += sum_a;                                   \
        *max_abs = top;                                                                                \
    }

#define AS_DOUBLE(x) ((double)(x))
PAIR_ROWS(pair_rows_bf16, uint16_t, from_bf16)
PAIR_ROWS(pair_rows_f32, float, AS_DOUBLE)
PAIR_ROWS(pair_rows_f64, double, AS_DOUBLE)

/* Entry point for ctypes: kind selects the element type of b and t. */
void pair_rows(int kind, const void *b, const void *t, int64_t rows, int64_t cols, const double *taus,
               int64_t n_taus, int relative, int want_map, const int64_t *row_bin, const int64_t *col_bin,
               int64_t slot_offset, int64_t top_slot, int64_t *hist_abs, int64_t *hist_rel, int64_t *changed,
               double *moments, double *max_abs, int64_t *row_counts, int64_t *col_counts, int64_t *grid,
               int64_t grid_cols) {
    if (kind == 0)
        pair_rows_bf16(b, t, rows, cols, taus, n_taus, relative, want_map, row_bin, col_bin, slot_offset, top_slot,
                       hist_abs, hist_rel, changed, moments, max_abs, row_counts, col_counts, grid, grid_cols);
    else if (kind == 1)
        pair_rows_f32(b, t, rows, cols, taus, n_taus, relative, want_map, row_bin, col_bin, slot_offset, top_slot,
                      hist_abs, hist_rel, changed, moments, max_abs, row_counts, col_counts, grid, grid_cols);
    else
        pair_rows_f64(b, t, rows, cols, taus, n_taus, relative, want_map, row_bin, col_bin, slot_offset, top_slot,
                      hist_abs, hist_rel, changed, moments, max_abs, row_counts, col_counts, grid, grid_cols);
}

/* Built as an extension module only so that `pip install` compiles it; Python never calls into
 * the module itself. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpair", "deltalens pair kernel (loaded via ctypes)", -1, NULL};
PyMODINIT_FUNC PyInit__fastpair(void) { return PyModule_Create(&module); }
