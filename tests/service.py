"""Real processes for the service tests: redis-server, Celery workers, uvicorn — on loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from deltalens.worker.service import api_command, safe_environment, worker_command

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float = 60, interval: float = 0.1, what: str = "condition"):
    """Poll `check` until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (httpx.TransportError, OSError, ConnectionError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Redis:
    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> Redis:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, 20, what="redis-server")
        return self

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def service_env(
    data_dir: Path, broker: str, backend: str, queue: str, roots: list[Path], **extra: str
) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTALENS_")}
    env.update(
        {
            "DELTALENS_DATA_DIR": str(data_dir),
            "DELTALENS_BROKER_URL": broker,
            "DELTALENS_RESULT_BACKEND": backend,
            "DELTALENS_QUEUE": queue,
            "DELTALENS_ALLOWED_ROOTS": ":".join(map(str, roots)),
            "DELTALENS_DEVICE": "cpu",
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    return env


class Worker:
    def __init__(self, env: dict, log: Path):
        self.env, self.log, self.proc = env, log, None

    def start(self) -> Worker:
        self.proc = subprocess.Popen(
            worker_command(self.env["DELTALENS_QUEUE"]),
            env=safe_environment(self.env),
            cwd=ROOT,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_pool(self) -> list[int]:
        """SIGKILL the pool process doing the work, as the kernel's OOM killer would."""
        children = wait_for(self.children, 20, what="the worker's pool process")
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        return children

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), like the OOM killer would."""
        try:
            os.killpg(
                self.proc.pid, signal.SIGKILL
            )  # the group: pool children too, even if the main one is gone
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            self.kill()


class Api:
    def __init__(self, env: dict, log: Path):
        self.env, self.log, self.port, self.proc = env, log, free_port(), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Api:
        self.proc = subprocess.Popen(
            api_command("127.0.0.1", self.port),
            env=safe_environment(self.env),
            cwd=ROOT,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
        )
        wait_for(
            lambda: httpx.get(self.url + "/api/health", timeout=2).status_code == 200, 60, what="the API"
        )
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def wait_done(
    client: httpx.Client, aid: str, timeout: float = 180, states=("done", "failed", "cancelled")
) -> dict:
    return wait_for(
        lambda: (s := client.get(f"/api/analyses/{aid}").json()) and s["status"] in states and s,
        timeout,
        0.2,
        what=f"analysis {aid}",
    )


@contextmanager
def running(*services):
    started = []
    try:
        for s in services:
            started.append(s.start())
        yield started
    finally:
        for s in reversed(started):
            s.stop()


@dataclass
class Stack:
    """A hosted deployment on loopback: redis-server, Celery worker(s), the API, and a client."""

    client: httpx.Client
    api: Api
    workers: list[Worker]
    redis: Redis
    env: dict


@contextmanager
def hosted(
    root: Path,
    queue: str,
    roots: list[Path],
    token: str | None = None,
    workers: int = 1,
    timeout: float = 60,
    **settings: str,
):
    """Start the stack under `root` (DELTALENS_* `settings` as keyword arguments); the client sends the
    token, if any."""
    redis = Redis(root / "redis")
    with running(redis):
        extra = {"DELTALENS_TOKEN": token} if token else {}
        env = service_env(
            root / "data", f"{redis.url}/0", f"{redis.url}/1", queue, roots, **extra, **settings
        )
        logs = ["worker.log"] if workers == 1 else [f"worker{i}.log" for i in range(workers)]
        with running(*(Worker(env, root / log) for log in logs), Api(env, root / "api.log")) as started:
            *started_workers, api = started
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            with httpx.Client(base_url=api.url, timeout=timeout, headers=headers) as client:
                yield Stack(client, api, started_workers, redis, env)
