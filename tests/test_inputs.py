"""Bad and unusual input: malformed safetensors, hostile pickles, mismatched checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
from conftest import run_cli
from hostile import CASES
from safetensors.torch import save_file

from deltalens.worker.analyses import Options, run_analysis
from deltalens.worker.checkpoint import open_checkpoint
from deltalens.worker.errors import InputError

ENGINE_CASES = [c for c in CASES if not (c.folder or c.values or c.pickle)]


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    save_file({"w": torch.randn(16, 8), "b": torch.randn(8)}, path)
    return path


@pytest.mark.parametrize("case", ENGINE_CASES, ids=[c.name for c in ENGINE_CASES])
def test_malformed_safetensors_raise_input_error_in_every_analysis(tmp_path, good_file, case):
    """(The CLI's one-line exit 2 for every case is tests/test_hostile.py.)"""
    bad = case.build(tmp_path)
    for kind, paths in (
        ("pair", [bad, good_file]),
        ("series", [good_file, good_file, bad]),
        ("overlap", [good_file, bad, good_file]),
    ):
        with pytest.raises(InputError) as err:
            run_analysis(kind, [str(p) for p in paths], Options(device="cpu"))
        assert err.value.path == str(bad) and case.problem in err.value.problem


def test_bin_state_dicts_give_the_same_counts_as_safetensors(tmp_path, family_pair):
    base, target = family_pair("llama")
    bins = []
    for src in (base, target):
        state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in ref.load(src).items()}
        bins.append(tmp_path / f"{src.name}.bin")
        torch.save(state, bins[-1])
    a = run_analysis(
        "pair", [str(base), str(target)], Options(taus=[1e-5, 1e-3], device="cpu", rank=False)
    ).document
    b = run_analysis(
        "pair", [str(p) for p in bins], Options(taus=[1e-5, 1e-3], device="cpu", rank=False)
    ).document
    assert a["summary"]["changed"] == b["summary"]["changed"]
    assert {t["name"]: t["changed"] for t in a["tensors"]} == {t["name"]: t["changed"] for t in b["tensors"]}


def test_lone_safetensors_file_and_sharded_dir_agree(family_pair):
    base, target = family_pair("gpt2")  # single file
    a = run_analysis("pair", [str(base), str(target)], Options(device="cpu", rank=False)).document
    b = run_analysis(
        "pair",
        [str(base / "model.safetensors"), str(target / "model.safetensors")],
        Options(device="cpu", rank=False),
    ).document
    assert a["summary"]["changed"] == b["summary"]["changed"]


def test_index_paths_that_leave_the_checkpoint_are_refused(tmp_path, family_pair):
    base, _ = family_pair("llama")
    ckpt = tmp_path / "escape"
    shutil.copytree(base, ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    outside = tmp_path / "outside.safetensors"
    first = next(iter(index["weight_map"]))
    shutil.copy(ckpt / index["weight_map"][first], outside)
    index["weight_map"][first] = "../outside.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="leaves the checkpoint folder"):
        open_checkpoint(ckpt)


def test_mismatches_are_skipped_not_fatal(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {
        "a": torch.randn(8, 4, generator=g),
        "embed": torch.randn(10, 4, generator=g),
        "gone": torch.randn(3),
    }
    target = {"a": base["a"] + 1, "embed": torch.randn(12, 4, generator=g), "new": torch.randn(3)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(target, tmp_path / "target.safetensors")
    doc = run_analysis(
        "pair",
        [str(tmp_path / "base.safetensors"), str(tmp_path / "target.safetensors")],
        Options(device="cpu"),
    ).document
    assert [t["name"] for t in doc["tensors"]] == ["a"]
    assert doc["tensors"][0]["changed"][0]["count"] == 32
    assert doc["skipped"]["only_base"] == ["gone"]
    assert doc["skipped"]["only_target"] == ["new"]
    assert doc["skipped"]["shape_mismatch"] == [{"name": "embed", "shapes": [[10, 4], [12, 4]]}]


def test_nothing_comparable_is_an_error(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "y.safetensors")
    proc = run_cli("analyze", tmp_path / "x.safetensors", tmp_path / "y.safetensors")
    assert proc.returncode == 2 and "nothing to compare" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (("analyze", "/nonexistent/base", "/nonexistent/target"), "no such file or directory"),
        (("analyze", "pyproject.toml", "pyproject.toml"), "unsupported file type"),
    ],
)
def test_missing_or_unsupported_paths(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2 and needle in proc.stderr and proc.stderr.count("\n") == 1


def test_known_answer_exact_threshold_and_low_rank(tmp_path):
    """fp32 base; target = base + a rank-3 update on one matrix and exact steps on a vector."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    u, v = (
        torch.randn(40, 3, generator=g, dtype=torch.float64),
        torch.randn(3, 24, generator=g, dtype=torch.float64),
    )
    vec = torch.zeros(10)
    step = 2.0**-17  # exactly representable
    target_vec = vec.clone()
    target_vec[:4] = step
    base = {"w": w, "vec": vec}
    target = {"w": (w.double() + u @ v).float(), "vec": target_vec}
    save_file(base, tmp_path / "b.safetensors")
    save_file(target, tmp_path / "t.safetensors")
    result = run_analysis(
        "pair",
        [str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors")],
        Options(taus=[step, np.nextafter(step, 0), 0.0], device="cpu"),
    )
    rows = {d["name"]: d for d in result.details}
    assert rows["vec"]["changed_abs"] == [0, 4, 4]  # strict: |Δ| > τ
    assert rows["w"]["rank"] == 3 and rows["w"]["full_rank"] == 24
    assert rows["w"]["rank_pct"] == pytest.approx(12.5)
