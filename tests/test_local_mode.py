"""`deltalens up`: the same happy path with no Redis and no Docker (filesystem broker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
from service import ROOT, free_port, wait_done, wait_for

from deltalens.worker.analyses import Options, run_analysis


def test_local_mode_runs_analyses_without_redis(tmp_path, family_pair, llama_series):
    base, target = family_pair("llama")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTALENS_")}
    env.update(DELTALENS_ALLOWED_ROOTS=f"{base.parent}:{llama_series[0].parent}", DELTALENS_DEVICE="cpu")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deltalens.worker.cli",
            "up",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        banner = []  # the worker's log lines may come first
        while len(banner) < 40 and f"http://127.0.0.1:{port}/" not in "".join(banner[-1:]):
            banner.append(proc.stdout.readline())
        assert f"deltalens is up: http://127.0.0.1:{port}/" in banner[-1], banner
        wait_for(
            lambda: httpx.get(url + "/api/health", timeout=2).status_code == 200, 60, what="deltalens up"
        )
        with httpx.Client(base_url=url, timeout=30) as client:
            ids = [
                client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in (base, target)
            ]
            aid = client.post(
                "/api/analyses", json={"kind": "pair", "checkpoints": ids, "taus": [1e-5]}
            ).json()["id"]
            assert wait_done(client, aid, 120)["status"] == "done"
            engine = run_analysis(
                "pair", [str(base), str(target)], Options(taus=[1e-5], device="cpu")
            ).document
            assert client.get(f"/api/analyses/{aid}/result").json()["summary"] == engine["summary"]
            series_ids = [
                client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in llama_series
            ]
            sid = client.post("/api/analyses", json={"kind": "series", "checkpoints": series_ids}).json()[
                "id"
            ]
            assert wait_done(client, sid, 120)["status"] == "done"
            heat = client.get(f"/api/analyses/{aid}/heatmap").json()
            assert heat["layers"] and heat["matrices"]
        assert not (tmp_path / "data" / "redis").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0 or proc.returncode == -signal.SIGTERM
