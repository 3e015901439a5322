"""Starting the service — the one place that does (the CLI's `up`, `api` and `worker` commands).

`deltalens up` runs the API and one worker on this machine with no Docker and no Redis: the worker
runs the same Celery task as the hosted deployment; the broker is Kombu's filesystem transport and
task state goes to Celery's file result backend, both in the data dir.

Every child runs as `python -P` with PYTHONSAFEPATH=1, so a `worker/` or `backend/` folder in the
caller's current directory can never shadow the installed package. This module never imports the
API: it starts it as a process and talks to it over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

API_APP = "deltalens.backend.app:app"
CLI = "deltalens.worker.cli"


def python() -> list[str]:
    """This interpreter, unable to import from the current folder (`-P`, Python ≥ 3.11)."""
    return [sys.executable, "-P"]


def local_environment(data_dir: Path, env: dict | None = None) -> dict:
    data_dir = data_dir.resolve()
    (data_dir / "celery-results").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env)
    env.update(
        {
            "DELTALENS_DATA_DIR": str(data_dir),
            "DELTALENS_BROKER_URL": "filesystem://",
            "DELTALENS_RESULT_BACKEND": f"file://{data_dir / 'celery-results'}",
            "DELTALENS_QUEUE": env.get("DELTALENS_QUEUE", "local"),
        }
    )
    env.setdefault("DELTALENS_ALLOWED_ROOTS", str(Path.cwd()))
    return env


def safe_environment(env: dict) -> dict:
    return {**env, "PYTHONSAFEPATH": "1"}


def worker_command(queue: str, loglevel: str = "WARNING") -> list[str]:
    return [*python(), "-m", CLI, "worker", "--queue", queue, "--loglevel", loglevel]


def api_command(host: str, port: int, log_level: str = "warning") -> list[str]:
    return [*python(), "-m", CLI, "api", "--host", host, "--port", str(port), "--log-level", log_level]


def run_worker(queue: str, loglevel: str = "INFO") -> int:
    """A Celery worker in this process: one task at a time, no gossip/mingle/heartbeat chatter."""
    from deltalens.worker.tasks import celery_app

    # containers run as root; the tasks carry JSON only, so Celery's root warning is noise here
    warnings.filterwarnings("ignore", message="You're running the worker with superuser privileges")
    argv = ["worker", "-Q", queue, "--concurrency", "1", "--loglevel", loglevel]
    celery_app.worker_main([*argv, "--without-gossip", "--without-mingle", "--without-heartbeat"])
    return 0


def run_api(host: str, port: int, log_level: str = "info", proxy_headers: bool = False) -> int:
    """The API in this process (uvicorn imports it by name; this module does not)."""
    import uvicorn

    uvicorn.run(API_APP, host=host, port=port, log_level=log_level, proxy_headers=proxy_headers)
    return 0


def _http(url: str, body: dict | None = None, timeout: float = 60):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def _wait_healthy(url: str, procs: list, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        try:
            return _http(url + "/api/health", timeout=2)
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"the API did not come up at {url}")


def queue_demo(url: str, demo: Path) -> list[str]:
    """Register a demo folder's checkpoints and queue its analyses, once (skipped when already there)."""
    from deltalens.worker.demo import demo_analyses

    known = {c["path"]: c["id"] for c in _http(url + "/api/checkpoints")}
    done = {tuple(a["checkpoints"]) for a in _http(url + "/api/analyses")}
    queued = []
    for title, kind, paths in demo_analyses(demo.resolve()):
        ids = []
        for p in paths:
            if str(p) not in known:
                known[str(p)] = _http(url + "/api/checkpoints", {"path": str(p)})["id"]
            ids.append(known[str(p)])
        if tuple(ids) not in done:
            body = {"kind": kind, "checkpoints": ids, "taus": [1e-5]}
            queued.append(_http(url + "/api/analyses", body)["id"])
            print(f"  queued {kind:7} {title}", flush=True)
    return queued


def up(port: int, data_dir: Path, host: str = "127.0.0.1", demo: Path | None = None) -> int:
    env = safe_environment(local_environment(data_dir))
    if demo is not None:
        env["DELTALENS_ALLOWED_ROOTS"] = f"{env['DELTALENS_ALLOWED_ROOTS']}:{demo.resolve()}"
    procs = [
        subprocess.Popen(worker_command(env["DELTALENS_QUEUE"]), env=env),
        subprocess.Popen(api_command(host, port), env=env),
    ]
    url = f"http://{host}:{port}"
    try:
        health = _wait_healthy(url, procs)
        if not health.get("dashboard", True):
            print(
                "deltalens: the dashboard is not built; the API still works. Build it with: "
                "cd frontend && npm ci && npm run build",
                file=sys.stderr,
                flush=True,
            )
        if demo is not None:
            queue_demo(url, demo)
        print(
            f"deltalens is up: {url}/   (API docs: /docs; data in {env['DELTALENS_DATA_DIR']}; Ctrl-C stops)",
            flush=True,
        )
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
