"""Property: the fixed-bin |Δ| histogram gives the exact changed count at every bin edge."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from deltalens.worker.contract import BIN_EDGES, NUM_BINS, changed_from_histogram, nearest_edge_index
from deltalens.worker.fused import FusedPairAccumulator
from deltalens.worker.kernels import PairAccumulator

finite32 = st.floats(min_value=-1e3, max_value=1e3, width=32, allow_subnormal=True)
# values clustered on and around the bin edges, where an off-by-one would show
near_edges = st.sampled_from(BIN_EDGES).flatmap(
    lambda e: st.sampled_from(
        [
            e,
            float(np.nextafter(np.float32(e), np.float32(0))),
            float(np.nextafter(np.float32(e), np.float32(1e9))),
            -e,
        ]
    )
)


def _histogram(base: np.ndarray, target: np.ndarray, dtype: torch.dtype, fused: bool):
    b, t = torch.from_numpy(base).to(dtype).reshape(-1, 1), torch.from_numpy(target).to(dtype).reshape(-1, 1)
    args = (b.shape[0], 1, [1e-5], False, False, False, None, True)
    if not fused:
        acc = PairAccumulator(*args, torch.device("cpu"))
        acc.add(b, [t], 0, 0)
        return acc
    if dtype == torch.bfloat16:
        b, t = b.view(torch.uint16), t.view(torch.uint16)
    acc = FusedPairAccumulator(*args)
    acc.add(b.numpy(), [t.numpy()], 0)
    return acc


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.float32, st.integers(1, 300), elements=finite32),
    arrays(np.float32, st.integers(1, 300), elements=st.one_of(finite32, near_edges)),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    st.booleans(),
)
def test_histogram_gives_exact_counts_at_every_edge(base, delta, dtype, fused):
    n = min(len(base), len(delta))
    base, target = base[:n], base[:n] + delta[:n]
    acc = _histogram(base, target, dtype, fused)
    result = acc.result()
    counts = result["hist_abs"]
    assert len(counts) == NUM_BINS and sum(counts) == n
    b64 = torch.from_numpy(base).to(dtype).double().numpy()
    t64 = torch.from_numpy(target).to(dtype).double().numpy()
    absdelta = np.abs(t64 - b64)
    assert counts[0] == int((absdelta == 0).sum())
    for i, edge in enumerate(BIN_EDGES):
        assert changed_from_histogram(counts, i) == int((absdelta > edge).sum())
    rel = result["hist_rel"]
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(0, len(BIN_EDGES), 7):
            assert changed_from_histogram(rel, i) == int((absdelta > BIN_EDGES[i] * np.abs(b64)).sum())


def test_bin_edges_are_log_spaced_on_the_bfloat16_grid():
    edges = np.asarray(BIN_EDGES)
    k = np.arange(-192, 33)
    assert len(edges) == len(k) and abs(edges[0] / 1e-12 - 1) < 2**-8 and abs(edges[-1] / 1e2 - 1) < 2**-8
    np.testing.assert_allclose(edges, 10.0 ** (k / 16), rtol=2**-8)
    assert (np.asarray(edges, np.float32).view(np.uint32) & 0xFFFF == 0).all()  # bfloat16-representable
    assert np.all(np.diff(edges) > 0)
    assert BIN_EDGES[nearest_edge_index(1e-5)] == np.float32(torch.tensor(1e-5).bfloat16().item())
