"""The service end to end: real redis-server, a real Celery worker process, uvicorn — over HTTP."""

from __future__ import annotations

import hashlib
import json
import struct

import httpx
import pytest
from service import hosted, wait_done, wait_for

from deltalens.worker.analyses import Options, run_analysis
from deltalens.worker.contract import BIN_EDGES, changed_from_histogram, nearest_edge_index

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, family_pair, llama_series):
    root = tmp_path_factory.mktemp("stack")
    roots = [family_pair("llama")[0].parent, llama_series[0].parent]
    with hosted(root, "test", roots, token=TOKEN, timeout=30, DELTALENS_MAX_UPLOAD_BYTES=str(8 << 20)) as s:
        yield s.client, root / "data"


def register(client, path) -> str:
    r = client.post("/api/checkpoints", json={"path": str(path)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def analyse(client, kind, ids, **extra) -> dict:
    r = client.post("/api/analyses", json={"kind": kind, "checkpoints": ids, **extra})
    assert r.status_code == 202, r.text
    status = wait_done(client, r.json()["id"])
    assert status["status"] == "done", status
    return status


@pytest.fixture(scope="module")
def pair(stack, family_pair):
    client, _ = stack
    base, target = family_pair("llama")
    ids = [register(client, base), register(client, target)]
    status = analyse(client, "pair", ids, taus=[1e-5, 1e-3])
    engine = run_analysis("pair", [str(base), str(target)], Options(taus=[1e-5, 1e-3], device="cpu"))
    return status["id"], engine, ids


def test_pair_result_is_the_engines(stack, pair):
    client, _ = stack
    aid, engine, _ = pair
    doc = client.get(f"/api/analyses/{aid}/result").json()
    assert doc["summary"] == engine.document["summary"]
    assert doc["tensors"] == engine.document["tensors"]
    status = client.get(f"/api/analyses/{aid}").json()
    assert set(status) >= {"id", "kind", "status", "progress", "error"}
    assert (status["kind"], status["status"], status["progress"], status["error"]) == (
        "pair",
        "done",
        1.0,
        None,
    )
    assert any(a["id"] == aid for a in client.get("/api/analyses").json())


def test_heatmap_and_curve_come_from_the_histograms(stack, pair):
    client, _ = stack
    aid, engine, _ = pair
    for tau in (1e-5, 3e-4, 0.0):
        h = client.get(f"/api/analyses/{aid}/heatmap", params={"metric": "sparsity", "tau": tau}).json()
        edge = nearest_edge_index(tau) if tau else None
        expected = {}
        for d in engine.details:
            key = (d["row"]["layer"], d["row"]["matrix"])
            c = sum(d["hist_abs"][1:]) if edge is None else changed_from_histogram(d["hist_abs"], edge)
            expected[key] = [a + b for a, b in zip(expected.get(key, [0, 0]), [c, d["row"]["numel"]])]
        for i, layer in enumerate(h["layers"]):
            for j, matrix in enumerate(h["matrices"]):
                if (layer, matrix) in expected:
                    c, n = expected[(layer, matrix)]
                    assert h["changed"][i][j] == c and h["numel"][i][j] == n
                    assert h["values"][i][j] == pytest.approx(1 - c / n)
        assert h["tau"] == (BIN_EDGES[edge] if edge is not None else 0.0)
    for metric in ("changed_share", "rank_pct", "effective_rank", "relative_change", "mean_abs_delta"):
        r = client.get(f"/api/analyses/{aid}/heatmap", params={"metric": metric, "tau": 1e-4})
        assert r.status_code == 200 and any(v is not None for row in r.json()["values"] for v in row)
    # effective rank as a share of full rank, averaged over each cell's matrices (as the dashboard shows it)
    shares: dict = {}
    for t in client.get(f"/api/analyses/{aid}/tensors").json():
        if t.get("full_rank"):
            shares.setdefault((t["layer"], t["matrix"]), []).append(t["effective_rank"] / t["full_rank"])
    assert shares
    h = client.get(f"/api/analyses/{aid}/heatmap", params={"metric": "effective_rank"}).json()
    for (layer, matrix), got in shares.items():
        value = h["values"][h["layers"].index(layer)][h["matrices"].index(matrix)]
        assert 0 < value <= 1 and value == pytest.approx(sum(got) / len(got))
    curve = client.get(f"/api/analyses/{aid}/sparsity-curve").json()
    assert len(curve["tau"]) == len(curve["sparsity"]) == len(BIN_EDGES)
    assert all(a <= b + 1e-12 for a, b in zip(curve["sparsity"], curve["sparsity"][1:]))  # grows with τ


def test_tensor_detail(stack, pair):
    client, _ = stack
    aid, engine, _ = pair
    d = next(x for x in engine.details if x["name"] == "model.layers.1.self_attn.q_proj.weight")
    got = client.get(f"/api/analyses/{aid}/tensors/model.layers.1.self_attn.q_proj.weight").json()
    assert got["histograms"]["abs"] == d["hist_abs"] and got["histograms"]["rel"] == d["hist_rel"]
    assert got["rank"] == d["rank"] and got["spectrum"]["sigma"] == pytest.approx(d["spectrum"][1])
    assert got["update_map"]["cells"] == pytest.approx(d["update_map"]["cells"])
    assert got["update_map"]["head_frac"] == pytest.approx(d["update_map"]["head_frac"])
    assert client.get(f"/api/analyses/{aid}/tensors/no.such.tensor").status_code == 404


def test_series_overlap_and_compare(stack, llama_series, pair):
    client, _ = stack
    ids = [register(client, p) for p in llama_series]
    series = analyse(client, "series", ids)
    engine = run_analysis("series", [str(p) for p in llama_series], Options(device="cpu")).document
    got = client.get(f"/api/analyses/{series['id']}/series").json()
    assert got["steps"] == engine["steps"] and got["categories"] == engine["categories"]
    overlap = analyse(client, "overlap", ids[:4], taus=[1e-4])
    engine = run_analysis(
        "overlap", [str(p) for p in llama_series[:4]], Options(taus=[1e-4], device="cpu")
    ).document
    got = client.get(f"/api/analyses/{overlap['id']}/overlap").json()
    assert _legacy(got["summary"]) == _legacy(engine["summary"])  # issue-13 statistics: test_overlap_stats
    assert sum(layer["numel"] for layer in got["layers"]) == engine["summary"]["numel"]
    assert sum(layer["both"][0] for layer in got["layers"]) == engine["summary"]["pairs"][0]["both"]
    # compare two pair analyses side by side
    other = analyse(client, "pair", [ids[0], ids[-1]])
    cmp = client.get("/api/compare", params={"ids": f"{pair[0]},{other['id']}", "tau": 1e-5}).json()
    assert [a["analysis"] for a in cmp["analyses"]] == [pair[0], other["id"]]
    assert all(0 <= a["sparsity"] <= 1 and a["layers"] for a in cmp["analyses"])
    assert client.get(f"/api/analyses/{series['id']}/heatmap").json()["code"] == "wrong_kind"


def _chunks(data: bytes, size: int):
    return [(i, data[i : i + size]) for i in range(0, len(data), size)]


def test_chunked_upload_with_a_repeat_and_a_cut(stack, family_pair, pair):
    client, data_dir = stack
    base, _ = family_pair("llama")
    files = sorted(p for p in base.iterdir() if p.suffix in (".safetensors", ".json"))
    r = client.post(
        "/api/uploads",
        json={"name": "llama-base", "files": [{"name": p.name, "size": p.stat().st_size} for p in files]},
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    for p in files:
        content = p.read_bytes()
        chunks = _chunks(content, 7000)
        for n, (offset, chunk) in enumerate(chunks):
            if n == 1:  # a cut: only half the chunk arrives, then the client resumes from the server's count
                client.put(
                    f"/api/uploads/{sid}/files/{p.name}", params={"offset": offset}, content=chunk[:3000]
                )
                received = next(
                    f["received"]
                    for f in client.get(f"/api/uploads/{sid}").json()["files"]
                    if f["name"] == p.name
                )
                assert received == offset + 3000
            r = client.put(f"/api/uploads/{sid}/files/{p.name}", params={"offset": offset}, content=chunk)
            assert r.status_code == 200, r.text
            if n == 2:  # the same chunk sent twice
                assert client.put(
                    f"/api/uploads/{sid}/files/{p.name}", params={"offset": offset}, content=chunk
                ).json()["received"] == offset + len(chunk)
        gap = client.put(
            f"/api/uploads/{sid}/files/{p.name}", params={"offset": len(content) + 10}, content=b"x"
        )
        assert gap.status_code in (409, 413) and set(gap.json()) == {"code", "message"}
    assert client.get(f"/api/uploads/{sid}").json()["complete"]
    r = client.post(f"/api/uploads/{sid}/complete")
    assert r.status_code == 201, r.text
    cid = r.json()["id"]
    checkpoint = client.get(f"/api/checkpoints/{cid}").json()
    digests = {f["name"]: f["sha256"] for f in checkpoint["files"]}
    assert digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert all((data_dir / "blobs" / d).exists() for d in digests.values())
    # the uploaded copy analyses exactly like the original
    aid, engine, ids = pair
    status = analyse(client, "pair", [cid, ids[1]], taus=[1e-5, 1e-3])
    doc = client.get(f"/api/analyses/{status['id']}/result").json()
    assert doc["summary"]["changed"] == engine.document["summary"]["changed"]


def _upload(client, name: str, content: bytes):
    sid = client.post("/api/uploads", json={"files": [{"name": name, "size": len(content)}]}).json()["id"]
    client.put(f"/api/uploads/{sid}/files/{name}", content=content)
    return client.post(f"/api/uploads/{sid}/complete")


def _header(obj) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw


MALFORMED = {
    "truncated": _header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}) + bytes(8),
    "not_json": struct.pack("<Q", 9) + b"{nonsense",
    "header_beyond_file": struct.pack("<Q", 1000) + b"{}",
    "overlap": _header(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }
    )
    + bytes(12),
    "dtype": _header({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}) + bytes(4),
    "shape_bytes": _header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}) + bytes(8),
    "duplicate": (lambda raw: struct.pack("<Q", len(raw)) + raw + bytes(8))(
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_uploads_get_4xx_and_change_nothing(stack, case):
    client, data_dir = stack
    before = (sorted(p.name for p in (data_dir / "blobs").glob("*")), client.get("/api/checkpoints").json())
    r = _upload(client, "model.safetensors", MALFORMED[case])
    assert 400 <= r.status_code < 500 and set(r.json()) == {"code", "message"}, r.text
    assert r.json()["code"] == "invalid_checkpoint" and "model.safetensors" in r.json()["message"]
    assert (
        sorted(p.name for p in (data_dir / "blobs").glob("*")),
        client.get("/api/checkpoints").json(),
    ) == before


def test_refusals(stack, tmp_path):
    client, _ = stack
    r = client.post("/api/uploads", json={"files": [{"name": "pytorch_model.bin", "size": 10}]})
    assert r.status_code == 415 and r.json()["code"] == "pickle_refused"
    r = client.post("/api/uploads", json={"files": [{"name": "model.safetensors", "size": 1 << 30}]})
    assert r.status_code == 413 and r.json()["code"] == "too_large"
    r = client.post("/api/uploads", json={"files": [{"name": "../evil.safetensors", "size": 10}]})
    assert r.status_code == 422 and r.json()["code"] == "invalid_name"
    sid = client.post("/api/uploads", json={"files": [{"name": "model.safetensors", "size": 10}]}).json()[
        "id"
    ]
    r = client.put(f"/api/uploads/{sid}/files/model.safetensors", content=bytes(11))
    assert r.status_code == 413
    assert client.get(f"/api/uploads/{sid}").json()["files"][0]["received"] == 0
    r = client.post("/api/checkpoints", json={"path": str(tmp_path)})
    assert r.status_code == 403 and r.json()["code"] == "path_not_allowed"
    r = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ["nope", "nada"]})
    assert r.status_code == 404 and set(r.json()) == {"code", "message"}
    r = client.post("/api/analyses", json={"kind": "sideways", "checkpoints": []})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"
    r = client.get("/api/analyses/doesnotexist")
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_writes_need_the_token_in_hosted_mode(stack, pair):
    client, _ = stack
    bare = httpx.Client(base_url=str(client.base_url), timeout=10)
    r = bare.post("/api/analyses", json={"kind": "pair", "checkpoints": pair[2]})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert (
        bare.post(
            "/api/checkpoints", json={"path": "/x"}, headers={"Authorization": "Bearer wrong"}
        ).status_code
        == 401
    )
    assert bare.get(f"/api/analyses/{pair[0]}/result").status_code == 200  # reads stay open


def test_short_links_and_delete(stack, pair):
    client, _ = stack
    r = client.post("/api/links", json={"url": f"/analyses/{pair[0]}?view=heatmap&tau=1e-4"})
    assert r.status_code == 201
    code = r.json()["code"]
    follow = client.get(f"/s/{code}", follow_redirects=False)
    assert (
        follow.status_code == 307
        and follow.headers["location"] == f"/analyses/{pair[0]}?view=heatmap&tau=1e-4"
    )
    assert client.post("/api/links", json={"url": "https://elsewhere.example/x"}).status_code == 422
    status = analyse(client, "pair", pair[2])
    assert client.post(f"/api/analyses/{status['id']}/cancel").status_code == 409
    assert client.delete(f"/api/analyses/{status['id']}").status_code == 204
    assert client.get(f"/api/analyses/{status['id']}").status_code == 404
    assert client.get(f"/api/analyses/{status['id']}/result").status_code == 404


def test_openapi_documents_the_api(stack):
    client, _ = stack
    spec = client.get("/openapi.json").json()
    for path in (
        "/api/checkpoints",
        "/api/uploads",
        "/api/analyses",
        "/api/analyses/{aid}/heatmap",
        "/api/compare",
    ):
        assert path in spec["paths"]


@pytest.mark.parametrize("fmt", ["bool", "packed"])
def test_mask_export_matches_numpy(stack, pair, family_pair, fmt):
    import numpy as np
    import reference as ref
    from safetensors.numpy import load as load_safetensors

    client, _ = stack
    base, target = family_pair("llama")
    created = client.post(f"/api/analyses/{pair[0]}/masks", json={"tau": 1e-4, "format": fmt})
    assert created.status_code == 202, created.text
    mid = created.json()["id"]
    job = wait_for(
        lambda: (
            (s := client.get(f"/api/analyses/{pair[0]}/masks/{mid}").json())["status"] in ("done", "failed")
            and s
        ),
        60,
        0.1,
        what="the mask job",
    )
    assert job["status"] == "done", job
    r = client.get(job["file"])
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content) == job["size"]
    masks = load_safetensors(r.content)
    b, t = ref.load(base), ref.load(target)
    assert set(masks) == set(b)
    for name, stored in masks.items():
        expected = np.abs(t[name] - b[name]) > 1e-4
        if fmt == "packed":
            stored = (
                np.unpackbits(stored, bitorder="little")[: expected.size].reshape(expected.shape).astype(bool)
            )
        assert np.array_equal(stored, expected), name


def _legacy(summary: dict) -> dict:
    """The overlap figures the view has always carried, exactly (counts, o1/o2, baselines, Venn)."""
    keep = ("a", "b", "both", "o1", "o2", "baseline1", "baseline2", "jaccard")
    return {
        "numel": summary["numel"],
        "changed": summary["changed"],
        "venn": summary.get("venn"),
        "pairs": [{k: p.get(k) for k in keep} for p in summary["pairs"]],
    }
