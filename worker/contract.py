"""The results contract shared by the worker (writer) and the backend (reader).

Imports neither torch nor FastAPI: the backend may import this module freely.

It fixes three things:
  * the |Δ| histogram bins (``BIN_EDGES``) — the same for every tensor and every analysis,
  * the DuckDB schema of a results artifact (``SCHEMA_SQL``),
  * the vocabulary: analysis kinds, job statuses, count modes, the default τ and what a valid τ is,
    canonical matrix types and blocks.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

SCHEMA_VERSION = 1

# ---------------------------------------------------------------------------------------------
# Vocabulary shared by the CLI, the worker, the API and its schema.
# ---------------------------------------------------------------------------------------------
Kind = Literal["pair", "series", "overlap"]
Status = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL = ("done", "failed", "cancelled")  # statuses a job never leaves
Mode = Literal["abs", "rel"]  # changed when |Δ| > τ (abs) or |Δ| > τ·|b| (rel)
DEFAULT_TAU = 1e-5
MAX_TITLE = 200  # characters in an analysis' title
MAX_OVERLAP_RUNS = 12  # runs after the base: every Venn/UpSet region is counted (2**runs of them)
TAU_RULE = "τ must be a finite number >= 0"


def valid_tau(tau: float) -> bool:
    """τ = 0 means "stored values differ"; negative, infinite and NaN τ mean nothing."""
    return isinstance(tau, int | float) and math.isfinite(tau) and tau >= 0


def check_tau(tau: float) -> float:
    """τ itself, or ValueError(TAU_RULE) when it is not a valid τ."""
    if not valid_tau(tau):
        raise ValueError(TAU_RULE)
    return tau


MATRIX_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "bias", "other")
BLOCKS = ("embed", "attn", "mlp", "norm", "head", "other")

# ---------------------------------------------------------------------------------------------
# Histogram bins.
#
# Edges are 10^(k/16) for k = -192..32 (1e-12 .. 1e2, 16 per decade), each rounded to the nearest
# bfloat16 value (relative error < 0.2 %). Being on the bfloat16 grid lets the engine bin a float
# by its bit pattern (exact, no log) and makes "count of |Δ| > edge" exact for every edge.
# Bins: [exactly 0], (0, E0], (E0, E1], ..., (E_{K-2}, E_{K-1}], (E_{K-1}, +inf and NaN].
# ---------------------------------------------------------------------------------------------
BINS_PER_DECADE = 16
_EXPONENTS = np.arange(-12 * BINS_PER_DECADE, 2 * BINS_PER_DECADE + 1)


def _round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round half to even
    return rounded.astype(np.uint32).view(np.float32)


BIN_EDGES: tuple[float, ...] = tuple(
    float(e) for e in _round_to_bfloat16(10.0 ** (_EXPONENTS / BINS_PER_DECADE))
)
NUM_BINS = len(BIN_EDGES) + 2  # zero bin + K-1 inner bins + underflow (0, E0] + overflow
# Kernels first count values per bfloat16-grid cell (lo, hi] — a "fine" histogram — and fold
# that into the bins above. A positive value's grid cell is ((float64 bits - 1) >> 45) minus
# F64_CELL_OFFSET (the float32 bit pattern's top 16 bits, +1). Only cells between the first and
# the last edge matter, so the fine histogram keeps: [0] exact zero, [1] every cell up to E0,
# then one slot per cell, then one slot for everything above the last edge (and NaN).
F64_CELL_OFFSET = ((1023 - 127) << 7) - 1
_GRID_CELLS = (
    np.asarray(BIN_EDGES, np.float32).view(np.uint32) >> 16
)  # grid cell whose upper edge is each edge
FINE_LO, FINE_HI = int(_GRID_CELLS[0]), int(_GRID_CELLS[-1]) + 1
FINE_CELLS = FINE_HI - FINE_LO + 2
EDGE_CELLS: tuple[int, ...] = tuple(int(c) - FINE_LO + 1 for c in _GRID_CELLS)  # fine slot of each edge


def changed_from_histogram(counts, tau_edge_index: int) -> int:
    """Number of values > BIN_EDGES[tau_edge_index], from a histogram over these bins (exact)."""
    return int(sum(counts[tau_edge_index + 2 :]))


def nearest_edge_index(tau: float) -> int:
    """Index of the bin edge nearest to tau in log space (what a τ slider snaps to)."""
    if tau <= 0:
        raise ValueError("histogram edges are positive; τ = 0 is read from the zero bin")
    return int(np.argmin(np.abs(np.log10(np.asarray(BIN_EDGES)) - np.log10(tau))))


# ---------------------------------------------------------------------------------------------
# Precision-aware change: |Δ| in units of the base's stored-dtype spacing (ULP) at the base value,
# u = |t − b| / ulp(b). ulp(b) = 2^(max(e, emin) − p) for |b| in [2^e, 2^(e+1)): a power of two, so
# u is exact in float64 (the kernels scale |Δ| by 2^k, no division). ulp(0) and subnormal ulp are the
# smallest subnormal spacing 2^(emin − p). fp8 tensors read dequantized (code × scale, Meta.stored)
# get no ULP histogram: the stored grid there is the scale's, not the dtype's.
# Bins: [u = 0], then (E_{i−1}, E_i] over ULP_EDGES, then (E_last, +inf): with E = 1, 2, …, 16 the
# first 16 bins hold u = 1, 2, …, 16 exactly for a same-dtype pair, except a move toward zero across
# a power of two (u = k − ½), which lands in bin k; above 16, octaves (16, 32], …, (2^63, 2^64].
# ---------------------------------------------------------------------------------------------
ULP_FORMATS: dict[str, tuple[int, int]] = {  # stored dtype -> (mantissa bits p, min normal exponent)
    "BF16": (7, -126),
    "F16": (10, -14),
    "F32": (23, -126),
    "F64": (52, -1022),
}
ULP_EXACT = 16  # bins 1..16: one per integer ULP count
ULP_TOP_OCTAVE = 64  # last octave edge 2^64
ULP_EDGES: tuple[float, ...] = tuple(float(k) for k in range(1, ULP_EXACT + 1)) + tuple(
    2.0**j for j in range(ULP_EXACT.bit_length(), ULP_TOP_OCTAVE + 1)
)
ULP_BINS = len(ULP_EDGES) + 2
# Visibility floor: no stored change is smaller than 2^−(p+1)·|b| (one step down from a power of
# two), so a relative histogram |Δ|/|b| shows nothing below it; sub-ULP updates of fp32 master
# weights never reach the stored checkpoint.
VISIBILITY_FLOOR: dict[str, float] = {d: 2.0 ** -(p + 1) for d, (p, _) in ULP_FORMATS.items()}


# ---------------------------------------------------------------------------------------------
# DuckDB schema of one results artifact. Every table carries analysis_id, so artifacts can be
# ingested into one catalog side by side. `run` is the target index: 0 for a pair, the
# checkpoint index (0-based) for a series, the run index for an overlap.
# ---------------------------------------------------------------------------------------------
SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS analyses (
    analysis_id   VARCHAR PRIMARY KEY,
    kind          VARCHAR NOT NULL,          -- pair | series | overlap
    created_at    TIMESTAMP NOT NULL,
    schema_version INTEGER NOT NULL,
    base          VARCHAR NOT NULL,
    targets       VARCHAR[] NOT NULL,         -- target / checkpoints / runs, in CLI order
    taus          DOUBLE[] NOT NULL,
    relative      BOOLEAN NOT NULL,
    family        VARCHAR NOT NULL,
    device        VARCHAR NOT NULL,
    bin_edges     DOUBLE[] NOT NULL,
    result_json   JSON NOT NULL              -- the exact object `--json` writes
);
CREATE TABLE IF NOT EXISTS tensors (
    analysis_id VARCHAR NOT NULL, run INTEGER NOT NULL,
    name VARCHAR NOT NULL, source VARCHAR NOT NULL,
    layer INTEGER, block VARCHAR NOT NULL, matrix VARCHAR NOT NULL, expert INTEGER,
    shape BIGINT[] NOT NULL, numel BIGINT NOT NULL, dtype VARCHAR NOT NULL,
    norm_delta DOUBLE, norm_base DOUBLE, max_abs_delta DOUBLE, sum_abs_delta DOUBLE,
    rank INTEGER, full_rank INTEGER, rank_pct DOUBLE, effective_rank DOUBLE, stable_rank DOUBLE,
    rank90 INTEGER, rank99 INTEGER
);
CREATE TABLE IF NOT EXISTS changed (        -- exact counts at each requested τ
    analysis_id VARCHAR NOT NULL, run INTEGER NOT NULL, name VARCHAR NOT NULL,
    mode VARCHAR NOT NULL,                   -- abs | rel
    tau DOUBLE NOT NULL, count BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS histograms (     -- counts over contract.BIN_EDGES bins
    analysis_id VARCHAR NOT NULL, run INTEGER NOT NULL, name VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,                   -- abs (|Δ|) | rel (|Δ|/|b|)
    counts BIGINT[] NOT NULL
);
CREATE TABLE IF NOT EXISTS spectra (
    analysis_id VARCHAR NOT NULL, run INTEGER NOT NULL, name VARCHAR NOT NULL,
    idx INTEGER[] NOT NULL,                  -- 0-based positions kept (downsampled when long)
    sigma DOUBLE[] NOT NULL
);
CREATE TABLE IF NOT EXISTS update_maps (    -- at the first τ, in the analysis's mode
    analysis_id VARCHAR NOT NULL, run INTEGER NOT NULL, name VARCHAR NOT NULL,
    tau DOUBLE NOT NULL, grid_rows INTEGER NOT NULL, grid_cols INTEGER NOT NULL,
    cells DOUBLE[] NOT NULL,                 -- fraction changed, row-major grid_rows x grid_cols
    row_frac DOUBLE[] NOT NULL, col_frac DOUBLE[] NOT NULL, -- binned to <= 1024 entries
    head_frac DOUBLE[]                       -- per attention head, when heads are known
);
CREATE TABLE IF NOT EXISTS overlap_regions ( -- Venn counts; name '*' = whole model
    analysis_id VARCHAR NOT NULL, name VARCHAR NOT NULL,
    region VARCHAR NOT NULL,                 -- membership bits in run order, e.g. '101'
    count BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS overlap_pairs (
    analysis_id VARCHAR NOT NULL, name VARCHAR NOT NULL, a INTEGER NOT NULL, b INTEGER NOT NULL,
    both_count BIGINT NOT NULL, o1 DOUBLE, o2 DOUBLE, baseline1 DOUBLE, baseline2 DOUBLE, jaccard DOUBLE
);
CREATE TABLE IF NOT EXISTS series_steps (   -- name '*' = whole model
    analysis_id VARCHAR NOT NULL, name VARCHAR NOT NULL, step INTEGER NOT NULL,
    checkpoint VARCHAR NOT NULL, changed BIGINT NOT NULL, outside_final BIGINT NOT NULL,
    transient_fraction DOUBLE, relative_l2 DOUBLE
);
CREATE TABLE IF NOT EXISTS series_categories (
    analysis_id VARCHAR NOT NULL, name VARCHAR NOT NULL,
    consistent BIGINT NOT NULL, transient BIGINT NOT NULL, untouched BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS skipped (
    analysis_id VARCHAR NOT NULL, name VARCHAR NOT NULL,
    reason VARCHAR NOT NULL                  -- only_base | only_target | shape_mismatch | ...
);
CREATE TABLE IF NOT EXISTS adapter_modules ( -- exact ΔW = scale·B·A of a LoRA input, per module
    analysis_id VARCHAR NOT NULL, run INTEGER NOT NULL, -- the input that is the adapter (1 = target)
    name VARCHAR NOT NULL, r INTEGER NOT NULL, alpha DOUBLE NOT NULL, scale DOUBLE NOT NULL,
    numel BIGINT NOT NULL, taus DOUBLE[] NOT NULL, counts BIGINT[] NOT NULL, -- |ΔW| > τ (the mode's)
    norm_delta DOUBLE NOT NULL, rank INTEGER, full_rank INTEGER, sigma DOUBLE[]
);
CREATE TABLE IF NOT EXISTS overlap_stats (  -- per pair vs a random mask of the same density; name '*' = model
    analysis_id VARCHAR NOT NULL, name VARCHAR NOT NULL, a INTEGER NOT NULL, b INTEGER NOT NULL,
    both_count BIGINT NOT NULL,
    baseline DOUBLE NOT NULL,                -- hypergeometric mean |A||B|/N ('*': summed over tensors)
    variance DOUBLE NOT NULL,                -- |A||B|(N-|A|)(N-|B|)/(N²(N-1)) ('*': summed)
    lift DOUBLE, z DOUBLE,                   -- both / baseline, (both - baseline) / sqrt(variance)
    same_sign BIGINT NOT NULL,               -- of both: sign(Δ_A) = sign(Δ_B)
    baseline_global DOUBLE                   -- '*' only: |A||B|/N of the model's totals
);
CREATE TABLE IF NOT EXISTS upset (          -- every non-empty set of runs, whole model
    analysis_id VARCHAR NOT NULL,
    region VARCHAR NOT NULL,                 -- membership bits in run order, e.g. '101'
    degree INTEGER NOT NULL,                 -- runs in the set
    exact BIGINT NOT NULL,                   -- changed in exactly these runs (UpSet distinct mode)
    inclusive BIGINT NOT NULL                -- changed in at least these runs
);
CREATE TABLE IF NOT EXISTS series_first_change ( -- per checkpoint; name '*' = whole model
    analysis_id VARCHAR NOT NULL, name VARCHAR NOT NULL, step INTEGER NOT NULL,
    first_changed BIGINT NOT NULL,           -- weights first differing from the base (at τ) here
    kept BIGINT NOT NULL, reverted BIGINT NOT NULL, -- of those: changed / unchanged at the final step
    norm_delta DOUBLE NOT NULL               -- ‖θ_t − θ₀‖₂ (absolute)
);
CREATE TABLE IF NOT EXISTS ulp_histograms ( -- pair: |Δ| in ULPs of the base's stored dtype
    analysis_id VARCHAR NOT NULL, run INTEGER NOT NULL, name VARCHAR NOT NULL,
    dtype VARCHAR NOT NULL,                  -- the base's stored dtype the ULP is of
    counts BIGINT[] NOT NULL,                -- over contract.ULP_EDGES: [u=0], (0,1], (1,2], ...
    one_ulp BIGINT NOT NULL                  -- counts[1]: 0 < u <= 1
);
CREATE TABLE IF NOT EXISTS geometry (       -- pair: ΔW against W₀'s top-k singular subspaces
    analysis_id VARCHAR NOT NULL, run INTEGER NOT NULL, name VARCHAR NOT NULL,
    k INTEGER[] NOT NULL,                    -- 1, 8, 32 capped at min(m, n); the lists below follow it
    energy_in_topk DOUBLE[], left_in_topk DOUBLE[], right_in_topk DOUBLE[], -- null when ΔW = 0
    angle_left_max_deg DOUBLE[] NOT NULL, angle_right_max_deg DOUBLE[] NOT NULL,
    drift DOUBLE[] NOT NULL,                 -- σᵢ(W₁)/σᵢ(W₀), i < max k
    rank1_dominance DOUBLE, intruders INTEGER[] NOT NULL, sq_delta DOUBLE NOT NULL,
    method VARCHAR NOT NULL,                 -- exact | randomized (top singular triplets)
    figures JSON NOT NULL                    -- the tensor's whole `geometry` object of the result
);
CREATE TABLE IF NOT EXISTS enrichment (     -- pair: the update mask at the first τ in top-p % selections
    analysis_id VARCHAR NOT NULL, run INTEGER NOT NULL, name VARCHAR NOT NULL,
    selector VARCHAR NOT NULL,               -- magnitude (|W₀|) | principal (|rank-8 reconstruction of W₀|)
    percent INTEGER NOT NULL, tau DOUBLE NOT NULL, numel BIGINT NOT NULL, changed BIGINT NOT NULL,
    selected BIGINT NOT NULL, observed BIGINT NOT NULL, expected DOUBLE NOT NULL, ratio DOUBLE
);
"""

TABLES = (
    "analyses",
    "tensors",
    "changed",
    "histograms",
    "spectra",
    "update_maps",
    "overlap_regions",
    "overlap_pairs",
    "series_steps",
    "series_categories",
    "skipped",
    "adapter_modules",
    "overlap_stats",
    "upset",
    "series_first_change",
    "ulp_histograms",
    "geometry",
    "enrichment",
)
