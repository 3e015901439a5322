"""The catalog's cache of read-side results: reads come from it, and re-ingest or delete invalidate it."""

from __future__ import annotations

import json

import pytest

from deltalens.backend import results
from deltalens.backend.catalog import Catalog, ResultCache
from deltalens.backend.errors import ApiError
from deltalens.worker.analyses import Options, run_analysis
from deltalens.worker.store import write_artifact


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, family_pair, llama_series):
    """Two different pair artifacts, each stored under the same analysis id 'a1'."""
    root = tmp_path_factory.mktemp("cache")
    base, target = family_pair("llama")
    first = run_analysis("pair", [str(base), str(target)], Options(taus=[1e-5], device="cpu"))
    second = run_analysis(
        "pair", [str(llama_series[0]), str(llama_series[-1])], Options(taus=[1e-5], device="cpu")
    )
    write_artifact(first, root / "first.duckdb", "a1")
    write_artifact(second, root / "second.duckdb", "a1")
    return root / "first.duckdb", root / "second.duckdb", first, second


def expected_changed(engine, edge: int | None = None) -> dict:
    out = {}
    for d in engine.details:
        key = (d["row"]["layer"], d["row"]["matrix"])
        out[key] = out.get(key, 0) + sum(d["hist_abs"][1 if edge is None else edge + 2 :])
    return out


def grid(h: dict) -> dict:
    return {
        (layer, m): h["changed"][i][j]
        for i, layer in enumerate(h["layers"])
        for j, m in enumerate(h["matrices"])
        if h["changed"][i][j] is not None
    }


def test_reingest_and_delete_invalidate(tmp_path, artifacts):
    first_db, second_db, first, second = artifacts
    assert expected_changed(first) != expected_changed(second)
    catalog = Catalog(tmp_path / "catalog.duckdb")
    try:
        catalog.add_job("a1", "pair", ["b", "t"], [1e-5], False, True)
        catalog.ingest("a1", first_db)
        name = "model.layers.1.self_attn.q_proj.weight"
        h = results.heatmap(catalog, "a1", "sparsity", 0.0, "abs")
        assert grid(h) == expected_changed(first)
        detail = results.tensor_detail(catalog, "a1", name)
        hits = catalog.cache.hits
        assert grid(results.heatmap(catalog, "a1", "changed_share", 0.0, "abs")) == grid(h)
        assert results.tensor_detail(catalog, "a1", name) == detail
        assert catalog.cache.get(("a1", "tensor", name)) == detail  # kept, and served as is
        assert catalog.cache.hits > hits  # served from the cache

        catalog.ingest("a1", second_db)  # the same id, other rows: nothing of the first may be served
        assert grid(results.heatmap(catalog, "a1", "sparsity", 0.0, "abs")) == expected_changed(second)
        d2 = next(d for d in second.details if d["name"] == name)
        assert json.loads(results.tensor_detail(catalog, "a1", name))["histograms"]["abs"] == d2["hist_abs"]

        catalog.delete_job("a1")
        assert catalog.cache.bytes == 0
        for read in (
            lambda: results.heatmap(catalog, "a1", "sparsity", 0.0, "abs"),
            lambda: results.tensor_detail(catalog, "a1", name),
        ):
            with pytest.raises(ApiError) as e:
                read()
            assert e.value.status == 404
    finally:
        catalog.close()


def test_a_value_read_before_an_invalidation_is_not_kept():
    cache = ResultCache(max_bytes=1000)
    version = cache.version("a")
    cache.invalidate("a")  # e.g. re-ingested while the reader was computing from the old rows
    cache.put(("a", "x"), "stale", 10, version)
    assert cache.get(("a", "x")) is None
    cache.put(("a", "x"), "fresh", 10, cache.version("a"))
    assert cache.get(("a", "x")) == "fresh"


def test_bounded_in_bytes_least_recently_used_first():
    cache = ResultCache(max_bytes=100)
    for i in range(5):
        cache.put((f"a{i}", "x"), i, 30, 0)
    assert cache.bytes <= 100
    assert cache.get(("a0", "x")) is None and cache.get(("a4", "x")) == 4


def _overlap_from_document(doc: dict) -> dict:
    """What the overlap view was when it was derived from the result document (the reference)."""
    per_layer: dict = {}
    for t in doc["tensors"]:
        layer = per_layer.setdefault(
            t["layer"],
            {
                "layer": t["layer"],
                "numel": 0,
                "changed": [0] * len(doc["runs"]),
                "both": [0] * len(t["pairs"]),
            },
        )
        layer["numel"] += t["numel"]
        layer["changed"] = [a + b for a, b in zip(layer["changed"], t["changed"])]
        layer["both"] = [a + p["both"] for a, p in zip(layer["both"], t["pairs"])]
    layers = sorted(per_layer.values(), key=lambda r: (r["layer"] is None, r["layer"] or 0))
    return {"runs": doc["runs"], "tau": doc["tau"], "summary": doc["summary"], "layers": layers}


@pytest.mark.parametrize("runs", [2, 4])
def test_series_and_overlap_are_read_from_their_tables(tmp_path, llama_series, runs):
    """The series and overlap views come from the stored tables, with the document's numbers exactly."""
    paths = [str(p) for p in llama_series]
    series = run_analysis("series", paths, Options(taus=[1e-4], device="cpu"))
    overlap = run_analysis("overlap", paths[: runs + 1], Options(taus=[1e-4], device="cpu"))
    artifact = tmp_path / "results.duckdb"
    write_artifact(series, artifact, "s1")
    write_artifact(overlap, artifact, "o1")
    catalog = Catalog(tmp_path / "catalog.duckdb")
    try:
        for aid, kind in (("s1", "series"), ("o1", "overlap")):
            catalog.add_job(aid, kind, ["b", "t"], [1e-4], False, True)
            catalog.ingest(aid, artifact)
        doc = series.document
        got = results.series(catalog, "s1")
        keys = ("checkpoints", "tau", "numel", "steps", "categories")  # same order, same numbers
        assert json.dumps({k: got[k] for k in keys}) == json.dumps({k: doc[k] for k in keys})
        got = results.overlap(catalog, "o1")
        expected = _overlap_from_document(overlap.document)
        assert json.dumps(got["layers"]) == json.dumps(expected["layers"])
        assert (got["runs"], got["tau"]) == (expected["runs"], expected["tau"])
        for key in ("numel", "changed", "venn"):  # the issue-13 statistics: tests/test_overlap_stats.py
            assert got["summary"].get(key) == expected["summary"].get(key), key
        assert ("venn" in got["summary"]) == (runs <= 3)
        with pytest.raises(ApiError) as e:
            results.overlap(catalog, "s1")
        assert e.value.code == "wrong_kind"
    finally:
        catalog.close()
