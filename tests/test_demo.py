"""The showcase: `deltalens up --demo DIR --quick` on an empty folder serves at once, trains the demo
models meanwhile (a banner on every page shows the stage, progress and ETA), queues each analysis as
its checkpoints land; and what the stages themselves reached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from service import ROOT, free_port, wait_done, wait_for

from deltalens.worker.demo_plan import demo_analyses, final_rl

playwright = pytest.importorskip("playwright.sync_api")
from test_dashboard import ARGS, CHROMIUM, SHOTS, new_page  # noqa: E402


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(
                    (int(stat.parent.name), (stat.parent / "cmdline").read_text().replace("\0", " "))
                )
        except (OSError, ValueError, IndexError):
            pass
    return found


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """`deltalens up --demo DIR --quick` on a folder that does not exist yet; its output in `lines`."""
    root = tmp_path_factory.mktemp("demo-up")
    folder, port = root / "demo", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTALENS_")}
    env["DELTALENS_DEVICE"] = "cpu"
    command = [sys.executable, "-m", "deltalens.worker.cli", "up", "--port", str(port)]
    command += ["--data-dir", str(root / "data"), "--demo", str(folder), "--quick"]
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in proc.stdout], daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    seen = wait_for(lambda: httpx.get(url + "/", timeout=2).status_code == 200, 60, 0.05, what="GET /")
    first_view = time.monotonic() - started
    print(f"\ntime to first view: {first_view:.1f} s after `up --demo` started on an empty folder")
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield SimpleNamespace(
                proc=proc,
                url=url,
                folder=folder,
                lines=lines,
                client=client,
                first_view=first_view,
                seen=seen,
            )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@pytest.fixture(scope="module")
def demo(live):
    """The trained quick demo folder (trained by `up --demo` in `live`)."""
    wait_for(lambda: (live.folder / "log.json").is_file(), 900, 0.5, what="the demo training")
    return live.folder


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_serves_at_once_and_shows_the_training_on_every_page(live, browser):
    """GET / and GET /api/demo answer within seconds while the models train; the banner shows the
    stage, a progress bar and the ETA, on every view, in both themes; a trainer killed mid-stage is
    started again and resumes after the stages it finished."""
    assert live.first_view < 30, f"the dashboard answered {live.first_view:.1f} s after start"
    status = live.client.get("/api/demo").json()
    assert status["state"] in ("starting", "training"), status
    status = wait_for(
        lambda: (
            (s := live.client.get("/api/demo").json())["state"] == "training"
            and s["eta_s"]
            and s["figure"]
            and s
        ),
        120,
        0.2,
        what="a training stage with an ETA",
    )
    assert 1 <= status["index"] <= status["total"] and status["stage"] and status["figure"]
    context, page = new_page(browser)
    for path, theme in (("/", "light"), ("/new", "dark")):
        page.goto(live.url + path)
        if theme == "dark":
            page.click("#theme")
        banner = page.wait_for_selector("#demo-banner progress")
        text = page.inner_text("#demo-banner")
        assert "Training the demo models" in text and "left" in text and f"/{status['total']})" in text
        assert 0 <= float(banner.get_attribute("value")) <= 1
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"demo-banner-{theme}.png"))
    assert not page.errors
    context.close()
    # the trainer dies during a stage after the first: `up` starts it again, it resumes after that one
    assert status["index"] >= 2 and status["finished"], status
    (trainer,) = [pid for pid, cmd in _children(live.proc.pid) if "demo-data" in cmd]
    os.kill(trainer, signal.SIGKILL)
    wait_for(lambda: any("already trained" in line for line in live.lines), 60, 0.2, what="the resumed run")


def test_every_stage_trains_and_loads(demo):
    from transformers import AutoModelForCausalLM

    log = json.loads((demo / "log.json").read_text())["log"]
    losses = [e["loss"] for e in stage(log, "pretrain") if "loss" in e]
    assert losses[-1] < losses[0], "pretraining lowered its loss"
    sft = [e["loss"] for e in stage(log, "sft") if "loss" in e]
    assert sft[-1] < sft[0], "SFT lowered its loss"
    assert next(e["subtraction_accuracy"] for e in stage(log, "sft") if "subtraction_accuracy" in e) > 0.15
    before = next(e["expected_reward"] for e in stage(log, "sft") if "expected_reward" in e)
    for seed in (1, 2):  # RL's own objective: the expected exact-answer reward on fixed prompts
        after = next(e["expected_reward"] for e in stage(log, f"rl-seed{seed}") if "expected_reward" in e)
        assert after > before, f"GRPO seed {seed} raised the expected reward"
    dpo = [e["loss"] for e in stage(log, "dpo") if "loss" in e]
    assert dpo[-1] < dpo[0], "DPO lowered its loss"
    minilm = stage(log, "minilm")[0]["losses"]
    assert minilm[-1] < minilm[0]
    addition = next(e["addition_accuracy"] for e in stage(log, "pretrain") if "addition_accuracy" in e)
    assert (
        addition > 0.8
    )  # competent (a guess is right ~0.5 % of the time); 0.875-0.95 seen across library versions
    for path in (demo / "pretrain", demo / "sft", final_rl(demo, 1), final_rl(demo, 2), demo / "dpo"):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert next(model.parameters()).dtype == torch.bfloat16
    config = json.loads((demo / "log.json").read_text())["config"]
    steps = config["rl_steps"] // config["rl_checkpoint_every"]
    assert len(list((demo / "rl-seed1").glob("step-*"))) == steps  # intermediate checkpoints for a series
    assert not list(demo.glob(".tmp-*")), "no half-written stage is left"


def stage(log, name):
    return [e for e in log if e["stage"] == name]


def test_analyses_land_with_their_checkpoints_once_and_finish(live, demo, browser):
    """Each demo analysis was queued once, as its checkpoints landed (the first long before training
    ended), and finishes; once trained, /api/demo says done and the banner is gone; the log has one
    line per stage with its figure, and no Celery banner or progress bars."""
    client, plan = live.client, demo_analyses(demo)
    analyses = wait_for(
        lambda: len(a := client.get("/api/analyses").json()) == len(plan) and a,
        60,
        0.5,
        what="every analysis",
    )
    time.sleep(2)  # `up` polls every second: a second queueing of any of them would show by now
    analyses = client.get("/api/analyses").json()
    assert sorted(a["title"] for a in analyses) == sorted(title for title, _, _ in plan)
    assert client.get("/api/demo").json()["state"] == "done"
    for a in analyses:
        assert wait_done(client, a["id"], 300)["status"] == "done", a
    series = next(a for a in analyses if a["kind"] == "series")
    assert client.get(f"/api/analyses/{series['id']}/series").json()["categories"]["consistent"] >= 0
    first = min(a["created_at"] for a in analyses)
    trained = json.loads((demo / "status.json").read_text())["updated"]
    print(f"first analysis queued {trained - _epoch(first):.0f} s before training ended")
    assert _epoch(first) < trained - 5, "analyses were queued while the models trained"
    context, page = new_page(browser)
    page.goto(live.url + "/")
    page.wait_for_selector("nav")
    page.wait_for_timeout(500)
    assert page.query_selector("#demo-banner") is None
    context.close()
    stages = [line for line in live.lines if line.startswith("demo: ") and " done in " in line]
    assert {line.split(" ")[1] for line in stages} >= {"MiniLM", "pretrain", "SFT", "GRPO", "DPO"}
    print("".join(stages))
    output = "".join(live.lines)
    assert "celery@" not in output and "it/s]" not in output and '{"stage"' not in output


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_notebook_api_and_static_report_on_the_demo(demo, tmp_path):
    """The demo's SFT stage through the notebook API (worker/notebook.py), then `deltalens report`."""
    import deltalens as dl

    _, _, paths = demo_analyses(demo)[0]  # pretrain -> sft
    artifact, report = tmp_path / "demo.duckdb", tmp_path / "demo.html"
    r = dl.analyze(*paths, taus=[1e-5], geometry=False, out=artifact)
    assert dl.open(artifact).document == r.document
    assert r.tensors["changed@1e-05"].sum() == r.document["summary"]["changed"][0]["count"]
    assert r.tensors["numel"].sum() == r.document["summary"]["numel"]
    heat = r.heatmap("sparsity").data[0]
    assert len(heat.z) == len(heat.y) and all(len(row) == len(heat.x) for row in heat.z)
    proc = subprocess.run(
        [sys.executable, "-m", "deltalens.worker.cli", "report", str(artifact), "-o", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    text = report.read_text()
    assert text.count('class="plotly-graph-div"') == len(r.figures()) and str(paths[1]) in text
