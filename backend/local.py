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


def worker_command(queue: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker", "-Q", queue, "--concurrency", "1",
            "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"]


def up(port: int, data_dir: Path, host: str = "127.0.0.1") -> int:
    env = local_environment(data_dir)
    procs = [
        subprocess.Popen(worker_command(env["DELTALENS_QUEUE"]), env=env),
        subprocess.Popen([sys.executable, "-m", "uvicorn", "backend.app:app", "--host", host, "--port", str(port),
                          "--log-level", "warning"], env=env),
    ]
    print(f"deltalens is up: http://{host}:{port}/   (API docs: /docs; data in {env['DELTALENS_DATA_DIR']}; Ctrl-C stops)",
          flush=True)
    try:
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
