"""Jobs survive faults: a worker killed mid-analysis, a Redis restart with a job queued."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import save_file
from service import Api, Redis, Worker, running, service_env, wait_done, wait_for

LAYERS, SIZE = 24, 1024


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory):
    """A bf16 pair big enough (24 x 1024², with rank) that an analysis takes a few seconds."""
    root = tmp_path_factory.mktemp("slow")
    g = torch.Generator().manual_seed(0)
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
    return root / "base", root / "target"


@pytest.fixture
def stack(tmp_path, slow_pair):
    """redis + API (+ registered slow pair); each test starts the workers it needs."""
    redis = Redis(tmp_path / "redis").start()
    env = service_env(
        tmp_path / "data",
        f"{redis.url}/0",
        f"{redis.url}/1",
        "faults",
        [slow_pair[0].parent],
        DELTALENS_MAX_ATTEMPTS="2",
        DELTALENS_TASK_TIME_LIMIT="600",
    )
    api = Api(env, tmp_path / "api.log").start()
    client = httpx.Client(base_url=api.url, timeout=30)
    ids = [client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in slow_pair]
    yield redis, env, client, ids, tmp_path, api
    client.close()
    api.stop()
    redis.stop()


def _running(client, aid, tensors=2):
    s = client.get(f"/api/analyses/{aid}").json()
    return s["status"] == "running" and (s["detail"] or {}).get("tensors_done", 0) >= tensors and s


def test_killed_worker_process_is_retried_and_finishes(stack):
    redis, env, client, ids, tmp, api = stack
    with running(Worker(env, tmp / "worker.log")) as (worker,):
        aid = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids}).json()["id"]
        wait_for(lambda: _running(client, aid), 60, what="the analysis to be under way")
        worker.kill_pool()
        assert client.get(f"/api/analyses/{aid}/result").status_code == 409  # nothing half-done is visible
        status = wait_done(client, aid, 180)
    assert status["status"] == "done", status["error"]
    doc = client.get(f"/api/analyses/{aid}/result").json()
    assert len(doc["tensors"]) == LAYERS and all(t["rank"] is not None for t in doc["tensors"])


def test_attempt_cap_ends_in_failed_with_a_reason(stack):
    redis, env, client, ids, tmp, api = stack
    with running(Worker(env, tmp / "worker.log")) as (worker,):
        aid = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids}).json()["id"]
        for attempt in range(2):  # DELTALENS_MAX_ATTEMPTS=2: two losses, then the third delivery gives up
            wait_for(lambda: _running(client, aid, 1), 60, what=f"attempt {attempt + 1}")
            worker.kill_pool()
            wait_for(
                lambda: (
                    client.get(f"/api/analyses/{aid}").json()["status"] != "running"
                    or (client.get(f"/api/analyses/{aid}").json()["detail"] or {}).get("tensors_done", 99) < 1
                ),
                30,
                what="the retry",
            )
        status = wait_done(client, aid, 120)
    assert status["status"] == "failed" and status["error"]["code"] == "worker_lost", status
    assert "2 attempts" in status["error"]["message"]
    assert client.get(f"/api/analyses/{aid}/result").status_code == 409


@pytest.mark.reliability
def test_whole_worker_killed_then_restarted(stack):
    redis, env, client, ids, tmp, api = stack
    # a killed worker's unacknowledged task comes back after the visibility timeout, which is the
    # task time limit plus a margin: keep both short here
    # (60 s: the analysis itself, without geometry, takes ~10 s on a quiet machine, up to 4× that under load)
    env = {**env, "DELTALENS_TASK_TIME_LIMIT": "60"}
    worker = Worker(env, tmp / "worker.log").start()
    try:
        body = {"kind": "pair", "checkpoints": ids, "geometry": False}
        aid = client.post("/api/analyses", json=body).json()["id"]
        wait_for(lambda: _running(client, aid, 1), 60, what="the analysis to be under way")
    finally:
        worker.kill()
    with running(Worker(env, tmp / "worker2.log")):
        status = wait_done(client, aid, 240)
    assert status["status"] == "done", status["error"]


def test_queued_job_survives_a_redis_restart(stack):
    redis, env, client, ids, tmp, api = stack
    aid = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids, "rank": False}).json()["id"]
    assert client.get(f"/api/analyses/{aid}").json()["status"] == "queued"
    redis.stop()
    redis.start()  # same port and AOF file
    with running(Worker(env, tmp / "worker.log")):
        status = wait_done(client, aid, 120)
    assert status["status"] == "done", status


def test_cancel_stops_a_running_analysis(stack):
    redis, env, client, ids, tmp, api = stack
    with running(Worker(env, tmp / "worker.log")):
        aid = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids}).json()["id"]
        wait_for(lambda: _running(client, aid, 1), 60, what="the analysis to be under way")
        r = client.post(f"/api/analyses/{aid}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        # the worker drops it at the next tensor and is free for the next job
        nxt = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids, "rank": False}).json()[
            "id"
        ]
        assert wait_done(client, nxt, 120)["status"] == "done"
    assert client.get(f"/api/analyses/{aid}").json()["status"] == "cancelled"
    assert client.get(f"/api/analyses/{aid}/result").status_code == 409


def test_api_restart_mid_analysis_loses_nothing(stack):
    redis, env, client, ids, tmp, api = stack
    with running(Worker(env, tmp / "worker.log")):
        aid = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids}).json()["id"]
        wait_for(lambda: _running(client, aid, 1), 60, what="the analysis to be under way")
        api.proc.kill()  # SIGKILL: no shutdown hooks run
        api.proc.wait(10)
        api.start()  # same port, same catalog file
        status = wait_done(client, aid, 120)
    assert status["status"] == "done"
    assert len(client.get(f"/api/analyses/{aid}/result").json()["tensors"]) == LAYERS
