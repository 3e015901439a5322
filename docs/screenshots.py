"""The README's pictures: every dashboard view of the demo, light and dark, into docs/img/.

    .venv/bin/python docs/screenshots.py [--demo DIR] [--quick]

Starts `deltalens up --demo DIR` on a scratch data folder (training what DIR lacks), waits for the
demo's analyses, drives Debian's Chromium with Playwright through every view in both themes and
writes docs/img/<view>-<theme>.png. Look at them before committing.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
DRAWN = "() => [...document.querySelectorAll('.plot')].every((p) => p.querySelector('.main-svg'))"
MATRIX = quote("model.layers.1.mlp.down_proj.weight")
# view -> (title of the demo analysis it shows, path under it)
VIEWS = {
    "browse": (None, "/"),
    "new": (None, "/new"),
    "overview": ("RL stage: sft -> GRPO seed 1", ""),
    "tensor": ("RL stage: sft -> GRPO seed 1", f"/tensor?name={MATRIX}"),
    "series": ("GRPO seed 1 over training", "/series"),
    "overlap": ("overlap: GRPO seed 1, seed 2, DPO", "/overlap"),
    "compare": (None, None),
}
COMPARED = ("SFT stage: pretrain -> sft", "RL stage: sft -> GRPO seed 1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_analyses(url: str, deadline: float) -> dict[str, str]:
    """Title -> id once every demo analysis is done (training and analyses: minutes on 2 cores)."""
    wanted = {t for t, _ in VIEWS.values() if t} | set(COMPARED)
    while time.monotonic() < deadline:
        try:
            rows = httpx.get(f"{url}/api/analyses", timeout=10).json()
            demo = httpx.get(f"{url}/api/demo", timeout=10).json()
        except httpx.HTTPError:
            rows, demo = [], {}
        done = {r["title"]: r["id"] for r in rows if r["status"] == "done"}
        failed = [r["title"] for r in rows if r["status"] == "failed"]
        if failed:
            sys.exit(f"analyses failed: {failed}")
        if wanted <= done.keys() and demo.get("state") in ("done", "none"):
            return done
        print(f"  {len(done)} done; training: {demo.get('state')} {demo.get('stage') or ''}", flush=True)
        time.sleep(5)
    sys.exit("timed out waiting for the demo's analyses")


def shoot(url: str, ids: dict[str, str]) -> list[Path]:
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        for theme in ("light", "dark"):
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            context.add_init_script(f"localStorage.setItem('deltalens-theme', '{theme}')")
            page = context.new_page()
            for view, (title, path) in VIEWS.items():
                if view == "compare":
                    target = f"/compare?ids={ids[COMPARED[0]]},{ids[COMPARED[1]]}"
                else:
                    target = f"/analyses/{ids[title]}{path}" if title else path
                page.goto(url + target)
                page.wait_for_load_state("networkidle")
                page.wait_for_function(DRAWN)
                page.wait_for_timeout(300)  # transitions and fonts settle
                shot = OUT / f"{view}-{theme}.png"
                page.screenshot(path=str(shot), full_page=True)
                written.append(shot)
            context.close()
        browser.close()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path(tempfile.gettempdir()) / "deltalens-shots-demo")
    parser.add_argument("--quick", action="store_true", help="train DIR with the quick config")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tempfile.mkdtemp(prefix="deltalens-shots-")
    cmd = [str(Path(sys.executable).parent / "deltalens"), "up", "--port", str(port), "--data-dir", data]
    cmd += ["--demo", str(args.demo), *(["--quick"] if args.quick else [])]
    up = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), start_new_session=True)
    try:
        ids = wait_for_analyses(url, time.monotonic() + args.timeout)
        for shot in shoot(url, ids):
            print(shot.relative_to(ROOT))
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(60)


if __name__ == "__main__":
    main()
