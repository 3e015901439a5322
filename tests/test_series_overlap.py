"""series and overlap against float64 NumPy masks."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from conftest import variants

from deltalens.worker.analyses import Options, run_analysis
from deltalens.worker.errors import InputError

TAU = 1e-5


def _masks(base, others, relative=False):
    b = ref.load(base)
    loaded = [ref.load(o) for o in others]
    per_tensor = {
        k: [np.abs(o[k] - b[k]) > (TAU * np.abs(b[k]) if relative else TAU) for o in loaded] for k in b
    }
    whole = [np.concatenate([per_tensor[k][i].ravel() for k in sorted(b)]) for i in range(len(others))]
    return per_tensor, whole


@pytest.mark.parametrize("relative", [False, True])
def test_series_matches_numpy(llama_series, relative):
    base, *ckpts = llama_series
    result = run_analysis(
        "series", [str(p) for p in llama_series], Options(taus=[TAU], relative=relative, device="cpu")
    )
    doc = result.document
    per_tensor, whole = _masks(base, ckpts, relative)
    e = ref.series(whole)
    for got, exp in zip(doc["steps"], e["steps"]):
        assert (got["changed"], got["outside_final"]) == (exp["changed"], exp["outside_final"])
        assert got["transient_fraction"] == pytest.approx(exp["transient_fraction"], rel=1e-12)
    assert doc["categories"] == e["categories"]
    assert sum(doc["categories"].values()) == doc["numel"]
    assert doc["categories"]["transient"] > 0  # the fixture's early moves revert
    for t in doc["tensors"]:
        et = ref.series(per_tensor[t["name"]])
        assert t["categories"] == et["categories"], t["name"]
        assert [s["changed"] for s in t["steps"]] == [s["changed"] for s in et["steps"]]
    b, last = ref.load(base), ref.load(ckpts[-1])
    num = np.sqrt(sum(((last[k] - b[k]) ** 2).sum() for k in b))
    assert doc["steps"][-1]["relative_l2"] == pytest.approx(
        num / np.sqrt(sum((v**2).sum() for v in b.values())), rel=1e-9
    )


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    return variants(
        "qwen2", tmp_path_factory.mktemp("runs"), {f"run{seed}": (seed, 0.25) for seed in (11, 12, 13)}
    )


@pytest.mark.parametrize("runs", [2, 3])
def test_overlap_matches_numpy(three_runs, runs):
    base, *others = three_runs[: runs + 1]
    doc = run_analysis(
        "overlap", [str(p) for p in three_runs[: runs + 1]], Options(taus=[TAU], device="cpu")
    ).document
    per_tensor, whole = _masks(base, others)
    e = ref.overlap(whole)
    s = doc["summary"]
    assert s["changed"] == e["changed"]
    assert s["venn"] == e["venn"]
    assert sum(s["venn"].values()) == int(np.logical_or.reduce(whole).sum())
    for got, exp in zip(s["pairs"], e["pairs"]):
        assert got["both"] == exp["both"]
        for key in ("o1", "o2", "baseline1", "baseline2", "jaccard"):
            assert got[key] == pytest.approx(exp[key], rel=1e-12), key
    # independent random masks of this size overlap at the random baseline
    assert s["pairs"][0]["o1"] == pytest.approx(s["pairs"][0]["baseline1"], abs=0.03)
    for t in doc["tensors"]:
        et = ref.overlap(per_tensor[t["name"]]) if all(m.any() for m in per_tensor[t["name"]]) else None
        if et:
            assert t["venn"] == et["venn"] and [p["both"] for p in t["pairs"]] == [
                p["both"] for p in et["pairs"]
            ]


def test_overlap_of_a_run_with_itself_is_total(three_runs):
    base, run = three_runs[:2]
    s = run_analysis("overlap", [str(base), str(run), str(run)], Options(device="cpu")).document["summary"]
    assert s["pairs"][0]["o1"] == s["pairs"][0]["o2"] == s["pairs"][0]["jaccard"] == 1.0
    assert s["venn"]["10"] == s["venn"]["01"] == 0


def test_too_few_inputs_are_errors(three_runs):
    with pytest.raises(InputError, match="at least two runs"):
        run_analysis("overlap", [str(three_runs[0]), str(three_runs[1])], Options(device="cpu"))
    with pytest.raises(InputError, match="at least one checkpoint"):
        run_analysis("series", [str(three_runs[0])], Options(device="cpu"))
