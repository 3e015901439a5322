"""Benchmark: dashboard reads under load, and at catalog scale — over HTTP against uvicorn.

    python bench/load.py [--readers 50] [--duration 30] [--analyses 100] [--out bench/.data/load.json]

1. Readers under load. Starts a real redis-server, a real Celery worker and the API (uvicorn) on
   loopback, registers tiny Llama-shaped bf16 checkpoints (transformers `save_pretrained`), runs a
   few pair analyses, then lets `--readers` simulated people use the dashboard for `--duration`
   seconds: each one loops over [GET /api/analyses/{id}/heatmap with a random metric, τ and mode
   (70 %), or GET /api/analyses/{id}/tensors/{name} of a random matrix (30 %)], then thinks for
   0.5–1.0 s (uniform; a person clicking a cell or dragging the τ slider). Meanwhile a submitter
   keeps up to two new pair analyses queued, so the worker keeps computing and the API keeps
   ingesting their artifacts into the catalog during the whole window; readers read the finished
   ones, freshly ingested ones included. Reports requests, errors, p50/p95/p99 latency.
2. Dashboard speed at catalog scale. One real 32-layer pair analysis (engine `run_analysis` on a
   narrow 32-layer Llama-shaped bf16 pair) is written as an artifact (`worker.store`) under 100
   analysis ids and each ingested through `backend.catalog.Catalog.ingest` (the API's own ingest
   path). The API then serves that catalog; heatmap and tensor-detail latency are measured
   sequentially (first read of each analysis, then random reads) and with a few concurrent
   clients (no think time).

Latencies are client-side (request sent -> body read) on loopback; every process shares this
machine's cores, the load generator included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from service import Api, Redis, Worker, running, service_env, wait_done  # noqa: E402

METRICS = ("sparsity", "changed_share", "rank_pct", "effective_rank", "relative_change", "mean_abs_delta")
TAUS = (0.0, 1e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 1e-3, 1e-2)
THINK = (0.5, 1.0)  # seconds between one reader's requests (uniform)


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    s = sorted(xs)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1000  # noqa: E731
    return {
        "n": len(s),
        "p50_ms": round(pick(0.50), 2),
        "p95_ms": round(pick(0.95), 2),
        "p99_ms": round(pick(0.99), 2),
        "max_ms": round(s[-1] * 1000, 2),
    }


def llama_checkpoints(root: Path, layers: int, hidden: int, targets: int, vocab: int = 1024) -> list[Path]:
    """[base, target1, ...]: a random Llama in bf16 and copies where ~20 % of the weights moved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 3,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).to(torch.bfloat16)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = [root / "base"]
    model.save_pretrained(paths[0])
    g = torch.Generator().manual_seed(1)
    for i in range(targets):
        model.load_state_dict(base_state)
        with torch.no_grad():
            for p in model.parameters():
                share = 0.2 * (i + 1) / targets
                scale = 10 ** (torch.rand(p.shape, generator=g) * 5 - 6)
                p.add_(
                    (
                        torch.randn(p.shape, generator=g) * scale * (torch.rand(p.shape, generator=g) < share)
                    ).to(p.dtype)
                )
        paths.append(root / f"target{i + 1}")
        model.save_pretrained(paths[-1])
    return paths


def random_read(analyses: list[str], names: list[str], rng: random.Random) -> tuple[str, str, dict]:
    aid = rng.choice(analyses)
    if rng.random() < 0.7:
        return (
            "heatmap",
            f"/api/analyses/{aid}/heatmap",
            {"metric": rng.choice(METRICS), "tau": rng.choice(TAUS), "mode": rng.choice(("abs", "rel"))},
        )
    return "tensor", f"/api/analyses/{aid}/tensors/{rng.choice(names)}", {}


# --- 1. readers under load -------------------------------------------------------------------
async def load_window(
    url: str, ids: list[str], analyses: list[str], names: list[str], readers: int, duration: float
) -> dict:
    samples: dict[str, list[float]] = {"heatmap": [], "tensor": []}
    errors: list[str] = []
    ingested: list[str] = []
    limits = httpx.Limits(max_connections=readers + 8, max_keepalive_connections=readers + 8)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        deadline = time.monotonic() + duration

        async def reader(seed: int) -> None:
            rng = random.Random(seed)
            await asyncio.sleep(rng.uniform(0, THINK[1]))  # people do not all click at once
            while time.monotonic() < deadline:
                kind, path, params = random_read(analyses, names, rng)
                start = time.perf_counter()
                try:
                    r = await client.get(path, params=params)
                    elapsed = time.perf_counter() - start
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {path}: {r.text[:120]}")
                    else:
                        samples[kind].append(elapsed)
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__} {path}")
                await asyncio.sleep(rng.uniform(*THINK))

        async def submitter() -> None:
            """Keep two analyses queued or running; make finished ones readable at once."""
            rng, inflight = random.Random(99), []
            while time.monotonic() < deadline:
                while len(inflight) < 2:
                    pair = [ids[0], rng.choice(ids[1:])] if rng.random() < 0.7 else rng.sample(ids[1:], 2)
                    r = await client.post(
                        "/api/analyses", json={"kind": "pair", "checkpoints": pair, "taus": [1e-5, 1e-3]}
                    )
                    r.raise_for_status()
                    inflight.append(r.json()["id"])
                await asyncio.sleep(0.3)
                for aid in list(inflight):
                    status = (await client.get(f"/api/analyses/{aid}")).json()["status"]
                    if status == "done":
                        analyses.append(aid)
                        ingested.append(aid)
                    if status in ("done", "failed", "cancelled"):
                        inflight.remove(aid)

        started = time.monotonic()
        await asyncio.gather(submitter(), *(reader(i) for i in range(readers)))
        wall = time.monotonic() - started
    every = samples["heatmap"] + samples["tensor"]
    total = len(every) + len(errors)
    return {
        "readers": readers,
        "duration_s": round(wall, 1),
        "think_s": list(THINK),
        "requests": total,
        "requests_per_s": round(total / wall, 1),
        "errors": len(errors),
        "error_rate": len(errors) / total if total else None,
        "error_examples": errors[:5],
        "analyses_ingested_during_window": len(ingested),
        "all": percentiles(every),
        "heatmap": percentiles(samples["heatmap"]),
        "tensor": percentiles(samples["tensor"]),
    }


def readers_under_load(tmp: Path, readers: int, duration: float) -> dict:
    paths = llama_checkpoints(tmp / "ckpt", layers=16, hidden=128, targets=3)
    redis = Redis(tmp / "redis")
    with running(redis):
        env = service_env(tmp / "data", f"{redis.url}/0", f"{redis.url}/1", "bench", [tmp / "ckpt"])
        with running(Worker(env, tmp / "worker.log"), Api(env, tmp / "api.log")) as (_, api):
            with httpx.Client(base_url=api.url, timeout=60) as client:
                ids = [client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in paths]
                started = time.perf_counter()
                analyses = []
                for target in ids[1:]:
                    aid = client.post(
                        "/api/analyses",
                        json={"kind": "pair", "checkpoints": [ids[0], target], "taus": [1e-5, 1e-3]},
                    ).json()["id"]
                    assert wait_done(client, aid, 300)["status"] == "done", aid
                    analyses.append(aid)
                per_analysis = (time.perf_counter() - started) / len(analyses)
                names = [
                    t["name"]
                    for t in client.get(f"/api/analyses/{analyses[0]}/tensors").json()
                    if t["matrix"] in ("q", "k", "v", "o", "gate", "up", "down")
                ]
            out = asyncio.run(load_window(api.url, ids, analyses, names, readers, duration))
    out["model"] = "Llama-shaped, 16 layers, hidden 128, bf16"
    out["seconds_per_analysis_idle"] = round(per_analysis, 2)
    return out


# --- 2. dashboard speed at catalog scale ----------------------------------------------------
def fill_catalog(tmp: Path, count: int) -> tuple[list[str], list[str], dict]:
    import duckdb

    from deltalens.backend.catalog import Catalog
    from deltalens.worker.analyses import Options, run_analysis
    from deltalens.worker.contract import TABLES
    from deltalens.worker.store import write_artifact

    paths = llama_checkpoints(tmp / "ckpt32", layers=32, hidden=64, targets=1, vocab=512)
    started = time.perf_counter()
    result = run_analysis("pair", [str(p) for p in paths], Options(taus=[1e-5, 1e-3], device="cpu"))
    engine_s = time.perf_counter() - started
    data = tmp / "data32"
    (data / "results").mkdir(parents=True)
    catalog = Catalog(data / "catalog.duckdb")
    cids = []
    for p in paths:
        cids.append(f"ck{len(cids)}")
        catalog.add_checkpoint(
            id=cids[-1], name=p.name, source="path", path=str(p), files=[], bytes=0, sha256=None
        )
    # one artifact file holding the analysis under every id (write_artifact keeps earlier analyses in
    # a file; copying the rows in SQL instead of re-inserting them from Python saves ~3 s per id)
    aids = [f"scale{i:03d}" for i in range(count)]
    artifact = data / "results" / "scale.duckdb"
    t0 = time.perf_counter()
    write_artifact(result, artifact, aids[0])
    with duckdb.connect(str(artifact)) as con:
        for table in TABLES:
            con.execute(
                f"INSERT INTO {table} SELECT t.* REPLACE (a.id AS analysis_id) FROM {table} t "
                f"CROSS JOIN (SELECT unnest(?) AS id) a WHERE t.analysis_id = ?",
                [aids[1:], aids[0]],
            )
        con.execute("CHECKPOINT")
    write_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for aid in aids:
        catalog.add_job(aid, "pair", cids, [1e-5, 1e-3], False, True)
        catalog.ingest(aid, artifact)
    ingest_s = time.perf_counter() - t1
    rows = catalog.query("SELECT count(*) FROM tensors")[0][0]
    catalog.close()
    names = [
        d["name"] for d in result.details if d["row"]["matrix"] in ("q", "k", "v", "o", "gate", "up", "down")
    ]
    return (
        aids,
        names,
        {
            "analyses": count,
            "layers": 32,
            "tensors_per_analysis": len(result.details),
            "tensor_rows": rows,
            "engine_s": round(engine_s, 2),
            "artifact_write_s": round(write_s, 2),
            "ingest_ms_each": round(ingest_s / count * 1000, 1),
        },
    )


async def closed_loop(url: str, aids: list[str], names: list[str], clients: int, duration: float) -> dict:
    samples: dict[str, list[float]] = {"heatmap": [], "tensor": []}
    errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        deadline = time.monotonic() + duration

        async def one(seed):
            nonlocal errors
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                kind, path, params = random_read(aids, names, rng)
                start = time.perf_counter()
                r = await client.get(path, params=params)
                if r.status_code == 200:
                    samples[kind].append(time.perf_counter() - start)
                else:
                    errors += 1

        await asyncio.gather(*(one(1000 + i) for i in range(clients)))
    n = len(samples["heatmap"]) + len(samples["tensor"])
    return {
        "clients": clients,
        "requests": n + errors,
        "errors": errors,
        "requests_per_s": round(n / duration, 1),
        "heatmap": percentiles(samples["heatmap"]),
        "tensor": percentiles(samples["tensor"]),
    }


def catalog_scale(tmp: Path, count: int, clients: int) -> dict:
    aids, names, info = fill_catalog(tmp, count)
    env = service_env(tmp / "data32", "filesystem://", f"file://{tmp / 'data32' / 'celery'}", "bench", [tmp])
    (tmp / "data32" / "celery").mkdir()
    with running(Api(env, tmp / "api32.log")) as (api,):
        with httpx.Client(base_url=api.url, timeout=60) as client:
            rng = random.Random(7)

            def timed(path, params=None):
                start = time.perf_counter()
                r = client.get(path, params=params)
                elapsed = time.perf_counter() - start
                assert r.status_code == 200, (path, r.status_code, r.text[:200])
                return elapsed

            first_heatmap = [
                timed(f"/api/analyses/{a}/heatmap", {"metric": "sparsity", "tau": 1e-5}) for a in aids
            ]
            first_tensor = [timed(f"/api/analyses/{a}/tensors/{rng.choice(names)}") for a in aids]
            seq = {"heatmap": [], "tensor": []}
            for _ in range(400):
                kind, path, params = random_read(aids, names, rng)
                seq[kind].append(timed(path, params))
        concurrent = asyncio.run(closed_loop(api.url, aids, names, clients, 10))
    return {
        **info,
        "first_read": {"heatmap": percentiles(first_heatmap), "tensor": percentiles(first_tensor)},
        "sequential": {"heatmap": percentiles(seq["heatmap"]), "tensor": percentiles(seq["tensor"])},
        "concurrent": concurrent,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readers", type=int, default=50)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--analyses", type=int, default=100)
    ap.add_argument(
        "--clients", type=int, default=4, help="concurrent clients for the catalog-scale closed loop"
    )
    ap.add_argument("--skip", choices=("load", "scale"), help="leave one measurement out")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / ".data" / "load.json")
    args = ap.parse_args()
    report = {"cpu_cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.skip != "load":
            print(
                f"1. {args.readers} readers for {args.duration:.0f} s while new analyses run and "
                f"are ingested ...",
                file=sys.stderr,
            )
            report["load"] = readers_under_load(tmp, args.readers, args.duration)
        if args.skip != "scale":
            print(f"2. {args.analyses} analyses of a 32-layer model in the catalog ...", file=sys.stderr)
            report["scale"] = catalog_scale(tmp, args.analyses, args.clients)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    rows = []
    if "load" in report:
        ld = report["load"]
        print(
            f"\n1. readers under load: {ld['readers']} readers, think {THINK[0]}-{THINK[1]} s, "
            f"{ld['duration_s']} s, "
            f"{ld['requests']} requests ({ld['requests_per_s']}/s), "
            f"{ld['analyses_ingested_during_window']} analyses "
            f"ingested during the window ({ld['model']}); {report['cpu_cores']} CPU cores"
        )
        print(f"   {'':10} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for k in ("all", "heatmap", "tensor"):
            p = ld[k]
            print(f"   {k:10} {p['n']:6} {p['p50_ms']:8} {p['p95_ms']:8} {p['p99_ms']:8} {p['max_ms']:8}")
        for e in ld["error_examples"]:
            print(f"   error: {e}")
        rows += [
            ("load: requests", ld["requests"], "", ""),
            ("load: error rate", f"{ld['error_rate']:.4f}", "0", ld["errors"] == 0),
            (
                "load: analyses ingested in window",
                ld["analyses_ingested_during_window"],
                ">= 1",
                ld["analyses_ingested_during_window"] >= 1,
            ),
            ("load: p50 ms", ld["all"]["p50_ms"], "", ""),
            ("load: p95 ms", ld["all"]["p95_ms"], "<= 100", ld["all"]["p95_ms"] <= 100),
            ("load: p99 ms", ld["all"]["p99_ms"], "", ""),
        ]
    if "scale" in report:
        sc = report["scale"]
        print(
            f"\n2. catalog scale: {sc['analyses']} analyses x {sc['tensors_per_analysis']} tensors "
            f"({sc['tensor_rows']:,} tensor rows); engine {sc['engine_s']} s once, artifact write "
            f"{sc['artifact_write_s']} s, ingest {sc['ingest_ms_each']} ms per analysis"
        )
        print(f"   {'':28} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for phase, label in (
            ("first_read", "first read of each analysis"),
            ("sequential", "sequential, random"),
            ("concurrent", f"{sc['concurrent']['clients']} concurrent clients"),
        ):
            for k in ("heatmap", "tensor"):
                p = sc[phase][k]
                print(
                    f"   {label + ' ' + k:28.28} {p['n']:6} {p['p50_ms']:8} {p['p95_ms']:8} "
                    f"{p['p99_ms']:8} {p['max_ms']:8}"
                )
        for phase in ("first_read", "sequential", "concurrent"):
            for k in ("heatmap", "tensor"):
                v = sc[phase][k]["p95_ms"]
                rows.append((f"scale: {k} p95 ms ({phase})", v, "< 50", v < 50))
        rows.append(
            ("scale: errors (concurrent)", sc["concurrent"]["errors"], "0", sc["concurrent"]["errors"] == 0)
        )
    print(f"\n{'metric':42} | {'value':>8} | {'target':>7} | met")
    for name, value, target, met in rows:
        print(f"{name:42} | {value!s:>8} | {target:>7} | {'' if met == '' else ('yes' if met else 'NO')}")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
