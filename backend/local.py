"""`deltalens up`: the API and one worker on this machine — no Docker, no Redis.

The worker runs the same Celery task as in the hosted deployment; the broker is Kombu's
filesystem transport and task state goes to Celery's file result backend, both in the data dir.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def local_environment(data_dir: Path, env: dict | None = None) -> dict:
    data_dir = data_dir.resolve()
    (data_dir / "celery-results").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env)
    env.update({
        "DELTALENS_DATA_DIR": str(data_dir),
        "DELTALENS_BROKER_URL": "filesystem://",
        "DELTALENS_RESULT_BACKEND": f"file://{data_dir / 'celery-results'}",
        "DELTALENS_QUEUE": env.get("DELTALENS_QUEUE", "local"),
    })
    env.setdefault("DELTALENS_ALLOWED_ROOTS", str(Path.cwd()))
    return env


def _wait_healthy(url: str, procs: list, timeout: float = 60) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        try:
            if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API did not come up at {url}")


def worker_command(queue: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker", "-Q", queue, "--concurrency", "1",
            "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"]


def queue_demo(url: str, demo: Path) -> list[str]:
    """Register a demo folder's checkpoints and queue its analyses, once (skipped when already there)."""
    import httpx
    from worker.demo import demo_analyses
    with httpx.Client(base_url=url, timeout=60) as client:
        known = {c["path"]: c["id"] for c in client.get("/api/checkpoints").json()}
        done = {tuple(a["checkpoints"]) for a in client.get("/api/analyses").json()}
        queued = []
        for title, kind, paths in demo_analyses(demo.resolve()):
            ids = []
            for p in paths:
                if str(p) not in known:
                    r = client.post("/api/checkpoints", json={"path": str(p)})
                    r.raise_for_status()
                    known[str(p)] = r.json()["id"]
                ids.append(known[str(p)])
            if tuple(ids) not in done:
                r = client.post("/api/analyses", json={"kind": kind, "checkpoints": ids, "taus": [1e-5]})
                r.raise_for_status()
                queued.append(r.json()["id"])
                print(f"  queued {kind:7} {title}", flush=True)
        return queued


def up(port: int, data_dir: Path, host: str = "127.0.0.1", demo: Path | None = None) -> int:
    env = local_environment(data_dir)
    if demo is not None:
        env["DELTALENS_ALLOWED_ROOTS"] = f"{env['DELTALENS_ALLOWED_ROOTS']}:{demo.resolve()}"
    procs = [
        subprocess.Popen(worker_command(env["DELTALENS_QUEUE"]), env=env),
        subprocess.Popen([sys.executable, "-m", "uvicorn", "backend.app:app", "--host", host, "--port", str(port),
                          "--log-level", "warning"], env=env),
    ]
    url = f"http://{host}:{port}"
    try:
        if demo is not None:
            _wait_healthy(url, procs)
            queue_demo(url, demo)
        print(f"deltalens is up: {url}/   (API docs: /docs; data in {env['DELTALENS_DATA_DIR']}; Ctrl-C stops)", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    return max((p.returncode or 0) for p in procs)
