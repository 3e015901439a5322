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
import shutil
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
IMPORTER = "deltalens.backend.imports"  # `up --import`: run as a child, like the API


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
            "DELTALENS_BROKER_URL": "filesystem://localhost/",  # a host (ignored) keeps kombu from warning
            "DELTALENS_RESULT_BACKEND": f"file://{data_dir / 'celery-results'}",
            "DELTALENS_QUEUE": env.get("DELTALENS_QUEUE", "local"),
        }
    )
    env.setdefault("DELTALENS_ALLOWED_ROOTS", str(Path.cwd()))
    return env


def safe_environment(env: dict) -> dict:
    return {**env, "PYTHONSAFEPATH": "1"}


def worker_command(queue: str, loglevel: str = "WARNING", pool_pids: Path | None = None) -> list[str]:
    extra = ["--pool-pids", str(pool_pids)] if pool_pids else []
    return [*python(), "-m", CLI, "worker", "--queue", queue, "--loglevel", loglevel, *extra]


def api_command(host: str, port: int, log_level: str = "warning") -> list[str]:
    return [*python(), "-m", CLI, "api", "--host", host, "--port", str(port), "--log-level", log_level]


def run_worker(queue: str, loglevel: str = "INFO", pool_pids: Path | None = None) -> int:
    """A Celery worker in this process: one task at a time, no gossip/mingle/heartbeat chatter.
    With `pool_pids`, each pool process leaves a file named by its pid there (for a supervisor)."""
    from celery.signals import worker_process_init

    from deltalens.worker.tasks import celery_app

    if pool_pids is not None:
        pool_pids.mkdir(parents=True, exist_ok=True)
        worker_process_init.connect(lambda **_: (pool_pids / str(os.getpid())).touch(), weak=False)

    # containers run as root; the tasks carry JSON only, so Celery's root warning is noise here
    warnings.filterwarnings("ignore", message="You're running the worker with superuser privileges")
    quiet = ["--quiet"] if loglevel.upper() in ("WARNING", "ERROR", "CRITICAL") else []  # `up`: no banner
    argv = [*quiet, "worker", "-Q", queue, "--concurrency", "1", "--loglevel", loglevel]
    celery_app.worker_main([*argv, "--without-gossip", "--without-mingle", "--without-heartbeat"])
    return 0


def run_api(host: str, port: int, log_level: str = "info", proxy_headers: bool = False) -> int:
    """The API in this process (uvicorn imports it by name; this module does not)."""
    import uvicorn

    uvicorn.run(API_APP, host=host, port=port, log_level=log_level, proxy_headers=proxy_headers)
    return 0


def _auth(env: dict) -> dict:
    """The hosted-mode token for the API's write routes, when `up` runs with one."""
    return {"Authorization": f"Bearer {env['DELTALENS_TOKEN']}"} if env.get("DELTALENS_TOKEN") else {}


def _http(url: str, body: dict | None = None, timeout: float = 60, headers: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=headers)
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


def import_artifacts(files: list[Path], data_dir: Path) -> int:
    """`up --import`: add the analyses of DuckDB files computed elsewhere (the CLI's --out) to the data
    folder before the API starts. Each file is checked here first (exit 2, one line naming it and the
    problem, nothing touched); the catalog's own code then ingests them in a child process
    (deltalens.backend.imports), since this module never imports the API."""
    from deltalens.worker.artifacts import describe
    from deltalens.worker.errors import InputError

    try:
        for f in files:
            describe(f, strict_ids=True)
    except InputError as e:
        print(f"deltalens: error: {e}", file=sys.stderr)
        return 2
    env = safe_environment(local_environment(data_dir))
    return subprocess.run([*python(), "-m", IMPORTER, *map(str, files)], env=env).returncode


def queue_demo(url: str, plan: list[tuple[str, str, list[Path]]], env: dict) -> list[str]:
    """Register the checkpoints of demo analyses and queue them, once (skipped when already there);
    returns the titles of those now in the catalog."""
    auth = _auth(env)
    known = {c["path"]: c["id"] for c in _http(url + "/api/checkpoints")}
    done = {tuple(a["checkpoints"]) for a in _http(url + "/api/analyses")}
    for title, kind, paths in plan:
        ids = []
        for p in paths:
            if str(p) not in known:
                known[str(p)] = _http(url + "/api/checkpoints", {"path": str(p)}, headers=auth)["id"]
            ids.append(known[str(p)])
        if tuple(ids) not in done:
            body = {"kind": kind, "checkpoints": ids, "taus": [1e-5], "title": title}
            _http(url + "/api/analyses", body, headers=auth)
            print(f"  queued {kind:7} {title}", flush=True)
    return [title for title, _, _ in plan]


class DemoTraining:
    """`up --demo DIR`: DIR is trained in a child process when it has no log.json (a restarted trainer
    resumes after its last finished stage; stage folders appear complete, by rename), and each demo
    analysis is queued as soon as all its checkpoints exist."""

    TRIES = 3

    def __init__(self, demo: Path, env: dict, quick: bool):
        self.demo, self.env, self.queued, self.tries = demo.resolve(), env, set(), 0
        command = [*python(), "-m", CLI, "demo-data", str(self.demo), *(["--quick"] if quick else [])]
        trained = (self.demo / "log.json").is_file()
        self.trainer = None if trained else Child("demo trainer", command, env)

    def start(self) -> None:
        if self.trainer:
            self.trainer.start()

    def poll(self, url: str) -> None:
        """Queue what became ready; a trainer that failed is started again (it resumes), a few times."""
        from deltalens.worker.demo_plan import demo_analyses  # torch-free: the supervisor stays lean

        ready = [
            a for a in demo_analyses(self.demo) if a[0] not in self.queued and all(p.exists() for p in a[2])
        ]
        if ready:
            self.queued.update(queue_demo(url, ready, self.env))
        if self.trainer is None or self.trainer.proc.poll() is None:
            return
        self.tries += self.trainer.proc.returncode != 0
        if self.trainer.proc.returncode == 0:
            self.trainer = None
        elif self.tries < self.TRIES:
            self.trainer.restart(f"exited with {self.trainer.proc.returncode}")
        else:
            self.give_up()

    def give_up(self) -> None:
        from deltalens.worker.demo_plan import STATUS, read_status, write_json

        print("deltalens: the demo trainer keeps failing; serving what it made", file=sys.stderr, flush=True)
        status = read_status(self.demo) or {}
        if status.get("state") != "failed":
            write_json(self.demo / STATUS, {**status, "state": "failed", "eta_s": None})
        self.trainer = None

    def stop(self) -> None:
        if self.trainer:
            self.trainer.stop(grace=5)


class Child:
    """One supervised process: started again when it dies (with a growing pause if it keeps dying)."""

    def __init__(self, role: str, command: list[str], env: dict, pool_pids: Path | None = None):
        self.role, self.command, self.env, self.pool_pids = role, command, env, pool_pids
        self.proc: subprocess.Popen | None = None
        self.started, self.backoff = 0.0, 0.0

    def start(self) -> Child:
        if self.pool_pids is not None:
            shutil.rmtree(self.pool_pids, ignore_errors=True)
        self.proc, self.started = subprocess.Popen(self.command, env=self.env), time.monotonic()
        return self

    def pool(self) -> dict[int, bool]:
        """The worker's pool processes (each left a pid file when it started): pid -> alive."""
        if self.pool_pids is None or not self.pool_pids.is_dir():
            return {}
        return {int(f.name): _alive(int(f.name)) for f in self.pool_pids.iterdir() if f.name.isdigit()}

    def failed(self) -> str | None:
        """Why this child needs a restart: it exited, or one of its pool processes died (Celery's
        prefork pool wedges for good when an idle pool process is killed while holding the queue lock)."""
        if self.proc.poll() is not None:
            return f"exited with {self.proc.returncode}"
        lost = [pid for pid, alive in self.pool().items() if not alive]
        return f"lost its pool process {', '.join(map(str, lost))}" if lost else None

    def restart(self, reason: str) -> None:
        print(f"deltalens: the {self.role} {reason}; starting it again", file=sys.stderr, flush=True)
        self.stop(grace=5)
        # one that keeps dying at once starts again after 1, 2, 4 … 30 s; one that ran a minute, at once
        self.backoff = 0.0 if time.monotonic() - self.started > 60 else min(max(1.0, 2 * self.backoff), 30.0)
        time.sleep(self.backoff)
        self.start()

    def stop(self, grace: float = 20) -> None:
        """SIGTERM, then SIGKILL for it and its pool processes after `grace` seconds."""
        if self.proc is None:
            return
        pool = set(self.pool())
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in pool:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _redeliver(url: str, env: dict) -> None:
    """A worker was lost: the filesystem broker forgets a message once a worker has taken it, so the
    API sends every unfinished analysis again (tasks are idempotent and count their attempts)."""
    request = urllib.request.Request(url + "/api/analyses/redeliver", data=b"{}", headers=_auth(env))
    request.add_header("Content-Type", "application/json")
    for _ in range(60):  # the API may itself be starting again
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                sent = json.loads(response.read())["ids"]
                if sent:
                    print(f"deltalens: delivered again: {', '.join(sent)}", file=sys.stderr, flush=True)
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    raise _Stop


def up(
    port: int, data_dir: Path, host: str = "127.0.0.1", demo: Path | None = None, quick: bool = False
) -> int:
    """The API and one worker, supervised: either is started again when it dies (a lost worker's
    analyses are delivered again); `up` ends on Ctrl-C or SIGTERM, and stops both."""
    env = safe_environment(local_environment(data_dir))
    if demo is not None:
        demo.mkdir(parents=True, exist_ok=True)
        env["DELTALENS_ALLOWED_ROOTS"] = f"{env['DELTALENS_ALLOWED_ROOTS']}:{demo.resolve()}"
        env["DELTALENS_DEMO_DIR"] = str(demo.resolve())  # GET /api/demo reads its status.json
    training = DemoTraining(demo, env, quick) if demo is not None else None
    signal.signal(signal.SIGTERM, _raise_stop)
    pool_pids = Path(env["DELTALENS_DATA_DIR"]) / "worker-pool"
    worker = Child("worker", worker_command(env["DELTALENS_QUEUE"], pool_pids=pool_pids), env, pool_pids)
    api = Child("api", api_command(host, port), env)
    url = f"http://{host}:{port}"
    try:
        worker.start(), api.start()
        if training:
            training.start()  # meanwhile: the API serves at once, the banner shows the stages
        health = _wait_healthy(url, [api.proc])
        if not health.get("dashboard", True):
            print(
                "deltalens: the dashboard is not built; the API still works. Build it with: "
                "cd frontend && npm ci && npm run build",
                file=sys.stderr,
                flush=True,
            )
        _redeliver(url, env)  # what a previous `up` that was killed may have left taken but unfinished
        print(
            f"deltalens is up: {url}/   (API docs: /docs; data in {env['DELTALENS_DATA_DIR']}; Ctrl-C stops)",
            flush=True,
        )
        next_poll = 0.0
        while True:
            time.sleep(0.5)
            if reason := api.failed():
                api.restart(reason)
            if reason := worker.failed():
                worker.restart(reason)
                _redeliver(url, env)
            if training and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + (1 if training.trainer else 10)
                try:
                    training.poll(url)
                except (urllib.error.URLError, OSError, ValueError) as e:  # the API restarting: next time
                    print(f"deltalens: demo analyses not queued yet: {e}", file=sys.stderr, flush=True)
    except (KeyboardInterrupt, _Stop):
        pass
    except RuntimeError as e:  # the API could not start (e.g. the port is taken)
        print(f"deltalens: {e}; see the messages above", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        worker.stop(), api.stop()
        if training:
            training.stop()
    return 0
