"""DeepSpeed ZeRO checkpoints and verl/FSDP actor folders (issue 12, item 4).

deepspeed and verl are not installed here, so the folders are written with torch.save exactly as the
libraries write them:

* DeepSpeed (commit edaa722): file names from `deepspeed/runtime/engine.py` (`_get_ckpt_name`,
  `_get_rank_zero_ckpt_name`, `_common_checkpoint_state`, `_save_zero_checkpoint`, the `latest` file),
  optimizer partitions from `deepspeed/runtime/zero/stage_1_and_2.py` (flat group aligned to
  2·world size, `get_data_parallel_partitions`, `groups_padding`, `_get_groups_without_padding`) and
  `zero/stage3.py` (`_rigid_state_dict`: each parameter padded to a multiple of the world size), as
  `deepspeed/utils/zero_to_fp32.py` reads them back. The pickled helper objects (DynamicLossScaler,
  ZeroStageEnum, fragment_address) are pickled under DeepSpeed's own module names.
* verl (commit b178a3c): `verl/utils/checkpoint/fsdp_checkpoint_manager.py`
  (`model_world_size_{W}_rank_{r}.pt` holding FSDP sharded state dicts of DTensors, `fsdp_config.json`,
  `huggingface/`), merged as
  `verl/model_merger/fsdp_model_merger.py` does. DTensors are made by torch itself on a fake process
  group, one rank at a time.

Every count is checked against a float64 NumPy computation (tests/reference.py) from the weights the
test planted; the fp32 master reconstruction must equal the planted fp32 weights bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import os
import shutil
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import reference as ref
import torch
import torch.distributed as dist
from conftest import run_cli
from safetensors.torch import save_file

from deltalens.worker.analyses import Options, run_analysis
from deltalens.worker.checkpoint import (
    CheckpointChanged,
    check_pickled,
    checkpoint_files,
    confined,
    open_checkpoint,
    pin_checkpoint,
    preferring,
)
from deltalens.worker.errors import InputError

TAUS = [0.0, 1e-6, 1e-4, 1e-2]
TAG = "global_step10"
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 2},
}


# --- DeepSpeed's pickled helper classes, under their own module names ---------------------------------
@contextlib.contextmanager
def deepspeed_classes():
    """Modules named as DeepSpeed's, holding its classes' shapes, so torch.save pickles them by the
    same names as a real run (DeepSpeed is not installed here)."""
    made = {}

    def module(name: str) -> types.ModuleType:
        made[name] = sys.modules[name] = types.ModuleType(name)
        return made[name]

    for pkg in (
        "deepspeed",
        "deepspeed.runtime",
        "deepspeed.runtime.fp16",
        "deepspeed.runtime.zero",
        "deepspeed.utils",
    ):
        module(pkg)
    scaler, zero, fragment = (
        module("deepspeed.runtime.fp16.loss_scaler"),
        module("deepspeed.runtime.zero.config"),
        module("deepspeed.utils.tensor_fragment"),
    )

    class DynamicLossScaler:
        def __init__(self):
            self.cur_scale, self.cur_iter, self.dynamic, self.dtype = 65536.0, 10, True, torch.bfloat16

    class ZeroStageEnum(int, enum.Enum):
        disabled, optimizer_states, gradients, weights = 0, 1, 2, 3

    @dataclasses.dataclass
    class fragment_address:  # noqa: N801 (DeepSpeed's name)
        numel: int
        start: int

    for mod, cls in ((scaler, DynamicLossScaler), (zero, ZeroStageEnum), (fragment, fragment_address)):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    try:
        yield types.SimpleNamespace(scaler=DynamicLossScaler, stage=ZeroStageEnum, fragment=fragment_address)
    finally:
        for name in made:
            del sys.modules[name]


def adam_state(parts: list[torch.Tensor]) -> dict:
    return {
        "state": {
            i: {"step": torch.tensor(10.0), "exp_avg": p * 0, "exp_avg_sq": p * 0}
            for i, p in enumerate(parts)
        },
        "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "params": [i]} for i in range(len(parts))],
    }


def write_zero(
    root: Path,
    master: dict[str, torch.Tensor],
    stage: int,
    world: int,
    frozen: tuple[str, ...] = (),
    dtype=torch.bfloat16,
    prefix: str = "bf16_",
) -> Path:
    """A DeepSpeed checkpoint root (`latest` + global_step10/) of fp32 master weights `master`, trained
    in `dtype` with ZeRO `stage` over `world` ranks; `frozen` parameters kept out of the optimizer."""
    folder = root / TAG
    folder.mkdir(parents=True)
    (root / "latest").write_text(TAG)
    (root / "zero_to_fp32.py").write_text("raise SystemExit('never run')\n")
    module = {n: t.to(dtype) for n, t in master.items()}
    trained = [n for n in master if n not in frozen]
    groups = [[n for n in trained if master[n].dim() > 1], [n for n in trained if master[n].dim() == 1]]
    common = dict(
        buffer_names=[],
        optimizer=None,
        param_shapes=[OrderedDict((n, master[n].shape) for n in g) for g in groups],
        frozen_param_shapes=OrderedDict((n, master[n].shape) for n in frozen) if stage >= 2 else None,
        shared_params={},
        lr_scheduler={"last_batch_iteration": 9},
        data_sampler=None,
        random_ltd=None,
        sparse_tensor_module_names=set(),
        skipped_steps=0,
        global_steps=10,
        global_samples=80,
        dp_world_size=world,
        mp_world_size=1,
        checkpoint_parallel_dimensions={"pp_degree": 1, "tp_degree": 1},
        ds_config=DS_CONFIG,
        ds_version="0.18.0",
    )
    with deepspeed_classes() as ds:
        base = {"loss_scaler": ds.scaler(), "dynamic_loss_scale": True, "overflow": False}
        if stage <= 2:  # stage_1_and_2.py: flat group padded to 2·world, equal partitions, padding cut off
            partitions: list[list[torch.Tensor]] = [[] for _ in range(world)]
            paddings: list[list[int]] = [[] for _ in range(world)]
            for g in groups:
                flat = torch.cat([master[n].reshape(-1) for n in g])
                numel, align = flat.numel(), 2 * world
                flat = torch.cat([flat, torch.zeros(math.ceil(numel / align) * align - numel)])
                size = flat.numel() // world
                for r in range(world):
                    left = r * size
                    pad = size if numel <= left else max(0, left + size - numel)
                    partitions[r].append(flat[left : left + size - pad].clone())
                    paddings[r].append(pad)
            fragments = {n: module[n] for n in frozen} if stage >= 2 else None
            torch.save(
                {**common, "module": module, "frozen_param_fragments": fragments},
                folder / "mp_rank_00_model_states.pt",
            )
            for r in range(world):
                optim = {
                    **base,
                    "clip_grad": 1.0,
                    "base_optimizer_state": adam_state(partitions[r]),
                    "single_partition_of_fp32_groups": partitions[r],
                    "zero_stage": ds.stage(stage),
                    "group_paddings": paddings[r],
                    "partition_count": [world] * len(groups),
                    "ds_version": "0.18.0",
                    "param_slice_mappings": [OrderedDict({g[0]: ds.fragment(1, 0)}) for g in groups],
                }
                name = f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                torch.save(
                    {"optimizer_state_dict": optim, "ds_config": DS_CONFIG, "ds_version": "0.18.0"},
                    folder / name,
                )
        else:  # stage3.py: each parameter padded to a multiple of world, rank r holds slice r of each

            def slices(t: torch.Tensor) -> list[torch.Tensor]:
                flat, part = t.reshape(-1), math.ceil(t.numel() / world)
                flat = torch.cat([flat, flat.new_zeros(part * world - flat.numel())])
                return [flat[r * part : (r + 1) * part].clone() for r in range(world)]

            sliced = {n: slices(master[n]) for n in trained}
            frozen_sliced = {n: slices(module[n]) for n in frozen}
            for r in range(world):
                placeholders = {n: torch.empty(0, dtype=dtype) for n in master}
                fragments = {n: frozen_sliced[n][r] for n in frozen}
                torch.save(
                    {**common, "module": placeholders, "frozen_param_fragments": fragments},
                    folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                )
                flat = [torch.cat([sliced[n][r] for n in g]) for g in groups]
                optim = {
                    "zero_stage": ds.stage(3),
                    **base,
                    "partition_count": world,
                    "optimizer_state_dict": adam_state(flat),
                    "fp32_flat_groups": flat,
                }
                name = f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
                torch.save(
                    {"optimizer_state_dict": optim, "ds_config": DS_CONFIG, "ds_version": "0.18.0"},
                    folder / name,
                )
    return root


# --- verl: FSDP sharded state dicts of DTensors, one file per rank ------------------------------------
def write_verl(
    actor: Path, master: dict[str, torch.Tensor], config_dir: Path, mesh: tuple, replicate=(), plain=False
):
    """`actor/` as verl's FSDPCheckpointManager saves it: FSDP2 shards (`torch.chunk` on dim 0) of
    `master` on a 1-D `fsdp` mesh or a 2-D `(ddp, fsdp)` one; `replicate` names placed Replicate();
    `plain`: plain local tensors instead of DTensors (what the merger concatenates on dim 0)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world, shards = math.prod(mesh), mesh[-1]
    names = ("fsdp",) if len(mesh) == 1 else ("ddp", "fsdp")
    actor.mkdir(parents=True)
    for r in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=world)
        try:
            device_mesh = init_device_mesh("cpu", mesh, mesh_dim_names=names)
            state = {}
            for n, full in master.items():
                if n in replicate:
                    local, places = full.clone(), [Replicate()]
                else:
                    chunks = full.chunk(shards, 0)
                    k = r % shards
                    local, places = (chunks[k] if k < len(chunks) else full[:0]).clone(), [Shard(0)]
                places = [Replicate(), *places] if len(mesh) == 2 else places
                state[n] = (
                    local
                    if plain
                    else DTensor.from_local(
                        local, device_mesh, places, run_check=False, shape=full.shape, stride=full.stride()
                    )
                )
            torch.save(state, actor / f"model_world_size_{world}_rank_{r}.pt")
            torch.save({"state": {}, "param_groups": []}, actor / f"optim_world_size_{world}_rank_{r}.pt")
            torch.save(
                {"lr_scheduler": None, "rng": {"cpu": torch.get_rng_state()}},
                actor / f"extra_state_world_size_{world}_rank_{r}.pt",
            )
        finally:
            dist.destroy_process_group()
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world}))
    (actor / "huggingface").mkdir()
    shutil.copy(config_dir / "config.json", actor / "huggingface")
    return actor


# --- fixtures and checks -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(family_pair, tmp_path_factory):
    """base dir, its float64 weights, and fp32 master weights: the base (bf16) upcast, with a planted
    change on 30 % of the weights by 1e-8..1e-1 relative amounts (many below bf16's resolution)."""
    base, _ = family_pair("llama")
    b = ref.load(base)
    g = torch.Generator().manual_seed(7)
    master = {}
    for name, w in b.items():
        w = torch.from_numpy(w).float()
        mask = torch.rand(w.shape, generator=g) < 0.3
        scale = 10 ** (torch.rand(w.shape, generator=g) * 7 - 8)
        master[name] = w + mask * torch.randn(w.shape, generator=g) * scale * (w.abs() + 1e-3)
    return base, b, master, tmp_path_factory.mktemp("folders")


def pair(base, target) -> dict:
    return run_analysis(
        "pair", [str(base), str(target)], Options(taus=TAUS, device="cpu", rank=False)
    ).document


def check_counts(doc: dict, b: dict, t: dict[str, torch.Tensor]) -> None:
    """Every tensor compared, and each count at every τ the float64 NumPy count (exact integers)."""
    assert {row["name"] for row in doc["tensors"]} == set(t) and not doc["skipped"].get("only_base")
    for k, tau in enumerate(TAUS):
        per = {row["name"]: row["changed"][k]["count"] for row in doc["tensors"]}
        expected = {n: ref.changed(b[n], t[n].double().numpy(), tau) for n in t}
        assert per == expected
        assert doc["summary"]["changed"][k]["count"] == sum(expected.values())
    assert (
        doc["summary"]["changed"][-1]["count"] > 0
        and doc["summary"]["changed"][0]["count"] < doc["summary"]["numel"]
    )


def one_line_exit_2(*args) -> str:
    proc = run_cli("analyze", *args, "--quiet")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return lines[0]


def refusal(path: Path) -> str:
    """The one-line InputError opening `path` gives, in-process (what the CLI prints with exit 2)."""
    with pytest.raises(InputError) as err:
        open_checkpoint(path)
    line = f"{err.value.path}: {err.value.problem}"
    assert "\n" not in line
    return line


# --- DeepSpeed ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stage, world, frozen, prefix",
    [
        (1, 2, (), "bf16_"),
        (2, 3, ("model.norm.weight",), "bf16_"),
        (3, 3, ("model.norm.weight",), ""),
        (3, 5, (), "bf16_"),
    ],
)
def test_zero_fp32_master_weights_rebuilt_bit_for_bit(llama, stage, world, frozen, prefix):
    base, b, master, tmp = llama
    root = write_zero(tmp / f"zero{stage}_{world}", master, stage, world, frozen, prefix=prefix)
    ckpt = open_checkpoint(root)
    expected = {n: (t.to(torch.bfloat16) if n in frozen else t) for n, t in master.items()}
    assert set(ckpt.names()) == set(expected)
    for name, want in expected.items():
        got = ckpt.tensor(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        bits = torch.int16 if want.dtype == torch.bfloat16 else torch.int32
        assert torch.equal(got.view(bits), want.view(bits)), name  # bit for bit
        ckpt.release(name)
    assert any(f"ZeRO-{stage} checkpoint ({TAG}, tag from latest, {world} ranks)" in n for n in ckpt.notes)
    doc = pair(base, root)
    check_counts(doc, b, expected)
    assert "fp32 master weights" in doc["notes"][0]
    # the tag folder itself reads the same
    assert pair(base, root / TAG)["summary"] == doc["summary"]


def test_zero_module_weights_by_choice_or_without_optimizer_files(llama):
    base, b, master, tmp = llama
    root = write_zero(tmp / "module", master, 2, 2)
    module = {n: t.to(torch.bfloat16) for n, t in master.items()}
    with preferring("module"):
        doc = pair(base, root)
    check_counts(doc, b, module)
    assert any("module weights" in n for n in doc["notes"])
    fp32 = pair(base, root)  # the default: the master weights, which move more weights than bf16 shows
    assert fp32["summary"]["changed"][0]["count"] > doc["summary"]["changed"][0]["count"]
    proc = run_cli(
        "analyze",
        base,
        root,
        "--quiet",
        "--prefer",
        "module",
        "--json",
        "-",
        "--tau",
        *map(str, TAUS),
        "--no-rank",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["changed"] == doc["summary"]["changed"]
    for f in (root / TAG).glob("*_optim_states.pt"):  # ZeRO-2 without its optimizer partitions
        f.unlink()
    assert pair(base, root)["summary"]["changed"] == doc["summary"]["changed"]
    with (
        preferring("fp32"),
        pytest.raises(InputError, match="fp32 master weights are not in this checkpoint"),
    ):
        open_checkpoint(root)


def test_zero_folders_with_a_safetensors_copy_need_prefer(llama):
    base, b, master, tmp = llama
    root = write_zero(tmp / "checkpoint-10", master, 2, 2)  # an HF Trainer folder: model.safetensors too
    shutil.copy(base / "config.json", root)
    save_file({n: t.to(torch.bfloat16).contiguous() for n, t in master.items()}, root / "model.safetensors")
    line = one_line_exit_2(base, root)
    assert (
        "2 weight sets (model.safetensors and latest)" in line and "--prefer safetensors|module|fp32" in line
    )
    with preferring("fp32"):
        doc = pair(base, root)
    check_counts(doc, b, master)
    assert doc["notes"][0] == "checkpoint-10: latest read (--prefer fp32); ignored: model.safetensors"


def test_zero_refusals_are_one_line(llama):
    base, _, master, tmp = llama
    root = write_zero(tmp / "bad", master, 2, 3)
    folder = root / TAG
    optim = sorted(folder.glob("*_optim_states.pt"))
    keep = {f: f.read_bytes() for f in optim}
    optim[1].unlink()  # a gap
    assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in one_line_exit_2(base, root)
    optim[1].write_bytes(keep[optim[1]])
    optim[2].unlink()  # the last rank: only partition_count tells
    assert "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt is missing (partition_count 3)" in refusal(root)
    optim[2].write_bytes(keep[optim[2]][: len(keep[optim[2]]) // 2])  # a truncated file
    line = refusal(root)
    assert optim[2].name in line and "not a readable torch.save file" in line
    optim[2].write_bytes(keep[optim[2]])
    with deepspeed_classes():  # a partition cut short (a different checkpoint's, or a bad copy)
        state = torch.load(optim[1], weights_only=False)
        state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0] = state["optimizer_state_dict"][
            "single_partition_of_fp32_groups"
        ][0][:-8].clone()
        torch.save(state, optim[1])
    assert "a partition is truncated" in refusal(root)
    # ZeRO-3 without its optimizer partitions: the module entry holds only placeholders
    z3 = write_zero(tmp / "z3", master, 3, 2)
    with preferring("module"), pytest.raises(InputError, match="placeholders"):
        open_checkpoint(z3)
    for f in (z3 / TAG).glob("*_optim_states.pt"):
        f.unlink()
    line = one_line_exit_2(base, z3)
    assert "no *_optim_states.pt files" in line and "placeholders" in line


def test_zero_files_stay_weights_only_pinned_and_confined(llama, tmp_path):
    base, _, master, tmp = llama
    root = write_zero(tmp_path / "ds", master, 3, 2)
    names = {str(p.relative_to(root)) for p in checkpoint_files(root)}
    assert names == {"latest"} | {f"{TAG}/{p.name}" for p in (root / TAG).glob("*.pt")}
    pins = pin_checkpoint(root)
    # the API lists and pins a folder's files without importing torch (it never does)
    script = (
        "import sys; from deltalens.worker.checkpoint import pin_checkpoint as p; p(sys.argv[1]); "
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(root)], capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip() == "False", proc.stderr
    with confined([tmp_path], {str(root): pins}):
        open_checkpoint(root)
    check_pickled(root, [tmp_path])  # the API's check, in a child process
    optim = root / TAG / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.utime(optim, ns=(1, 1))
    with confined([tmp_path], {str(root): pins}), pytest.raises(CheckpointChanged, match="size/mtime differ"):
        open_checkpoint(root)

    class Hostile:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    model = root / TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    with deepspeed_classes():
        state = torch.load(model, weights_only=False)
    torch.save({**state, "client": Hostile()}, model)
    with pytest.raises(InputError, match="refused to unpickle: it calls"):
        open_checkpoint(root)
    assert not (tmp_path / "ran").exists()


# --- verl --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mesh, replicate, plain",
    [
        ((3,), ("model.norm.weight", "model.layers.0.input_layernorm.weight"), False),
        ((2, 2), (), False),
        ((2,), (), True),
    ],
)
def test_verl_actor_shards_merged(llama, mesh, replicate, plain):
    base, b, master, tmp = llama
    step = tmp / f"verl_{'x'.join(map(str, mesh))}_{plain}" / "global_step_10"
    actor = write_verl(step / "actor", master, base, mesh, replicate, plain)
    ckpt = open_checkpoint(actor)
    for name, want in master.items():
        assert torch.equal(ckpt.tensor(name).view(torch.int32), want.view(torch.int32)), name
    assert ckpt.config["model_type"] == "llama"
    doc = pair(base, step)  # the global_step folder: its actor
    check_counts(doc, b, master)
    assert "verl actor folder" in doc["notes"][0] and "merged" in doc["notes"][0]
    assert {str(p.relative_to(step)) for p in checkpoint_files(step)} == {
        "actor/fsdp_config.json",
        "actor/huggingface/config.json",
        *(f"actor/model_world_size_{math.prod(mesh)}_rank_{r}.pt" for r in range(math.prod(mesh))),
    }


def test_verl_full_huggingface_weights_are_read_and_refusals(llama):
    base, b, master, tmp = llama
    actor = write_verl(tmp / "verl_hf" / "actor", master, base, (3,))
    (actor / "model_world_size_3_rank_2.pt").unlink()
    assert "model_world_size_3_rank_2.pt is missing (rank 2 of 3)" in one_line_exit_2(base, actor)
    save_file({n: t.contiguous() for n, t in master.items()}, actor / "huggingface" / "model.safetensors")
    doc = pair(base, actor)
    check_counts(doc, b, master)
    assert (
        doc["notes"][0]
        == "actor: verl actor folder: the full weights it saved under huggingface/ (model.safetensors); "
        "rank files not read"
    )
    (actor / "huggingface" / "model.safetensors").unlink()
    (actor / "fsdp_config.json").write_text('{"world_size": "three"}')
    assert "fsdp_config.json: has no valid world_size" in refusal(actor)
