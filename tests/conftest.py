"""Tiny real checkpoints written by transformers' save_pretrained, and perturbed copies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parents[1]

RELIABILITY = os.environ.get("DELTALENS_RELIABILITY") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: a long fault run, only in `make reliability`")


def pytest_collection_modifyitems(config, items):
    """Tests marked `reliability` run only with DELTALENS_RELIABILITY=1 (`make reliability`)."""
    if RELIABILITY:
        return
    skip = pytest.mark.skip(reason="long run: `make reliability` (DELTALENS_RELIABILITY=1)")
    for item in items:
        if "reliability" in item.keywords:
            item.add_marker(skip)


MODELS = {
    # name: (builder, dtype, max_shard_size)
    "llama": (
        lambda: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=96,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        ),
        torch.bfloat16,
        "40KB",
    ),
    "gpt2": (
        lambda: GPT2LMHeadModel(GPT2Config(vocab_size=80, n_embd=48, n_layer=2, n_head=4, n_positions=32)),
        torch.float32,
        None,
    ),
    "qwen2": (
        lambda: Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=96,
                hidden_size=64,
                intermediate_size=80,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            )
        ),
        torch.float16,
        None,
    ),
    "neox": (
        lambda: GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
            )
        ),
        torch.float32,
        None,
    ),
    "phi3": (
        lambda: Phi3ForCausalLM(
            Phi3Config(
                vocab_size=64,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                pad_token_id=0,
            )
        ),
        torch.bfloat16,
        None,
    ),
}


def perturb_(
    model: torch.nn.Module, seed: int, fraction: float = 0.3, spare: tuple[str, ...] = ("norm",)
) -> None:
    """Move a random `fraction` of weights by log-uniform amounts (1e-8..1e-1 relative), in place.

    Names containing any of `spare` are moved 100x less often (like norms under RL).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            f = fraction / 100 if any(s in name for s in spare) else fraction
            mask = torch.rand(p.shape, generator=g) < f
            scale = 10 ** (torch.rand(p.shape, generator=g) * 7 - 8)
            step = torch.randn(p.shape, generator=g) * scale * (p.float().abs() + 1e-3)
            p.copy_((p.float() + step * mask).to(p.dtype))


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    builder, dtype, _ = MODELS[kind]
    torch.manual_seed(seed)
    return builder().to(dtype)


def save(model: torch.nn.Module, kind: str, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size=MODELS[kind][2] or "5GB")
    return path


@pytest.fixture(scope="session")
def family_pair(tmp_path_factory):
    """(base_dir, target_dir) for each tiny model family, built once per test session."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            root = tmp_path_factory.mktemp(kind)
            model = build(kind)
            base = save(model, kind, root / "base")
            perturb_(model, seed=1)
            cache[kind] = (base, save(model, kind, root / "target"))
        return cache[kind]

    return get


def variants(kind: str, root: Path, moves: dict[str, tuple[int, float]]) -> list[Path]:
    """[base, *one checkpoint per name]: each is the base perturbed with its own (seed, fraction)."""
    model = build(kind)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = [save(model, kind, root / "base")]
    for name, (seed, fraction) in moves.items():
        model.load_state_dict(base_state)
        perturb_(model, seed=seed, fraction=fraction)
        paths.append(save(model, kind, root / name))
    return paths


@pytest.fixture(scope="session")
def llama_series(tmp_path_factory):
    """base, 3 intermediate checkpoints and a final one, where some updates revert (transients):
    later steps move more weights, and different ones."""
    return variants(
        "llama", tmp_path_factory.mktemp("series"), {f"step{s}": (100 + s, 0.1 * s) for s in range(1, 5)}
    )


def config_of(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "deltalens.worker.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"deltalens {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc
