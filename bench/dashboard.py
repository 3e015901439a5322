"""Benchmark: time to first heatmap in headless Chromium for a 24-layer model.

    python bench/dashboard.py [--layers 24] [--hidden 256]

Builds a 24-layer Llama pair with transformers (bf16), runs the API and a worker (local mode, no
Redis), analyses the pair, then opens the overview page in a fresh Chromium context several times
and prints the time from navigation to the drawn heatmap (median) beside the time the API takes
to answer the four requests behind it (the baseline the page cannot beat).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from service import Api, Worker, running, service_env, wait_done  # noqa: E402


def make_pair(root: Path, layers: int, hidden: int) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=4096,
            hidden_size=hidden,
            intermediate_size=hidden * 3,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=2,
        )
    ).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape) * 1e-3 * (torch.rand(p.shape) < 0.2)).to(p.dtype))
    model.save_pretrained(root / "target")
    return root / "base", root / "target"


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, target = make_pair(tmp, args.layers, args.hidden)
        (tmp / "results").mkdir()
        env = service_env(tmp / "data", "filesystem://", f"file://{tmp / 'results'}", "bench", [tmp])
        with running(Worker(env, tmp / "worker.log"), Api(env, tmp / "api.log")) as (_, api):
            client = httpx.Client(base_url=api.url, timeout=60)
            ids = [
                client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in (base, target)
            ]
            aid = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids}).json()["id"]
            assert wait_done(client, aid, 600)["status"] == "done"
            api_times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                for path in ("summary", "heatmap-cube", "sparsity-curve", "heatmap"):
                    client.get(f"/api/analyses/{aid}/{path}").raise_for_status()
                api_times.append(time.perf_counter() - start)
            page_times = []
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path="/usr/bin/chromium",
                    headless=True,
                    args=[
                        "--no-sandbox",
                        "--disable-gpu",
                        "--no-first-run",
                        "--disable-background-networking",
                    ],
                )
                for _ in range(args.repeat):
                    context = browser.new_context(viewport={"width": 1280, "height": 800})
                    page = context.new_page()
                    start = time.perf_counter()
                    page.goto(f"{api.url}/analyses/{aid}")
                    page.locator("#heatmap .nsewdrag").wait_for(timeout=60_000)
                    page_times.append(time.perf_counter() - start)
                    context.close()
                browser.close()
    print(
        f"{args.layers}-layer Llama (hidden {args.hidden}); median of {args.repeat}, a fresh "
        f"browser context each (no cache)"
    )
    print(f"{'time to first heatmap (navigation -> drawn)':46} {statistics.median(page_times):6.2f} s")
    print(f"{'baseline: the 4 API requests behind it':46} {statistics.median(api_times):6.2f} s")
    print(f"ratio page/API: {statistics.median(page_times) / statistics.median(api_times):.1f}")


if __name__ == "__main__":
    main()
