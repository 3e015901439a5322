"""`deltalens up` supervises its children: a worker (pool process or main process) or an API that
dies is started again, the worker's task is delivered again, and `up` itself ends only on
SIGTERM/Ctrl-C — and then stops everything it started.

Real `deltalens up` (filesystem broker, no Redis), real SIGKILLs, over HTTP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
from safetensors.torch import save_file
from service import ROOT, free_port, wait_done, wait_for


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A bf16 pair with rank work: a few seconds per analysis, so a kill can land mid-way."""
    root = tmp_path_factory.mktemp("sup")
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(768, 768, generator=g) for i in range(12)}
    target = {k: v + 1e-2 * (torch.rand(v.shape, generator=g) < 0.3) for k, v in base.items()}
    for name, state in (("base", base), ("target", target)):
        (root / name).mkdir()
        save_file({k: v.bfloat16() for k, v in state.items()}, root / name / "model.safetensors")
    return root / "base", root / "target"


class Up:
    def __init__(self, tmp_path, pair):
        self.port, self.pair = free_port(), pair
        env = {k: v for k, v in os.environ.items() if not k.startswith("DELTALENS_")}
        env.update(DELTALENS_ALLOWED_ROOTS=str(pair[0].parent), DELTALENS_DEVICE="cpu")
        self.log = open(tmp_path / "up.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deltalens.worker.cli", "up", "--port", str(self.port)]
            + ["--data-dir", str(tmp_path / "data")],
            env=env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(lambda: httpx.get(self.url + "/api/health", timeout=2).status_code == 200, 60, what="up")
        self.client = httpx.Client(base_url=self.url, timeout=30)
        self.ids = [self.client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in pair]

    def child(self, role: str) -> int:
        return wait_for(
            lambda: next((p for p in children(self.proc.pid) if f" {role} " in cmdline(p) + " "), None),
            30,
            what=f"up's {role} process",
        )

    def submit(self) -> str:
        return self.client.post("/api/analyses", json={"kind": "pair", "checkpoints": self.ids}).json()["id"]

    def stop(self) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.log.close()
        return code


@pytest.fixture
def up(tmp_path, pair):
    service = Up(tmp_path, pair)
    yield service
    group = service.proc.pid
    service.stop()
    try:
        os.killpg(group, signal.SIGKILL)  # nothing may be left; if something is, do not leak it
    except ProcessLookupError:
        pass


def under_way(client, aid):
    s = client.get(f"/api/analyses/{aid}").json()
    return s["status"] == "running" and (s["detail"] or {}).get("tensors_done", 0) >= 1


def test_an_idle_pool_kill_does_not_wedge_the_queue(up):
    worker = up.child("worker")
    pool = wait_for(lambda: children(worker), 30, what="the worker's pool process")
    for pid in pool:
        os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    assert wait_done(up.client, up.submit(), 120)["status"] == "done"


def test_a_killed_worker_is_restarted_and_its_task_delivered_again(up):
    worker = up.child("worker")
    aid = up.submit()
    wait_for(lambda: under_way(up.client, aid), 60, 0.05, what="the analysis to be under way")
    for pid in [worker, *children(worker)]:
        os.kill(pid, signal.SIGKILL)
    assert up.client.get("/api/health").status_code == 200  # the API keeps serving meanwhile
    status = wait_done(up.client, aid, 180)
    assert status["status"] == "done", status
    assert up.child("worker") != worker and up.proc.poll() is None
    assert wait_done(up.client, up.submit(), 120)["status"] == "done"  # and the next one runs too


def test_a_killed_api_is_restarted(up):
    api = up.child("api")
    os.kill(api, signal.SIGKILL)
    wait_for(lambda: httpx.get(up.url + "/api/health", timeout=2).status_code == 200, 60, what="the API")
    assert up.child("api") != api and up.proc.poll() is None
    assert wait_done(up.client, up.submit(), 120)["status"] == "done"


def test_sigterm_stops_everything(up):
    started = [up.child("worker"), up.child("api")]
    started += children(started[0])
    assert up.stop() == 0
    wait_for(lambda: not any(alive(p) for p in started), 30, what="every child to end")
