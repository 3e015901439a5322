/* One-pass CPU kernel for `pair`: every per-element figure of a block of rows in a single sweep.
 *
 * Called through ctypes (worker/fused.py), which releases the GIL, so Python threads run one
 * call per row partition in parallel. Arithmetic is float64 throughout, with no reassociation
 * and no FMA contraction (-ffp-contract=off): counts equal the torch kernel's and a float64
 * NumPy reference's to the last weight.
 *
 * Inputs: b, t hold `rows` rows of `cols` contiguous elements of one kind: 0 = bfloat16 bits
 * (uint16), 1 = float32 (float32 or widened float16 values), 2 = float64. Accumulators are this
 * partition's own (no sharing):
 *   hist_abs, hist_rel  fine histogram slots (see worker/contract.py), |Δ| and |Δ|/|b|
 *   changed             [2][n_taus]: |Δ| > τ, |Δ| > τ·|b|
 *   moments             ΣΔ², Σb², Σ|Δ|;  max_abs: max |Δ|
 *   row_counts[rows], col_counts[cols], grid[grid_rows][grid_cols]: update map at taus[0]
 *   ulp_hist            |Δ| in ULPs of the base's stored dtype (ulp_p mantissa bits, ulp_emin its
 *                       smallest normal exponent; ulp_p < 0: not counted), bins of contract.ULP_EDGES
 *
 * How it stays fast at any share of moved weights: elements go in blocks of LANES = 16.
 *  - A block whose stored bits are all equal (one vector compare) costs Σb² only.
 *  - Otherwise every sum, count and maximum (ΣΔ², Σ|Δ|, max, the counts at every τ in both modes,
 *    the update map's row and column sums) is computed for all 16 lanes at once, branch-free, in
 *    vector code: lanes that did not move have Δ = 0, which adds nothing and exceeds no τ ≥ 0.
 *  - Histograms: a block whose 16 lanes all moved is counted at once; the moved lanes of other
 *    blocks are gathered on a stage (|Δ| and b) and counted 16 at a time. Counting 16 lanes: their
 *    three slots by a loop the compiler vectorises, from float bits (fine cells as bits >> 45, the
 *    ULP bin from the cell of |Δ| shifted by the base's exponent and one table; no log, no
 *    division but |Δ|/|b|), then three scalar increments per lane in an unrolled run. So slot
 *    work is per moved weight, never per weight. A partly moved block's lanes go to the stage
 *    four at a time, branch-free (one shuffle per vector, from a table of the 16 ways to pick
 *    lanes), where AVX2 and GCC's variable shuffles are at hand; else one by one.
 * Sums are kept per lane and added up at the end (a fixed order, not a plain element loop's: the
 * moments are float sums, compared to the reference with a tolerance; every count is exact).
 *
 * NaN and ±Inf (which the caller refuses afterwards, from the non-finite moments) are counted as
 * the torch kernel and the float64 reference count them, and never index outside a table: a base
 * NaN or ±Inf counts as moved even where the target holds the same bits (Δ = Inf − Inf or NaN − NaN
 * is NaN); |Δ| and |Δ|/|b| that are NaN or +Inf land in the top fine slot and the top ULP bin; a
 * NaN |Δ| makes max |Δ| NaN; comparisons with NaN are false, so no τ counts it.
 *
 * Vector code: GCC/Clang vector extensions (four doubles per vector) and plain loops the compiler
 * vectorises, whichever it compiles better; AVX2 registers in the AVX2 build of each kernel (picked
 * per call by __builtin_cpu_supports), SSE2 or NEON ones elsewhere. bench/density.py measures it
 * at 10 %, 50 % and 100 % moved.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_lanes.h"

#define MAX_TAUS 16 /* the API and CLI accept at most 16 tolerances */
#define STAGE (16 * LANES) /* moved lanes gathered before their slots are computed */
#define ULP_EXACT 16
#define ULP_TOP_OCTAVE 64
#define ULP_BINS (ULP_EXACT + ULP_TOP_OCTAVE - 2) /* contract.ULP_BINS */
#define CELL_SHIFT 45 /* float64 bits -> bfloat16-grid cell */
#define SPLAT(T, x) ((T){(x), (x), (x), (x)})

/* Comparisons give -1 (true) or 0 per lane; casts between vector types of one size keep the bits. */
ALWAYS_INLINE v4i pick(v4i mask, v4i yes, v4i no) { return (mask & yes) | (~mask & no); }
ALWAYS_INLINE v4d fabs4(v4d x) { return (v4d)((v4u)x & INT64_MAX); } /* |-0.0| = +0.0 */
ALWAYS_INLINE v4d max4(v4d a, v4d b) { return (v4d)pick(a > b, (v4i)a, (v4i)b); }

ALWAYS_INLINE double from_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* The LANES elements at p of kind 0/1/2, widened to float64 (exact). A plain loop: compilers
 * vectorise it better than conversions written in vector types. */
ALWAYS_INLINE void widen(int kind, const void *p, double *out) {
    for (int i = 0; i < LANES; i++)
        out[i] = kind == 0   ? from_bf16(((const uint16_t *)p)[i])
                 : kind == 1 ? (double)((const float *)p)[i]
                             : ((const double *)p)[i];
}

ALWAYS_INLINE uint64_t bits_of(double x) {
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

ALWAYS_INLINE double from_bits(uint64_t u) {
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* The bfloat16-grid cell (lo, hi] of x > 0 (+inf included): (bits - 1) >> 45. */
ALWAYS_INLINE int64_t cell_of(double x) { return (int64_t)((bits_of(x) - 1) >> CELL_SHIFT); }

/* Fine histogram slot of x > 0 or NaN (either sign): its cell, clamped to slots [1, top] by clamping
 * x to [lo, hi] (a value in slot 1's cell, one in the top slot's); min and max of doubles are single
 * instructions. `x < hi ? x : hi` is hi for NaN: NaN goes to the top slot, as in the reference. */
ALWAYS_INLINE int64_t fine_slot(double x, double lo, double hi, int64_t offset) {
    x = x < hi ? x : hi;
    x = x < lo ? lo : x;
    return cell_of(x) - offset;
}

/* ULP bin of a change a > 0 at base value `base` (contract.ULP_EDGES): of u = a / ulp(base), where
 * ulp(base) = 2^(max(e, emin) - p), e the exponent of |base| (its float64 exponent field, so zero
 * and subnormals clamp to emin). Bins: 1..16 for u in (k-1, k], then octaves (2^j, 2^(j+1)] for
 * j = 4..63, then above 2^64. Every bin edge is on the bfloat16 grid, so u's grid cell decides its
 * bin: ulp_bins (filled at load time) maps cells to bins, from the cell of 0.5 to the cell just
 * above 2^64 (everything higher). u = a · 2^k, k = p - max(e, emin), is exact: one power-of-two
 * factor for the bfloat16, float16 and float32 kinds (a ≥ 2^-149, |k| < 160); two for float64,
 * whose changes can be subnormal (u = a · 2^h · 2^(k-h), h = floor(k/2), each factor in range;
 * +inf past the largest double). No division, no log. u is clamped to [0.5, ULP_HIGH] before its
 * cell is taken, by a min and a max of doubles: NaN (from a NaN or infinite base or target) and
 * +inf go to the top bin, u < 0.5 (only from values not of the base's format) to bin 1, as ceil(u)
 * in the torch kernel. Returns the index into ulp_bins, 1 + (cell - cell of 0.5). */
#define ULP_CELL_HALF ((0x3FE0000000000000LL - 1) >> CELL_SHIFT) /* cell of 0.5: (.., 0.5] */
#define ULP_CELL_TOP ((0x43F0000000000000LL - 1) >> CELL_SHIFT)  /* cell of 2^64: (.., 2^64] */
#define ULP_CELLS (ULP_CELL_TOP - ULP_CELL_HALF + 3)             /* [0]: a = 0, cells, above 2^64 */
#define ULP_HIGH 0x1.02p64 /* upper edge of the cell above 2^64's, the table's last entry */
static uint8_t ulp_bins[ULP_CELLS];

__attribute__((constructor)) static void fill_ulp_bins(void) {
    for (int64_t i = 1; i < ULP_CELLS; i++) {
        uint64_t hi_bits = (uint64_t)(i - 1 + ULP_CELL_HALF + 1) << CELL_SHIFT; /* the cell's upper edge */
        double hi;
        memcpy(&hi, &hi_bits, sizeof hi);
        int j = 0;
        while (j < ULP_TOP_OCTAVE && hi > 0x1p1 * (double)(1ULL << j)) j++; /* hi in (2^j, 2^(j+1)] */
        ulp_bins[i] = i == ULP_CELLS - 1 ? ULP_BINS - 1
                      : hi <= ULP_EXACT   ? (uint8_t)(hi <= 1 ? 1 : (int)hi + (hi > (int)hi))
                                          : (uint8_t)(j + ULP_EXACT - 3);
    }
}

ALWAYS_INLINE double pow2(int64_t n) { return from_bits((uint64_t)(n + 1023) << 52); } /* |n| < 1023 */

ALWAYS_INLINE int64_t ulp_index(int kind, double a, double abs_base, double min_normal, int64_t p) {
    int64_t e = (int64_t)(bits_of(abs_base > min_normal ? abs_base : min_normal) >> 52) - 1023;
    int64_t k = p - e; /* a NaN base counts as emin, an infinite one as 2^1024: a is NaN or inf there */
    double u;
    if (kind == 2) {
        int64_t h = (int64_t)((uint64_t)(k + 4096) >> 1) - 2048; /* floor(k / 2) */
        u = a * pow2(h) * pow2(k - h);
    } else
        u = a * pow2(k);
    u = u < ULP_HIGH ? u : ULP_HIGH;
    u = u < 0.5 ? 0.5 : u;
    return cell_of(u) - (ULP_CELL_HALF - 1);
}

typedef struct { /* the ctypes arguments (see the header) */
    const void *b, *t;
    int64_t rows, cols, stride; /* stride: elements from one row to the next (cols, or more in a strip) */
    const double *taus;
    int64_t n_taus;
    int relative, want_map;
    const int64_t *row_bin, *col_bin;
    int64_t slot_offset, top_slot;
    int64_t *hist_abs, *hist_rel, *changed;
    double *moments, *max_abs;
    int64_t *row_counts, *col_counts, *grid, grid_cols, ulp_p, ulp_emin;
    int64_t *ulp_hist;
    int64_t *scratch; /* the map's column sums of the rows at hand: zeroed, cols rounded up to LANES */
    int first_strip;  /* row_counts are set by the first strip of columns, added to by the others */
} Call;

typedef struct { /* running sums, one per lane of a vector (lane i: elements i mod 4) */
    v4d sq_d, sq_b, sum_a, top;
    v4i ch_abs[MAX_TAUS], ch_rel[MAX_TAUS], in_row;
} Sums;

typedef struct { /* the moved lanes waiting for their histogram slots */
    double a[STAGE + 2 * LANES], b[STAGE + 2 * LANES]; /* |Δ| and the base value; room for padding */
    int64_t n, counted;
    int64_t s_abs[LANES], s_rel[LANES], s_ulp[LANES]; /* one group's slots */
    int64_t ulp[LANES * ULP_BINS]; /* one ULP histogram per stage position mod LANES, see flush_stage */
} Stage;

ALWAYS_INLINE v4d load4(const double *p) {
    v4d v;
    memcpy(&v, p, sizeof v);
    return v;
}

typedef union { /* LANES values, as vectors and as elements */
    v4d v[QUARTERS];
    double e[LANES];
} Block;

/* Everything but the histograms for one block with a lane to visit: x its base
 * values, tp its target's stored values; |Δ| of its lanes into a. */
ALWAYS_INLINE void block_sums(int kind, const v4d *x, const void *tp, const Call *c, const v4d *tau,
                              Sums *s, int64_t *restrict col_sums, Block *a) {
    v4d d[QUARTERS], ab[QUARTERS];
    Block y;
    widen(kind, tp, y.e);
    for (int q = 0; q < QUARTERS; q++) {
        d[q] = y.v[q] - x[q];
        a->v[q] = fabs4(d[q]), ab[q] = fabs4(x[q]);
    }
    const v4d *m = a->v;
    s->sq_d += (d[0] * d[0] + d[1] * d[1]) + (d[2] * d[2] + d[3] * d[3]);
    s->sum_a += (m[0] + m[1]) + (m[2] + m[3]);
    s->top = max4(s->top, max4(max4(m[0], m[1]), max4(m[2], m[3])));
    for (int64_t k = 0; k < c->n_taus; k++) { /* a true compare is -1: counts are subtracted */
        v4d t = tau[k];
        s->ch_abs[k] -= ((m[0] > t) + (m[1] > t)) + ((m[2] > t) + (m[3] > t));
        s->ch_rel[k] -= ((m[0] > t * ab[0]) + (m[1] > t * ab[1])) + ((m[2] > t * ab[2]) + (m[3] > t * ab[3]));
    }
    if (!c->want_map) return;
    for (int q = 0; q < QUARTERS; q++) {
        v4i over = c->relative ? m[q] > tau[0] * ab[q] : m[q] > tau[0], sums;
        memcpy(&sums, col_sums + 4 * q, sizeof sums);
        sums -= over;
        memcpy(col_sums + 4 * q, &sums, sizeof sums);
        s->in_row -= over;
    }
}

/* The increments of `count` staged lanes (a full group of 16: unrolled, no branch). ULP counts go
 * to one histogram per position mod 16: most changes are a few ULPs, and increments of one counter
 * right after each other would wait for each other. */
ALWAYS_INLINE void count_group(const Call *c, Stage *st, int ulp, int64_t count) {
    /* the slots are read back from memory, one load each: left to itself the compiler extracts
     * them from vector registers, which takes more instructions */
    __asm__("" : "+m"(st->s_abs), "+m"(st->s_rel), "+m"(st->s_ulp));
#pragma GCC unroll 16
    for (int64_t i = 0; i < count; i++) {
        c->hist_abs[st->s_abs[i]]++;
        c->hist_rel[st->s_rel[i]]++;
        if (ulp) st->ulp[i * ULP_BINS + ulp_bins[st->s_ulp[i]]]++;
    }
}

/* The histogram increments of `count` <= 16 moved lanes (|Δ| in a, base values in b): their slots
 * by a loop the compiler vectorises, then the increments. A lane with Δ = 0 (differing bits, equal
 * values: +0 vs -0) counts in the zero slots; so do padding lanes (zeros), which are not counted. */
ALWAYS_INLINE void count_lanes(int kind, const Call *c, Stage *st, const double *A, const double *B,
                               int64_t count) {
    int64_t off = c->slot_offset, p = c->ulp_p;
    int ulp = p >= 0;
    double lo = from_bits((uint64_t)(off + 2) << CELL_SHIFT);
    double hi = from_bits(((uint64_t)(off + c->top_slot) << CELL_SHIFT) + 1);
    double min_normal = from_bits((uint64_t)(c->ulp_emin + 1023) << 52);
    for (int i = 0; i < LANES; i++) {
        double a = A[i], b = __builtin_fabs(B[i]);
        int64_t moved = a != 0.0 ? -1 : 0; /* x & moved: x, or 0 */
        st->s_abs[i] = fine_slot(a, lo, hi, off) & moved;
        st->s_rel[i] = fine_slot(a / b, lo, hi, off) & moved;
        if (ulp) st->s_ulp[i] = ulp_index(kind, a, b, min_normal, p) & moved;
    }
    if (count == LANES)
        count_group(c, st, ulp, LANES);
    else
        count_group(c, st, ulp, count);
    st->counted += count;
}

/* The staged lanes, 16 at a time; the stage's padding (up to 16 past n) is zeroed first. */
ALWAYS_INLINE void flush_stage(int kind, const Call *c, Stage *st) {
    int64_t n = st->n;
    for (int i = 0; i < LANES; i++) st->a[n + i] = st->b[n + i] = 0.0;
    for (int64_t g = 0; g < n; g += LANES)
        count_lanes(kind, c, st, st->a + g, st->b + g, n - g < LANES ? n - g : LANES);
    st->n = 0;
}

/* Variable shuffles: GCC's __builtin_shuffle, one vpermd in the AVX2 kernels; elsewhere (other
 * compilers, no AVX2) lanes are staged one by one. */
#if defined(__GNUC__) && !defined(__clang__)
#define SHUFFLES 1
typedef int32_t v8i __attribute__((vector_size(32)));
#define PAIR(i) 2 * (i), 2 * (i) + 1 /* the two 32-bit halves of double i */
/* compact[m]: the doubles of a vector picked by the bits of m, first and in order */
static const v8i compact[16] = {
    {PAIR(0), PAIR(1), PAIR(2), PAIR(3)}, {PAIR(0), PAIR(1), PAIR(2), PAIR(3)},
    {PAIR(1), PAIR(0), PAIR(2), PAIR(3)}, {PAIR(0), PAIR(1), PAIR(2), PAIR(3)},
    {PAIR(2), PAIR(0), PAIR(1), PAIR(3)}, {PAIR(0), PAIR(2), PAIR(1), PAIR(3)},
    {PAIR(1), PAIR(2), PAIR(0), PAIR(3)}, {PAIR(0), PAIR(1), PAIR(2), PAIR(3)},
    {PAIR(3), PAIR(0), PAIR(1), PAIR(2)}, {PAIR(0), PAIR(3), PAIR(1), PAIR(2)},
    {PAIR(1), PAIR(3), PAIR(0), PAIR(2)}, {PAIR(0), PAIR(1), PAIR(3), PAIR(2)},
    {PAIR(2), PAIR(3), PAIR(0), PAIR(1)}, {PAIR(0), PAIR(2), PAIR(3), PAIR(1)},
    {PAIR(1), PAIR(2), PAIR(3), PAIR(0)}, {PAIR(0), PAIR(1), PAIR(2), PAIR(3)}};
#else
#define SHUFFLES 0
#endif

/* The lanes to visit of a block (bit i of visit): all 16 counted at once when all are, else staged.
 * With shuffles (`shuffle`), four lanes at a time, branch-free: each vector's lanes to visit moved
 * to its front and the whole vector stored, the stage's end moved on by their number (the rest is
 * overwritten next); else one by one, a branch per lane (mispredicted about once a block). */
ALWAYS_INLINE void stage_block(int kind, int shuffle, const Call *c, Stage *st, uint32_t visit,
                               const Block *a, const Block *x) {
    if (visit == (1u << LANES) - 1) {
        count_lanes(kind, c, st, a->e, x->e, LANES);
        return;
    }
#if SHUFFLES
    if (shuffle) {
        int64_t n = st->n;
        for (int q = 0; q < QUARTERS; q++) {
            unsigned m = (visit >> (4 * q)) & 15;
            v4d pa = (v4d)__builtin_shuffle((v8i)a->v[q], compact[m]);
            v4d pb = (v4d)__builtin_shuffle((v8i)x->v[q], compact[m]);
            memcpy(st->a + n, &pa, sizeof pa), memcpy(st->b + n, &pb, sizeof pb);
            n += __builtin_popcount(m);
        }
        st->n = n;
    }
#endif
    for (; !(SHUFFLES && shuffle) && visit; visit &= visit - 1) {
        int i = __builtin_ctz(visit);
        st->a[st->n] = a->e[i], st->b[st->n] = x->e[i];
        st->n++;
    }
    if (st->n >= STAGE) flush_stage(kind, c, st);
}

/* The map rows gathered in scratch (column sums of consecutive rows of one map row) into that
 * map row's grid cells and the column sums; scratch is left zeroed. */
ALWAYS_INLINE void flush_map(const Call *c, int64_t map_row) {
    int64_t *grid = c->grid + map_row * c->grid_cols;
    for (int64_t j = 0; j < c->cols; j++) {
        c->col_counts[j] += c->scratch[j];
        grid[c->col_bin[j]] += c->scratch[j];
        c->scratch[j] = 0;
    }
}

ALWAYS_INLINE double sum4(v4d s) { return (s[0] + s[2]) + (s[1] + s[3]); }
ALWAYS_INLINE int64_t count4(v4i s) { return s[0] + s[1] + s[2] + s[3]; }

ALWAYS_INLINE void pair_impl(int kind, int shuffle, const Call *call, Stage *st) {
    Call copy = *call; /* a local: stores through its pointers cannot change its fields */
    const Call *c = &copy;
    const int size = kind == 0 ? 2 : kind == 1 ? 4 : 8;
    int64_t rows = c->rows, cols = c->cols, stride = c->stride, map_row = -1;
    if (!c->want_map) cols *= rows, rows = 1; /* no map: one flat run (a column vector has no tail per row) */
    v4d tau[MAX_TAUS];
    for (int64_t k = 0; k < c->n_taus; k++) tau[k] = SPLAT(v4d, c->taus[k]);
    Sums s;
    memset(&s, 0, sizeof s);
    s.top = SPLAT(v4d, *c->max_abs);
    st->n = st->counted = 0;
    memset(st->ulp, 0, sizeof st->ulp);
    for (int64_t r = 0; r < rows; r++) {
        if (c->want_map && c->row_bin[r] != map_row) {
            if (map_row >= 0) flush_map(c, map_row);
            map_row = c->row_bin[r];
        }
        s.in_row = SPLAT(v4i, 0);
        const char *br = (const char *)c->b + r * stride * size, *tr = (const char *)c->t + r * stride * size;
        for (int64_t j0 = 0; j0 < cols; j0 += LANES) {
            const void *bp = br + j0 * size, *tp = tr + j0 * size;
            uint64_t pad_b[LANES], pad_t[LANES];
            if (cols - j0 < LANES) { /* the row's tail, zero-padded: padding lanes are equal zeros */
                memset(pad_b, 0, sizeof pad_b), memset(pad_t, 0, sizeof pad_t);
                memcpy(pad_b, bp, (cols - j0) * size), memcpy(pad_t, tp, (cols - j0) * size);
                bp = pad_b, tp = pad_t;
            }
            Block x, a;
            widen(kind, bp, x.e);
            const v4d *xv = x.v;
            s.sq_b += (xv[0] * xv[0] + xv[1] * xv[1]) + (xv[2] * xv[2] + xv[3] * xv[3]);
            uint32_t visit = lanes_to_visit(kind, bp, tp);
            if (!visit) continue;
            block_sums(kind, xv, tp, c, tau, &s, c->scratch + j0, &a);
            stage_block(kind, shuffle, c, st, visit, &a, &x);
        }
        if (c->want_map) c->row_counts[r] = (c->first_strip ? 0 : c->row_counts[r]) + count4(s.in_row);
    }
    if (map_row >= 0) flush_map(c, map_row);
    flush_stage(kind, c, st);
    int64_t rest = rows * cols - st->counted; /* lanes not visited: Δ = 0, zero slots */
    c->hist_abs[0] += rest;
    c->hist_rel[0] += rest;
    if (c->ulp_p >= 0) {
        c->ulp_hist[0] += rest;
        for (int i = 0; i < LANES * ULP_BINS; i++) c->ulp_hist[i % ULP_BINS] += st->ulp[i];
    }
    for (int64_t k = 0; k < c->n_taus; k++) {
        c->changed[k] += count4(s.ch_abs[k]);
        c->changed[c->n_taus + k] += count4(s.ch_rel[k]);
    }
    c->moments[0] += sum4(s.sq_d);
    c->moments[1] += sum4(s.sq_b);
    double sum_a = sum4(s.sum_a);
    c->moments[2] += sum_a;
    for (int i = 0; i < 4; i++) *c->max_abs = s.top[i] > *c->max_abs ? s.top[i] : *c->max_abs;
    if (sum_a != sum_a) *c->max_abs = sum_a; /* Σ|Δ| is NaN exactly when some |Δ| is: max |Δ| is NaN */
}

/* One kernel per element kind, built twice on x86-64: for AVX2 (and with shuffles) and for the
 * baseline, picked per call (a build with -DBASELINE_ONLY tests the baseline on an AVX2 machine).
 * Each call has its own stage, on its stack (~15 KB): the caller's threads run calls side by side. */
#define KERNEL_AS(name, kind, shuffle, attributes)                                              \
    attributes static void name(const Call *c) {                                               \
        Stage st;                                                                              \
        pair_impl(kind, shuffle, c, &st);                                                      \
    }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(BASELINE_ONLY)
#define KERNEL(name, kind) \
    KERNEL_AS(name, kind, 0, ) KERNEL_AS(name##_avx2, kind, 1, __attribute__((target("avx2"))))
#define HAS_AVX2 __builtin_cpu_supports("avx2")
#define AVX2_KERNELS {pair_bf16_avx2, pair_f32_avx2, pair_f64_avx2}
#else
#define KERNEL(name, kind) KERNEL_AS(name, kind, 0, )
#define HAS_AVX2 0
#define AVX2_KERNELS {pair_bf16, pair_f32, pair_f64}
#endif
KERNEL(pair_bf16, 0)
KERNEL(pair_f32, 1)
KERNEL(pair_f64, 2)

/* The update map's column sums live in a scratch of the row's width: on the stack up to STRIP
 * columns, else on the heap; without heap memory, the rows are done in strips of STRIP columns. */
#ifndef STRIP /* a build with a small STRIP tests the strips */
#define STRIP 1024
#endif

static void (*const by_kind[2][3])(const Call *) = {{pair_bf16, pair_f32, pair_f64}, AVX2_KERNELS};

static void pair_strips(int kind, Call c) {
    const int64_t size = kind == 0 ? 2 : kind == 1 ? 4 : 8, cols = c.cols;
    int64_t stack[STRIP] = {0};
    c.scratch = stack;
    for (int64_t col0 = 0; col0 < cols; col0 += STRIP) {
        Call strip = c;
        strip.b = (const char *)c.b + col0 * size, strip.t = (const char *)c.t + col0 * size;
        strip.cols = cols - col0 < STRIP ? cols - col0 : STRIP;
        strip.col_bin += col0, strip.col_counts += col0, strip.first_strip = col0 == 0;
        by_kind[HAS_AVX2 != 0][kind](&strip);
    }
}

/* Entry point for ctypes: kind selects the element type of b and t. */
void pair_rows(int kind, const void *b, const void *t, int64_t rows, int64_t cols, const double *taus,
               int64_t n_taus, int relative, int want_map, const int64_t *row_bin, const int64_t *col_bin,
               int64_t slot_offset, int64_t top_slot, int64_t *hist_abs, int64_t *hist_rel, int64_t *changed,
               double *moments, double *max_abs, int64_t *row_counts, int64_t *col_counts, int64_t *grid,
               int64_t grid_cols, int64_t ulp_p, int64_t ulp_emin, int64_t *ulp_hist) {
    Call c = {b,        t,        rows,    cols,    cols,       taus,       n_taus, relative,  want_map,
              row_bin,  col_bin,  slot_offset, top_slot, hist_abs, hist_rel, changed, moments, max_abs,
              row_counts, col_counts, grid, grid_cols, ulp_p, ulp_emin, ulp_hist, NULL, 1};
    int64_t *heap = want_map && cols > STRIP ? calloc((cols + LANES - 1) / LANES * LANES, sizeof *heap) : NULL;
    if (want_map && !heap) {
        pair_strips(kind, c);
        return;
    }
    c.scratch = heap; /* NULL without a map: never touched */
    by_kind[HAS_AVX2 != 0][kind](&c);
    free(heap);
}

/* Built as an extension module only so that `pip install` compiles it; Python never calls into
 * the module itself. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpair", "deltalens pair kernel (loaded via ctypes)", -1, NULL};
PyMODINIT_FUNC PyInit__fastpair(void) { return PyModule_Create(&module); }
