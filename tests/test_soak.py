"""Fault loops (docs/ARCHITECTURE.md invariant 5) with figures: SIGKILLs of the worker at random
points, Redis killed with jobs queued, the API killed during an upload and during ingestion, the
data volume full during an upload. Every run must end with each job done exactly once, with the
engine's exact numbers, and nothing partial visible at any time.

`make test` runs a few rounds of each but the random-point SIGKILLs (marked `reliability`);
`make reliability` (DELTALENS_SOAK=1) runs 20 worker kills and 5 of every other fault.
Figures: test-output/reliability/soak_*.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file
from service import Api, Redis, Worker, running, service_env, wait_done, wait_for

from deltalens.worker.analyses import Options, run_analysis

SOAK = os.environ.get("DELTALENS_SOAK") == "1"
RUNS = {
    "worker_kill": 20 if SOAK else 1,
    "redis_restart": 5 if SOAK else 1,
    "api_upload": 5 if SOAK else 1,
    "api_ingest": 5 if SOAK else 1,
    "disk_full": 1,
}
LAYERS, SIZE = 12, 1024
FIGURES = Path(__file__).resolve().parents[1] / "test-output" / "reliability"
rng = random.Random(20261122)


def record(name: str, rows: list[dict], **extra) -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / f"soak_{name}.json").write_text(
        json.dumps({"runs": len(rows), **extra, "rows": rows}, indent=1)
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A bf16 pair (12 x 1024², with rank: a couple of seconds per analysis) and the engine's own answer."""
    root = tmp_path_factory.mktemp("soak-pair")
    g = torch.Generator().manual_seed(1)
    base = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(SIZE, SIZE, generator=g).bfloat16()
        for i in range(LAYERS)
    }
    target = {
        k: (
            v.float() + 1e-2 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
        ).bfloat16()
        for k, v in base.items()
    }
    for name, state in (("base", base), ("target", target)):
        (root / name).mkdir()
        save_file(state, root / name / "model.safetensors")
    paths = [root / "base", root / "target"]
    expected = run_analysis("pair", [str(p) for p in paths], Options(device="cpu")).document
    return paths, expected


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pair):
    root = tmp_path_factory.mktemp("soak")
    redis = Redis(root / "redis").start()
    env = service_env(
        root / "data",
        f"{redis.url}/0",
        f"{redis.url}/1",
        "soak",
        [pair[0][0].parent],
        DELTALENS_MAX_ATTEMPTS="3",
        DELTALENS_TASK_TIME_LIMIT="600",
    )
    api = Api(env, root / "api.log").start()
    client = httpx.Client(base_url=api.url, timeout=30)
    ids = [client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in pair[0]]
    yield {"redis": redis, "env": env, "api": api, "client": client, "ids": ids, "root": root}
    client.close()
    api.stop()
    redis.stop()


def exactly_the_engines(client: httpx.Client, aid: str, expected: dict) -> bool:
    """The published result is the engine's, and the catalog holds each tensor once (a duplicated or
    missing row would change the heatmap's parameter total)."""
    doc = client.get(f"/api/analyses/{aid}/result").json()
    heat = client.get(f"/api/analyses/{aid}/heatmap", params={"metric": "sparsity", "tau": 1e-5}).json()
    total = sum(n for row in heat["numel"] for n in row if n)
    return doc["tensors"] == expected["tensors"] and total == expected["summary"]["numel"]


def watch_for_partial(client: httpx.Client, aid: str, stop: threading.Event, seen: list) -> None:
    """Until stop: the result is either 409 (not ready) or complete — never anything in between."""
    while not stop.is_set():
        try:
            r = client.get(f"/api/analyses/{aid}/result")
            if r.status_code == 200 and len(r.json()["tensors"]) != LAYERS:
                seen.append(len(r.json()["tensors"]))
            elif r.status_code not in (200, 409):
                seen.append(r.status_code)
        except httpx.TransportError:
            pass  # the API itself may be down in some loops
        time.sleep(0.05)


def _submit_and_wait_running(client: httpx.Client, ids: list[str]) -> tuple[str, float]:
    aid = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids}).json()["id"]
    wait_for(
        lambda: client.get(f"/api/analyses/{aid}").json()["status"] in ("running", "done"),
        60,
        0.02,
        what="the worker to start the analysis",
    )
    return aid, time.monotonic()


@pytest.mark.reliability
def test_worker_sigkilled_at_random_points(stack, pair):
    """Each kill lands at a uniformly random moment of a running analysis (runs where the analysis
    beat the kill still have to be exact, but do not count towards the number of kills)."""
    client, expected = stack["client"], pair[1]
    rows = []
    with running(Worker(stack["env"], stack["root"] / "worker.log")) as (worker,):
        spans = []
        for _ in range(2):  # warm: how long an analysis runs once the worker has it
            aid, started = _submit_and_wait_running(client, stack["ids"])
            assert wait_done(client, aid)["status"] == "done"
            spans.append(time.monotonic() - started)
        span = min(spans)
        for run in range(2 * RUNS["worker_kill"]):
            if sum(r["landed"] for r in rows) == RUNS["worker_kill"]:
                break
            stop, partial = threading.Event(), []
            aid, started = _submit_and_wait_running(client, stack["ids"])
            watcher = threading.Thread(
                target=watch_for_partial, args=(httpx.Client(base_url=client.base_url), aid, stop, partial)
            )
            watcher.start()
            time.sleep(max(0.0, rng.uniform(0, span) - (time.monotonic() - started)))
            at = client.get(f"/api/analyses/{aid}").json()
            worker.kill_pool()
            t0 = time.monotonic()
            status = wait_done(client, aid, 300)
            stop.set()
            watcher.join()
            rows.append(
                {
                    "run": run,
                    "kill_after_s": round(t0 - started, 2),
                    "status_at_kill": at["status"],
                    "tensors_done_at_kill": (at["detail"] or {}).get("tensors_done"),
                    # the kill hit the task (not an idle pool) exactly when the task had to start again
                    "landed": (status["detail"] or {}).get("attempts") == 2,
                    "outcome": status["status"],
                    "recovered_s": round(time.monotonic() - t0, 2),
                    "exact": status["status"] == "done" and exactly_the_engines(client, aid, expected),
                    "partial_seen": partial,
                }
            )
    record(
        "worker_kill", rows, running_span_s=round(span, 2), kills_mid_analysis=sum(r["landed"] for r in rows)
    )
    assert sum(r["landed"] for r in rows) == RUNS["worker_kill"], rows
    assert all(r["outcome"] == "done" and r["exact"] and not r["partial_seen"] for r in rows), rows


def test_redis_killed_with_jobs_queued(stack, pair):
    client, redis, rows = stack["client"], stack["redis"], []
    for run in range(RUNS["redis_restart"]):
        ids = [
            client.post(
                "/api/analyses", json={"kind": "pair", "checkpoints": stack["ids"], "rank": False}
            ).json()["id"]
            for _ in range(3)
        ]
        assert all(client.get(f"/api/analyses/{a}").json()["status"] == "queued" for a in ids)
        redis.proc.kill()  # SIGKILL: the AOF (fsync always) is all that survives
        redis.proc.wait(10)
        redis.start()
        with running(Worker(stack["env"], stack["root"] / "worker-redis.log")):
            outcomes = [wait_done(client, a, 180)["status"] for a in ids]
        rows.append(
            {
                "run": run,
                "jobs": len(ids),
                "done": outcomes.count("done"),
                "exact": all(
                    _summary_without_rank(client, a, pair[1]) and _rows_once(client, a, pair[1]) for a in ids
                ),
            }
        )
    record("redis_restart", rows)
    assert all(r["done"] == r["jobs"] and r["exact"] for r in rows), rows


def _summary_without_rank(client, aid, expected) -> bool:
    got = client.get(f"/api/analyses/{aid}/result").json()["summary"]
    return got["changed"] == expected["summary"]["changed"] and got["numel"] == expected["summary"]["numel"]


def _upload_with_api_kill(client: httpx.Client, api: Api, path: Path, chunk: int) -> dict:
    """Upload `path` in chunks; SIGKILL the API while a chunk is on the wire; restart; resume; complete."""
    size = path.stat().st_size
    sid = client.post(
        "/api/uploads", json={"name": "soak", "files": [{"name": path.name, "size": size}]}
    ).json()["id"]
    kill_at = rng.randrange(1, size // chunk)
    offset, sent, interrupted, resumed = 0, 0, None, None
    with open(path, "rb") as f:
        while offset < size:
            f.seek(offset)
            if sent == kill_at:
                threading.Timer(rng.uniform(0, 0.01), api.proc.kill).start()
            sent += 1
            try:
                r = client.put(
                    f"/api/uploads/{sid}/files/{path.name}", params={"offset": offset}, content=f.read(chunk)
                )
                offset = r.json()["received"]
            except httpx.TransportError:  # the API died under us: restart it and ask where to resume
                interrupted = offset
                api.proc.wait(10)
                api.start()
                offset = resumed = client.get(f"/api/uploads/{sid}").json()["files"][0]["received"]
    if interrupted is None:  # the kill landed after the last chunk: it is restarted before completion
        api.proc.wait(10)
        api.start()
    r = client.post(f"/api/uploads/{sid}/complete")
    return {
        "status": r.status_code,
        "id": r.json().get("id"),
        "chunk_in_flight_at": interrupted,
        "resumed_from": resumed,
    }


def test_api_killed_during_upload_resumes(stack, pair):
    client, api, rows = stack["client"], stack["api"], []
    path = pair[0][1] / "model.safetensors"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for run in range(RUNS["api_upload"]):
        out = _upload_with_api_kill(client, api, path, 1 << 20)
        files = client.get(f"/api/checkpoints/{out['id']}").json()["files"] if out["status"] == 201 else []
        same = [c for c in client.get("/api/checkpoints").json() if c["id"] == out["id"]]
        rows.append(
            {
                "run": run,
                **out,
                "sha256_matches": bool(files) and files[0]["sha256"] == digest,
                "registered_once": len(same) == 1,
            }
        )
    record("api_upload", rows, bytes=path.stat().st_size)
    assert all(r["status"] == 201 and r["sha256_matches"] and r["registered_once"] for r in rows), rows


def test_api_killed_during_ingestion(stack, pair):
    """A failpoint SIGKILLs the API inside the ingest transaction (after some of the result tables
    are written); the restarted API ingests the artifact again, once and completely."""
    client, api, rows = stack["client"], stack["api"], []
    normal_env = api.env
    with running(Worker(stack["env"], stack["root"] / "worker-ingest.log")):
        for run in range(RUNS["api_ingest"]):
            api.stop()
            api.env = {**normal_env, "DELTALENS_FAILPOINT": "ingest"}
            api.start()
            aid = client.post(
                "/api/analyses", json={"kind": "pair", "checkpoints": stack["ids"], "rank": False}
            ).json()["id"]
            died = wait_for(lambda: api.proc.poll() is not None, 120, what="the API to die inside ingestion")
            api.env = normal_env
            api.start()
            status = wait_done(client, aid, 120)
            rows.append(
                {
                    "run": run,
                    "api_died_in_ingest": bool(died),
                    "outcome": status["status"],
                    "exact": status["status"] == "done"
                    and _summary_without_rank(client, aid, pair[1])
                    and _rows_once(client, aid, pair[1]),
                }
            )
    record("api_ingest", rows)
    assert all(r["api_died_in_ingest"] and r["outcome"] == "done" and r["exact"] for r in rows), rows


def _rows_once(client, aid, expected) -> bool:
    heat = client.get(f"/api/analyses/{aid}/heatmap", params={"metric": "sparsity", "tau": 1e-5}).json()
    return sum(n for row in heat["numel"] for n in row if n) == expected["summary"]["numel"]


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )


def test_disk_full_during_upload(tmp_path, pair):
    """The data volume is a 48 MiB tmpfs: an upload that cannot fit is refused up front; one that
    runs out of space mid-way ends in 507 with nothing registered, and resumes once space is freed."""
    volume = tmp_path / "volume"
    if not _mount_tmpfs(volume, "48m"):
        pytest.skip("needs root to mount a small tmpfs as the data volume")
    try:
        redis = Redis(tmp_path / "redis")
        with running(redis):
            env = service_env(volume / "data", f"{redis.url}/0", f"{redis.url}/1", "full", [tmp_path])
            with (
                running(Api(env, tmp_path / "api.log")) as (api,),
                httpx.Client(base_url=api.url, timeout=30) as client,
            ):
                path = pair[0][1] / "model.safetensors"  # 24 MiB
                size = path.stat().st_size
                too_big = client.post(
                    "/api/uploads", json={"files": [{"name": "model.safetensors", "size": 10 * size}]}
                )
                sid = client.post(
                    "/api/uploads", json={"files": [{"name": "model.safetensors", "size": size}]}
                ).json()["id"]
                ballast = volume / "ballast"
                free = shutil.disk_usage(volume).free
                ballast.write_bytes(bytes(free - size // 2))  # someone else filled the disk meanwhile
                with open(path, "rb") as f:
                    full = client.put(f"/api/uploads/{sid}/files/model.safetensors", content=f.read())
                received = client.get(f"/api/uploads/{sid}").json()["files"][0]["received"]
                before = client.get("/api/checkpoints").json()
                incomplete = client.post(f"/api/uploads/{sid}/complete")
                ballast.unlink()
                with open(path, "rb") as f:
                    f.seek(received)
                    resumed = client.put(
                        f"/api/uploads/{sid}/files/model.safetensors",
                        params={"offset": received},
                        content=f.read(),
                    )
                done = client.post(f"/api/uploads/{sid}/complete")
                files = client.get(f"/api/checkpoints/{done.json()['id']}").json()["files"]
        row = {
            "refused_up_front": too_big.status_code,
            "refused_up_front_message": too_big.json()["message"],
            "mid_upload": full.status_code,
            "mid_upload_message": full.json()["message"],
            "received_after_failure": received,
            "checkpoints_registered_while_full": len(before),
            "complete_while_incomplete": incomplete.status_code,
            "resumed": resumed.status_code,
            "completed": done.status_code,
            "sha256_matches": files[0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        record("disk_full", [row])
        assert too_big.status_code == 507 and too_big.json()["code"] == "disk_full"
        assert (
            full.status_code == 507
            and full.json()["code"] == "disk_full"
            and "resume from byte" in full.json()["message"]
        )
        assert before == [] and incomplete.status_code == 409 and 0 <= received < size
        assert resumed.status_code == 200 and done.status_code == 201 and row["sha256_matches"]
    finally:
        subprocess.run(["umount", "-l", str(volume)], capture_output=True)
