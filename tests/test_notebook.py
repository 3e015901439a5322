"""The notebook API (`import deltalens as dl`, worker/notebook.py): the engine's numbers, read back
from its artifact through the service's read side, checked against the CLI's artifact and the
float64 NumPy reference."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import reference
from conftest import run_cli
from service import ROOT

import deltalens as dl
from deltalens.worker.contract import BIN_EDGES, nearest_edge_index
from deltalens.worker.errors import InputError

TAUS = [1e-5, 1e-3]
_RUNS: dict = {}


def notebook_runs(tmp_path_factory, family_pair, llama_series) -> dict:
    """A llama pair at TAUS (rank, geometry), a series of llama_series and an overlap of two of its
    checkpoints, run by the notebook API into one DuckDB file ("artifact"), once per session: this
    module and tests/test_html_report.py read them (the engine is the slow part)."""
    if not _RUNS:
        out = tmp_path_factory.mktemp("notebook") / "runs.duckdb"
        base, *checkpoints = llama_series
        _RUNS["pair"] = dl.analyze(*family_pair("llama"), taus=TAUS, out=out)
        _RUNS["series"] = dl.series(base, checkpoints, tau=1e-5, out=out)
        _RUNS["overlap"] = dl.overlap(base, checkpoints[1:3], tau=1e-5, out=out)  # 2 runs: cheaper on CPU
        _RUNS["artifact"] = out
    return _RUNS


@pytest.fixture(scope="module")
def runs(tmp_path_factory, family_pair, llama_series):
    return notebook_runs(tmp_path_factory, family_pair, llama_series)


@pytest.fixture(scope="module")
def cli_pair(family_pair, tmp_path_factory):
    """The CLI's artifact and --json of the same llama pair."""
    base, target = family_pair("llama")
    folder = tmp_path_factory.mktemp("cli")
    out, doc = folder / "cli.duckdb", folder / "cli.json"
    taus = [str(t) for t in TAUS]
    run_cli("analyze", base, target, "--tau", *taus, "--out", out, "--json", doc, "--quiet", check=True)
    return base, target, out, json.loads(doc.read_text())


def test_import_deltalens_is_cheap():
    code = (
        "import sys, deltalens, deltalens.worker.contract; "
        "print(sorted(m for m in ('torch', 'pandas', 'plotly', 'fastapi') if m in sys.modules)); "
        "print(deltalens.__all__, 'analyze' in dir(deltalens))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded, exported = out.stdout.splitlines()
    assert loaded == "[]"
    assert "'analyze'" in exported and "'open'" in exported and exported.endswith("True")
    with pytest.raises(AttributeError):
        dl.no_such_thing  # noqa: B018


def test_analyze_equals_the_cli_artifact_and_the_reference(runs, cli_pair):
    base, target, artifact, document = cli_pair
    r = runs["pair"]  # dl.analyze(base, target, taus=TAUS, out=…)
    cli = dl.open(artifact)
    assert cli.document == document  # the artifact holds exactly what --json wrote
    assert r.document == document
    assert r.kind == "pair" and r.taus == TAUS and r.source == str(runs["artifact"])
    assert cli.source == str(artifact)
    pd.testing.assert_frame_equal(r.tensors, cli.tensors)

    b, t = reference.load(base), reference.load(target)
    frame = r.tensors.set_index("name")
    stored = [n for n in frame.index if n in b]
    assert len(stored) >= len(frame) - 1  # every matrix but a tied head is stored
    for tau in TAUS:
        expected = [reference.changed(b[n], t[n], tau) for n in stored]
        assert frame.loc[stored, f"changed@{tau:g}"].tolist() == expected
        assert frame.loc[stored, f"sparsity@{tau:g}"].tolist() == [
            1 - c / b[n].size for c, n in zip(expected, stored)
        ]
    rel = frame.loc[stored, "relative_change"].to_numpy()
    assert rel == pytest.approx([reference.relative_l2(b[n], t[n]) for n in stored], rel=1e-9)
    assert {"rank_pct", "one_ulp", "energy_in_top8", "rank1_dominance"} <= set(frame.columns)
    assert "histograms" in r.tensor(stored[0]) and len(r.table("changed")) == 2 * len(TAUS) * len(frame)
    assert "sparsity" in str(r)  # the CLI's summary


def test_heatmap_is_the_grid_of_the_reference_counts(cli_pair):
    base, target, artifact, _ = cli_pair
    r = dl.open(artifact)
    b, t = reference.load(base), reference.load(target)
    edge = BIN_EDGES[nearest_edge_index(1e-3)]  # the heatmap reads τ from the histograms' edges
    cells: dict = {}
    for row in r.tensors.itertuples():
        if row.name in b:
            c = cells.setdefault((row.layer if not pd.isna(row.layer) else None, row.matrix), [0, 0])
            c[0] += int((np.abs(t[row.name] - b[row.name]) > edge).sum())
            c[1] += b[row.name].size
    fig = r.heatmap("sparsity", tau=1e-3)
    heat = fig.data[0]
    layers = [0, 1, None]
    assert list(heat.y) == ["layer 0", "layer 1", "other"]
    for i, layer in enumerate(layers):
        for j, matrix in enumerate(heat.x):
            if (layer, matrix) in cells and not (layer is None and matrix == "lm_head"):
                changed, numel = cells[(layer, matrix)]
                assert heat.z[i][j] == pytest.approx(1 - changed / numel, abs=1e-12), (layer, matrix)
    assert heat.z[1][heat.x.index("norm")] == 1.0 and heat.z[2][heat.x.index("q")] is None
    rank = r.heatmap("rank_pct").data[0]
    by_cell = r.tensors.dropna(subset=["rank_pct"]).groupby(["layer", "matrix"])["rank_pct"].mean()
    assert rank.z[0][rank.x.index("q")] == pytest.approx(by_cell[(0, "q")])
    assert set(r.figures()) >= {"sparsity at τ = 1e-05", "sparsity at τ = 0.001", "rank by layer"}
    with pytest.raises(ValueError, match="metric must be one of"):
        r.heatmap("nonsense")


def test_series_and_overlap_equal_the_reference(runs, llama_series, tmp_path):
    base, *checkpoints = llama_series
    s, o, out = runs["series"], runs["overlap"], runs["artifact"]
    b = reference.load(base)
    names = sorted(b)
    masks = [
        np.concatenate([(np.abs(c[n] - b[n]) > 1e-5).ravel() for n in names])
        for c in map(reference.load, checkpoints)
    ]
    expected = reference.series(masks)
    assert s.steps[["changed", "outside_final"]].to_dict("records") == [
        {"changed": e["changed"], "outside_final": e["outside_final"]} for e in expected["steps"]
    ]
    assert s.series_view["categories"] == expected["categories"]
    assert s.tensors[["consistent", "transient", "untouched"]].sum().to_dict() == expected["categories"]
    share = s.heatmap("transient_share").data[0]
    assert list(share.y) == ["layer 0", "layer 1", "other"] and len(share.z[0]) == len(share.x)
    assert [tr.name for tr in s.series_figure().data][:2] == [
        "changed vs base",
        "of those, not changed at the end",
    ]

    overlap = reference.overlap(masks[1:3])
    assert o.pairs[["a", "b", "both", "o1", "baseline1", "jaccard"]].to_dict("records") == [
        {k: p[k] for k in ("a", "b", "both", "o1", "baseline1", "jaccard")} for p in overlap["pairs"]
    ]
    assert o.overlap_view["summary"]["venn"] == overlap["venn"]
    assert [bar.y for bar in o.overlap_figure().data][0] == tuple(p["o1"] for p in overlap["pairs"])

    with pytest.raises(ValueError, match="only pair analyses"):
        s.heatmap("sparsity")
    with pytest.raises(ValueError, match="only series analyses"):
        o.steps  # noqa: B018
    listed = dl.analyses(out)
    assert listed["id"].tolist() == [runs["pair"].id, s.id, o.id]
    assert listed["kind"].tolist() == ["pair", "series", "overlap"]
    with pytest.raises(ValueError, match="holds 3 analyses"):
        dl.open(out)
    assert dl.open(out, id=o.id).document == o.document
    with pytest.raises(KeyError):
        dl.open(out, id="000000000000")
    (tmp_path / "text.duckdb").write_text("not a database")
    with pytest.raises(InputError, match="text.duckdb: not a DuckDB file"):
        dl.open(tmp_path / "text.duckdb")


def test_an_artifact_with_a_view_or_macro_is_refused_before_it_runs(tmp_path):
    """A view over read_text() would hand any local file to whoever shares the artifact: refused,
    and with external access off nothing outside the file is read even to judge it."""
    import duckdb

    from deltalens.worker.contract import SCHEMA_SQL

    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    for name, code in [
        ("view", f"CREATE VIEW leak AS SELECT content FROM read_text('{secret}')"),
        ("macro", "CREATE MACRO leak(x) AS x + 1"),
    ]:
        path = tmp_path / f"{name}.duckdb"
        with duckdb.connect(str(path)) as con:
            con.execute(SCHEMA_SQL)
            con.execute(code)
        with pytest.raises(InputError, match=f"{name}.duckdb: holds views or macros"):
            dl.open(path)
