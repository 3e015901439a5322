"""The CLI contract (JSON shape, stdout/stderr, exit codes) and the DuckDB artifact."""

from __future__ import annotations

import json
import subprocess
import sys

import duckdb
import pytest
import reference as ref
from conftest import ROOT, run_cli

from deltalens.worker.contract import BIN_EDGES, NUM_BINS, TABLES

TENSOR_KEYS = {"name", "layer", "block", "matrix", "shape", "numel", "changed", "rank", "full_rank"}


def test_analyze_json_contract_and_summary(tmp_path, family_pair):
    base, target = family_pair("gpt2")
    out, js = tmp_path / "r.duckdb", tmp_path / "r.json"
    proc = run_cli("analyze", base, target, "--tau", "1e-5", "1e-3", "--out", out, "--json", js, check=True)
    doc = json.loads(js.read_text())
    assert doc["kind"] == "pair" and doc["base"] == str(base) and doc["target"] == str(target)
    assert doc["taus"] == [1e-5, 1e-3]
    assert set(doc["summary"]) >= {"numel", "changed"}
    assert [c["tau"] for c in doc["summary"]["changed"]] == [1e-5, 1e-3]
    assert all(isinstance(c["count"], int) for c in doc["summary"]["changed"])
    for t in doc["tensors"]:
        assert TENSOR_KEYS <= set(t), t["name"]
    assert set(doc["skipped"]) >= {"only_base", "only_target", "shape_mismatch"}
    q = next(t for t in doc["tensors"] if t["name"] == "transformer.h.0.attn.c_attn.weight[q]")
    assert (q["matrix"], q["layer"], q["block"], q["shape"]) == ("q", 0, "attn", [48, 48])
    # stdout: readable summary with global sparsity per τ and per-layer table; progress only on a TTY
    assert "sparsity" in proc.stdout and "by layer" in proc.stdout and "by matrix type" in proc.stdout
    assert proc.stderr == ""
    # JSON to stdout
    proc = run_cli("analyze", base, target, "--json", "-", "--no-rank", check=True)
    assert json.loads(proc.stdout)["tensors"][0]["rank"] is None


def test_series_and_overlap_json_contract(tmp_path, llama_series):
    proc = run_cli("series", *llama_series, "--json", "-", check=True)
    doc = json.loads(proc.stdout)
    assert (
        doc["kind"] == "series"
        and doc["checkpoints"] == [str(p) for p in llama_series[1:]]
        and doc["tau"] == 1e-5
    )
    assert set(doc["steps"][0]) >= {"checkpoint", "changed", "outside_final", "transient_fraction"}
    assert set(doc["categories"]) == {"consistent", "transient", "untouched"}
    assert doc["steps"][-1]["outside_final"] == 0 and doc["steps"][-1]["transient_fraction"] == 0
    proc = run_cli("overlap", *llama_series[:4], "--tau", "1e-4", "--json", "-", check=True)
    doc = json.loads(proc.stdout)
    assert doc["kind"] == "overlap" and doc["tau"] == 1e-4 and len(doc["runs"]) == 3
    s = doc["summary"]
    assert set(s) >= {"numel", "changed", "pairs", "venn"} and len(s["changed"]) == 3
    assert set(s["pairs"][0]) >= {"a", "b", "both", "o1", "o2", "baseline1", "baseline2", "jaccard"}
    assert set(s["venn"]) == {"100", "010", "001", "110", "101", "011", "111"}


def test_duckdb_artifact_holds_every_analysis(tmp_path, family_pair, llama_series):
    base, target = family_pair("llama")
    db = tmp_path / "results.duckdb"
    run_cli("analyze", base, target, "--tau", "1e-5", "1e-4", "--out", db, check=True)
    run_cli("series", *llama_series, "--out", db, check=True)
    run_cli("overlap", *llama_series[:3], "--out", db, check=True)
    assert not list(tmp_path.glob(".results.duckdb.tmp*"))  # published by rename, nothing left over
    with duckdb.connect(str(db), read_only=True) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert set(TABLES) <= tables
        kinds = dict(con.execute("SELECT kind, analysis_id FROM analyses").fetchall())
        assert set(kinds) == {"pair", "series", "overlap"}
        pair = kinds["pair"]
        doc = json.loads(
            con.execute("SELECT result_json FROM analyses WHERE analysis_id = ?", [pair]).fetchone()[0]
        )
        n_parts = len(doc["tensors"])
        assert (
            con.execute("SELECT count(*) FROM tensors WHERE analysis_id = ?", [pair]).fetchone()[0] == n_parts
        )
        assert (
            con.execute("SELECT count(*) FROM histograms WHERE analysis_id = ?", [pair]).fetchone()[0]
            == 2 * n_parts
        )
        edges = con.execute("SELECT bin_edges FROM analyses WHERE analysis_id = ?", [pair]).fetchone()[0]
        assert edges == list(BIN_EDGES)
        # the stored changed counts and histograms agree with the reference
        b, t = ref.load(base), ref.load(target)
        name = "model.layers.1.mlp.down_proj.weight"
        stored = con.execute(
            "SELECT tau, count FROM changed WHERE analysis_id = ? AND name = ? AND mode = 'abs' ORDER BY tau",
            [pair, name],
        ).fetchall()
        assert stored == [
            (1e-5, ref.changed(b[name], t[name], 1e-5)),
            (1e-4, ref.changed(b[name], t[name], 1e-4)),
        ]
        hist = con.execute(
            "SELECT counts FROM histograms WHERE analysis_id = ? AND name = ? AND kind = 'abs'", [pair, name]
        ).fetchone()[0]
        assert len(hist) == NUM_BINS and hist == ref.histogram(abs(t[name] - b[name]))
        grid = con.execute(
            "SELECT grid_rows, grid_cols, len(cells) FROM update_maps WHERE analysis_id = ? AND name = ?",
            [pair, name],
        ).fetchone()
        assert grid[0] * grid[1] == grid[2]
        series = kinds["series"]
        steps = con.execute(
            "SELECT count(*) FROM series_steps WHERE analysis_id = ? AND name = '*'", [series]
        ).fetchone()[0]
        assert steps == len(llama_series) - 1
        regions = con.execute(
            "SELECT region, count FROM overlap_regions WHERE analysis_id = ? AND name = '*'",
            [kinds["overlap"]],
        ).fetchall()
        assert {r for r, _ in regions} == {"00", "10", "01", "11"}


def test_a_failed_analysis_leaves_the_results_file_untouched(tmp_path, family_pair):
    base, target = family_pair("llama")
    db = tmp_path / "results.duckdb"
    run_cli("analyze", base, target, "--out", db, check=True)
    before = db.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json......}")
    proc = run_cli("analyze", base, bad, "--out", db)
    assert proc.returncode == 2
    assert db.read_bytes() == before


def test_backend_safe_modules_do_not_import_torch():
    code = (
        "import sys; import deltalens.worker.contract, deltalens.worker.safetensors_header, "
        "deltalens.worker.analyses, deltalens.worker.cli, deltalens.worker.store, "
        "deltalens.worker.mask_export; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert out.strip() == "False"


def test_usage_errors_exit_2():
    for args in (
        ["analyze", "only-one"],
        ["overlap"],
        ["analyze", "a", "b", "--tau", "-1"],
        ["analyze", "a", "b", "--tau", "x"],
    ):
        proc = run_cli(*args)
        assert proc.returncode == 2, args


@pytest.mark.parametrize("device", ["cuda"])
def test_cuda_request_without_cuda_is_a_clear_error(family_pair, device):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    base, target = family_pair("llama")
    proc = run_cli("analyze", base, target, "--device", device)
    assert proc.returncode == 2 and "CUDA" in proc.stderr and proc.stderr.count("\n") == 1


def test_an_overlap_of_too_many_runs_is_a_one_line_error(family_pair):
    base, target = family_pair("llama")
    proc = run_cli("overlap", base, *[target] * 13)
    assert proc.returncode == 2 and "at most 12 runs" in proc.stderr and proc.stderr.count("\n") == 1
