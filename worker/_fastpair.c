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
 *   row_counts[rows], col_counts[cols], grid[grid_rows][grid_cols]: update map at taus[0];
 *                       scratch: zeroed int64 buffer of cols rounded up to LANES, left zeroed
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
 *    work is per moved weight, never per weight, and only the loop gathering a partly moved
 *    block's lanes branches on which lanes moved.
 * Sums are kept per lane and added up at the end (a fixed order, not a plain element loop's: the
 * moments are float sums, compared to the reference with a tolerance; every count is exact).
 *
 * Vector code: GCC/Clang vector extensions (four doubles per vector) and plain loops the compiler
 * vectorises, whichever it compiles better; AVX2 registers in the AVX2 clone of each kernel, SSE2
 * or NEON ones elsewhere. bench/density.py measures it at 10 %, 50 % and 100 % moved.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_TAUS 16 /* the API and CLI accept at most 16 tolerances */
#define LANES 16    /* one 32-byte load of bfloat16 bits; four vectors of doubles */
#define QUARTERS (LANES / 4)
#define STAGE (16 * LANES) /* moved lanes gathered before their slots are computed */
#define ULP_EXACT 16
#define ULP_TOP_OCTAVE 64
#define ULP_BINS (ULP_EXACT + ULP_TOP_OCTAVE - 2) /* contract.ULP_BINS */
#define CELL_SHIFT 45 /* float64 bits -> bfloat16-grid cell */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

#pragma GCC diagnostic ignored "-Wpsabi" /* vector arguments only between always-inlined functions */
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4i __attribute__((vector_size(32)));
typedef uint64_t v4u __attribute__((vector_size(32)));
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

/* Fine histogram slot of x > 0: its cell, clamped to slots [1, top] by clamping x to [lo, hi] (a
 * value in slot 1's cell, one in the top slot's): min and max of doubles are single instructions. */
ALWAYS_INLINE int64_t fine_slot(double x, double lo, double hi, int64_t offset) {
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    return cell_of(x) - offset;
}

/* ULP bin of a change a > 0 at base value `base` (contract.ULP_EDGES): of u = a / ulp(base), where
 * ulp(base) = 2^(max(e, emin) - p), e the exponent of |base| (its float64 exponent field, so zero
 * and subnormals clamp to emin). Bins: 1..16 for u in (k-1, k], then octaves (2^j, 2^(j+1)] for
 * j = 4..63, then above 2^64. Every bin edge is on the bfloat16 grid, so u's grid cell decides its
 * bin: ulp_bins (filled at load time) maps cells to bins, from the cell of 0.5 (u >= 0.5 always:
 * a nonzero change is at least half the base's spacing) to the cell of 2^64, then one entry for
 * everything above. u = a · 2^k, k = p - max(e, emin), is exact, so its cell is a's cell plus 128 k
 * (128 cells per octave) for the bfloat16, float16 and float32 kinds, whose a is a normal double;
 * float64 changes can be subnormal, so there u = a · 2^h · 2^(k-h) (h = floor(k/2), each factor in
 * range; +inf past the largest double) and its own cell. No division, no log. Returns the index
 * into ulp_bins, 1 + (cell - cell of 0.5), clamped. */
#define ULP_CELL_HALF ((0x3FE0000000000000LL - 1) >> CELL_SHIFT) /* cell of 0.5: (.., 0.5] */
#define ULP_CELL_TOP ((0x43F0000000000000LL - 1) >> CELL_SHIFT)  /* cell of 2^64: (.., 2^64] */
#define ULP_CELLS (ULP_CELL_TOP - ULP_CELL_HALF + 3)             /* [0]: a = 0, cells, above 2^64 */
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

ALWAYS_INLINE int64_t ulp_index(int kind, double a, double abs_base, double min_normal, int64_t p) {
    int64_t e = (int64_t)(bits_of(abs_base > min_normal ? abs_base : min_normal) >> 52); /* biased */
    int64_t k = p + 1023 - e, cell;
    if (kind == 2) {
        int64_t h = (int64_t)((uint64_t)(k + 4096) >> 1) - 2048; /* floor(k / 2) */
        cell = cell_of(a * from_bits((uint64_t)(h + 1023) << 52) * from_bits((uint64_t)(k - h + 1023) << 52));
    } else
        cell = cell_of(a) + k * 128;
    int64_t i = cell - (ULP_CELL_HALF - 1);
    return i > ULP_CELLS - 1 ? ULP_CELLS - 1 : i;
}

/* Bit i set where the stored bits of element i of the two blocks differ. */
#if defined(__SSE2__)
#include <emmintrin.h>
/* bfloat16 (the common case): two 8-lane compares, packed to bytes, one movemask */
ALWAYS_INLINE uint32_t differing_u16(const uint16_t *b, const uint16_t *t) {
    __m128i lo = _mm_cmpeq_epi16(_mm_loadu_si128((const __m128i *)b), _mm_loadu_si128((const __m128i *)t));
    __m128i hi = _mm_cmpeq_epi16(_mm_loadu_si128((const __m128i *)(b + 8)), _mm_loadu_si128((const __m128i *)(t + 8)));
    return ~(uint32_t)_mm_movemask_epi8(_mm_packs_epi16(lo, hi)) & 0xFFFFu;
}
#else
ALWAYS_INLINE uint32_t differing_u16(const uint16_t *b, const uint16_t *t) {
    uint32_t diff = 0;
    for (int i = 0; i < LANES; i++) diff |= (uint32_t)(b[i] != t[i]) << i;
    return diff;
}
#endif

ALWAYS_INLINE uint32_t differing(int kind, const void *b, const void *t) {
    uint32_t diff = 0;
    if (kind == 0) return differing_u16(b, t);
    if (kind == 1)
        for (int i = 0; i < LANES; i++) diff |= (uint32_t)(((const uint32_t *)b)[i] != ((const uint32_t *)t)[i]) << i;
    else
        for (int i = 0; i < LANES; i++) diff |= (uint32_t)(((const uint64_t *)b)[i] != ((const uint64_t *)t)[i]) << i;
    return diff;
}

typedef struct { /* the ctypes arguments (see the header) */
    const void *b, *t;
    int64_t rows, cols;
    const double *taus;
    int64_t n_taus;
    int relative, want_map;
    const int64_t *row_bin, *col_bin;
    int64_t slot_offset, top_slot;
    int64_t *hist_abs, *hist_rel, *changed;
    double *moments, *max_abs;
    int64_t *row_counts, *col_counts, *grid, grid_cols, ulp_p, ulp_emin;
    int64_t *ulp_hist, *scratch;
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

/* Everything but the histograms for one block whose stored bits differ somewhere: x its base
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

/* The lanes of a block whose bits differ (bit i of diff): all 16 counted at once when all differ,
 * else staged one by one. */
ALWAYS_INLINE void stage_block(int kind, const Call *c, Stage *st, uint32_t diff, const Block *a,
                               const Block *x) {
    if (diff == (1u << LANES) - 1) {
        count_lanes(kind, c, st, a->e, x->e, LANES);
        return;
    }
    while (diff) {
        int i = __builtin_ctz(diff);
        diff &= diff - 1;
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

ALWAYS_INLINE void pair_impl(int kind, const Call *call, Stage *st) {
    Call copy = *call; /* a local: stores through its pointers cannot change its fields */
    const Call *c = &copy;
    const int size = kind == 0 ? 2 : kind == 1 ? 4 : 8;
    int64_t rows = c->rows, cols = c->cols, map_row = -1;
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
        const char *br = (const char *)c->b + r * cols * size, *tr = (const char *)c->t + r * cols * size;
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
            uint32_t diff = differing(kind, bp, tp);
            if (!diff) continue;
            block_sums(kind, xv, tp, c, tau, &s, c->scratch + j0, &a);
            stage_block(kind, c, st, diff, &a, &x);
        }
        if (c->want_map) c->row_counts[r] = count4(s.in_row);
    }
    if (map_row >= 0) flush_map(c, map_row);
    flush_stage(kind, c, st);
    int64_t rest = rows * cols - st->counted; /* equal bits: zero slots */
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
    c->moments[2] += sum4(s.sum_a);
    for (int i = 0; i < 4; i++) *c->max_abs = s.top[i] > *c->max_abs ? s.top[i] : *c->max_abs;
}

/* One kernel per element kind, each built twice on x86-64 (AVX2 and baseline) and picked at load
 * time. Each call has its own stage, on its stack (~15 KB): the caller's threads run calls side by
 * side. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif
CLONES static void pair_bf16(const Call *c) {
    Stage st;
    pair_impl(0, c, &st);
}
CLONES static void pair_f32(const Call *c) {
    Stage st;
    pair_impl(1, c, &st);
}
CLONES static void pair_f64(const Call *c) {
    Stage st;
    pair_impl(2, c, &st);
}

/* Entry point for ctypes: kind selects the element type of b and t. */
void pair_rows(int kind, const void *b, const void *t, int64_t rows, int64_t cols, const double *taus,
              int64_t n_taus, int relative, int want_map, const int64_t *row_bin, const int64_t *col_bin,
              int64_t slot_offset, int64_t top_slot, int64_t *hist_abs, int64_t *hist_rel, int64_t *changed,
              double *moments, double *max_abs, int64_t *row_counts, int64_t *col_counts, int64_t *grid,
              int64_t grid_cols, int64_t ulp_p, int64_t ulp_emin, int64_t *ulp_hist, int64_t *scratch) {
    Call c = {b,          t,    rows,      cols,  taus,     n_taus,   relative, want_map, row_bin,
              col_bin,    slot_offset, top_slot, hist_abs, hist_rel, changed, moments, max_abs, row_counts,
              col_counts, grid, grid_cols, ulp_p, ulp_emin, ulp_hist, scratch};
    void (*const by_kind[])(const Call *) = {pair_bf16, pair_f32, pair_f64};
    by_kind[kind](&c);
}

/* Built as an extension module only so that `pip install` compiles it; Python never calls into
 * the module itself. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpair", "deltalens pair kernel (loaded via ctypes)", -1, NULL};
PyMODINIT_FUNC PyInit__fastpair(void) { return PyModule_Create(&module); }
