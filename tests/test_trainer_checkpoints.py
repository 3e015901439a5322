"""Trainer checkpoints (issue 12, item 4) and folders with two weight sets (item 6, `--prefer`).

A trainer writes `torch.save({"model": sd, "optimizer": ..., "step": ...})`, DeepSpeed `{"module": sd}`,
DDP names prefixed `module.`, or a `torch.distributed.checkpoint` directory. Each must give exactly
the counts of the same weights saved by `save_pretrained`, which are themselves checked against a
float64 NumPy computation here; what the file holds besides the weights is named in `notes`.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
import torch.distributed.checkpoint as dcp
from conftest import build, run_cli
from safetensors.torch import save_file

from deltalens.worker.analyses import Options, run_analysis
from deltalens.worker.checkpoint import (
    CheckpointChanged,
    Unconfined,
    check_pickled,
    confined,
    open_checkpoint,
    pin_checkpoint,
    preferring,
)
from deltalens.worker.errors import InputError

TAUS = [1e-5, 1e-3]


def state_of(path: Path) -> dict[str, torch.Tensor]:
    """The stored tensors of a checkpoint, in their stored dtype (bf16 for the tiny Llama)."""
    c = open_checkpoint(path)
    return {n: c.tensor(n).clone() for n in c.names()}


@functools.cache
def optimizer_state() -> dict:
    """A real AdamW state dict after one step (tensors, ints, floats, tuples, param groups)."""
    model = build("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.arange(8).view(1, 8)).logits.float().sum().backward()
    opt.step()
    return opt.state_dict()


def save_dcp(state: dict, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def pair(base, target, **kw) -> dict:
    return run_analysis("pair", [str(base), str(target)], Options(taus=TAUS, device="cpu", **kw)).document


@pytest.fixture(scope="module")
def llama(family_pair, tmp_path_factory):
    """base dir, target dir, the target's tensors, the safetensors pair document (checked against the
    NumPy reference once) and a scratch folder."""
    base, target = family_pair("llama")
    doc = pair(base, target)
    b, t = ref.load(base), ref.load(target)
    for tau_index, tau in enumerate(TAUS):
        expected = sum(ref.changed(b[row["name"]], t[row["name"]], tau) for row in doc["tensors"])
        assert doc["summary"]["changed"][tau_index]["count"] == expected > 0
    return base, target, state_of(target), doc, tmp_path_factory.mktemp("trainer")


def same_figures(doc: dict, expected: dict) -> None:
    assert doc["summary"] == expected["summary"]
    assert doc["tensors"] == expected["tensors"]
    assert doc["skipped"] == expected["skipped"]


# --- (a) torch.save'd trainer states --------------------------------------------------------------
def test_nested_trainer_states_give_the_safetensors_counts_and_name_what_was_left_out(llama):
    base, _, sd, expected, tmp = llama
    opt = optimizer_state()
    cases = {
        "trainer.pt": (
            {"model": sd, "optimizer": opt, "step": 10, "lr_scheduler": {"last_epoch": 10}},
            "'model' entry; ignored: lr_scheduler, optimizer, step",
        ),
        "deepspeed.pt": (
            {"module": sd, "buffer_names": [], "global_steps": 3},
            "'module' entry; ignored: buffer_names, global_steps",
        ),
        "lightning.ckpt.pt": ({"state_dict": sd, "epoch": 1}, "'state_dict' entry; ignored: epoch"),
        "recipe.pth": (
            {"model_state_dict": sd, "optimizer_state_dict": opt},
            "ignored: optimizer_state_dict",
        ),
        "ddp.bin": ({f"module.{k}": v for k, v in sd.items()}, "the DDP prefix 'module.' was removed"),
    }
    for name, (state, note) in cases.items():
        torch.save(state, tmp / name)
        doc = pair(base, tmp / name)
        same_figures(doc, expected)
        assert len(doc["notes"]) == 1 and note in doc["notes"][0] and doc["notes"][0].startswith(name)
    assert expected["notes"] == []  # a plain checkpoint has nothing to say
    # the same file as a series / overlap input: the note travels with it
    doc = run_analysis(
        "overlap", [str(base), str(tmp / "trainer.pt"), str(tmp / "deepspeed.pt")], Options(device="cpu")
    ).document
    assert len(doc["notes"]) == 2 and doc["summary"]["pairs"][0]["jaccard"] == 1.0


def test_trainer_states_stay_weights_only_and_unambiguous(llama, tmp_path):
    _, _, sd, _, _ = llama

    class Hostile:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    torch.save({"model": sd, "optimizer": Hostile()}, tmp_path / "hostile.pt")
    with pytest.raises(InputError, match="refused to unpickle: it calls"):
        open_checkpoint(tmp_path / "hostile.pt")
    with pytest.raises(InputError, match="refused to unpickle"):  # the API's path: in a child process
        check_pickled(tmp_path / "hostile.pt")
    assert not (tmp_path / "ran").exists()
    torch.save({"model": sd, "state_dict": sd}, tmp_path / "two.pt")
    with pytest.raises(InputError, match="under both 'model' and 'state_dict'"):
        open_checkpoint(tmp_path / "two.pt")
    torch.save({"optimizer": optimizer_state(), "step": 1}, tmp_path / "optim_only.pt")
    with pytest.raises(InputError, match="not a state dict"):
        open_checkpoint(tmp_path / "optim_only.pt")
    torch.save({"model": sd, "step": 1}, tmp_path / "fine.pt")
    check_pickled(tmp_path / "fine.pt")  # nested trainer state accepted by the child check too


# --- (b) torch.distributed.checkpoint directories ------------------------------------------------
def test_dcp_directories_give_the_safetensors_counts(llama):
    base, _, sd, expected, tmp = llama
    flat = save_dcp(dict(sd), tmp / "dcp_flat")
    trainer = save_dcp({"model": dict(sd), "optimizer": optimizer_state(), "step": 7}, tmp / "dcp_trainer")
    doc = pair(base, flat)
    same_figures(doc, expected)
    assert doc["notes"] == []
    doc = pair(base, trainer)
    same_figures(doc, expected)
    assert doc["notes"] == ["dcp_trainer: weights read from its 'model' entry; ignored: optimizer, step"]
    # as a base too, and in a series
    doc = run_analysis("series", [str(flat), str(trainer), str(base)], Options(device="cpu")).document
    total = sum(row["numel"] for row in doc["tensors"])
    assert (
        doc["steps"][0]["changed"] == 0
        and doc["steps"][1]["changed"] > 0
        and total == expected["summary"]["numel"]
    )


def test_dcp_reads_one_tensor_at_a_time_and_is_pinned(llama):
    _, _, sd, _, tmp = llama
    folder = tmp / "dcp_flat"
    if not folder.exists():
        save_dcp(dict(sd), folder)
    c = open_checkpoint(folder)
    reader = next(iter(c.files.values()))
    assert reader._cached is None  # opening reads metadata only
    names = c.names()
    for name in names[:3]:
        t = c.tensor(name)
        assert torch.equal(t, sd[name]) and t.dtype == sd[name].dtype
        assert reader._cached[0] == name  # only the last tensor is held
        c.release(name)
        assert reader._cached is None
    assert np.array_equal(c.array(names[0]), sd[names[0]].view(torch.uint16).numpy())  # bf16 raw bits
    pins = pin_checkpoint(folder)
    assert set(pins["files"]) == {".metadata", "__0_0.distcp"}
    with confined([tmp], {str(folder): pins}):
        open_checkpoint(folder)
    check_pickled(folder, [tmp])  # the API's registration check, in a child process
    copy = shutil.copytree(folder, tmp / "dcp_changed")
    pins = pin_checkpoint(copy)
    shard = copy / "__0_0.distcp"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with confined([tmp], {str(copy): pins}), pytest.raises(CheckpointChanged, match="__0_0.distcp"):
        open_checkpoint(copy)


def test_hostile_dcp_metadata_is_refused(llama, tmp_path):
    _, _, sd, _, tmp = llama
    good = tmp / "dcp_flat"
    if not good.exists():
        save_dcp(dict(sd), good)

    def variant(name: str, edit) -> Path:
        folder = shutil.copytree(good, tmp_path / name)
        with open(folder / ".metadata", "rb") as f:
            metadata = pickle.load(f)  # our own test file, written by dcp.save just above
        edit(metadata)
        with open(folder / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
        return folder

    class Hostile:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    bad = variant("code", lambda m: setattr(m, "planner_data", {"x": Hostile()}))
    with pytest.raises(InputError, match="refused to unpickle DCP metadata: it calls"):
        open_checkpoint(bad)
    assert not (tmp_path / "ran").exists()

    def escape(m):
        for info in m.storage_data.values():
            info.relative_path = "../outside.distcp"

    with pytest.raises(InputError, match="is not a .distcp file of this folder"):
        open_checkpoint(variant("escape", escape))

    def overrun(m):
        for info in m.storage_data.values():
            info.offset += 10**9

    with pytest.raises(InputError, match="outside the file"):
        open_checkpoint(variant("overrun", overrun))

    def chunks(edit):
        def apply(m):
            item = next(v for v in m.state_dict_metadata.values() if len(v.size) == 2)
            edit(item)

        return apply

    def gap(item):  # the chunk covers half the rows: the rest would be never-written memory
        c = item.chunks[0]
        item.chunks[0] = type(c)(offsets=c.offsets, sizes=torch.Size([c.sizes[0] // 2, c.sizes[1]]))

    def twice(item):  # two half chunks over the same rows: the right count, one row range twice
        c = item.chunks[0]
        half = type(c)(offsets=c.offsets, sizes=torch.Size([c.sizes[0] // 2, c.sizes[1]]))
        item.chunks[:] = [half, half]

    for name, edit in (("gap", gap), ("twice", twice)):
        with pytest.raises(InputError, match="its chunks do not cover it exactly once"):
            open_checkpoint(variant(name, chunks(edit)))
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / ".metadata").write_bytes(b"\x80\x04not a pickle")
    (tmp_path / "garbage" / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(InputError, match="DCP metadata"):
        open_checkpoint(tmp_path / "garbage")
    # a shard that is a symlink out of the allowed roots
    inside, outside = tmp_path / "root", tmp_path / "elsewhere"
    folder = shutil.copytree(good, inside / "ckpt")
    outside.mkdir()
    shutil.move(folder / "__0_0.distcp", outside / "__0_0.distcp")
    (folder / "__0_0.distcp").symlink_to(outside / "__0_0.distcp")
    with confined([inside]), pytest.raises(Unconfined):
        open_checkpoint(folder)


# --- (c) two weight sets in one folder -------------------------------------------------------------
def test_two_weight_sets_need_prefer_and_trainer_folders_stay_fine(llama, tmp_path):
    base, _, sd, expected, tmp = llama
    other = {k: (v.float() + 1).to(v.dtype) for k, v in sd.items()}  # a different weight set
    folder = tmp_path / "both"
    folder.mkdir()
    shutil.copy(base / "config.json", folder)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    torch.save(other, folder / "pytorch_model.bin")
    save_dcp(dict(other), tmp_path / "dcp_other")
    for f in (tmp_path / "dcp_other").iterdir():
        shutil.copy(f, folder)
    with pytest.raises(InputError, match="3 weight sets") as err:
        open_checkpoint(folder)
    assert all(n in err.value.problem for n in ("model.safetensors", "pytorch_model.bin", ".metadata"))
    (folder / ".metadata").unlink()
    proc = run_cli("analyze", base, folder, "--quiet")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(folder) in lines[0] and "model.safetensors and pytorch_model.bin" in lines[0]
    assert "--prefer safetensors|bin" in lines[0]
    proc = run_cli(
        "analyze", base, folder, "--quiet", "--prefer", "safetensors", "--json", "-", "--tau", *map(str, TAUS)
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    same_figures(doc, expected)
    assert doc["notes"] == ["both: model.safetensors read (--prefer safetensors); ignored: pytorch_model.bin"]
    with preferring("bin"):
        doc = pair(base, folder)
    b, t = ref.load(base), {k: v.to(torch.float64).numpy() for k, v in other.items()}
    assert doc["summary"]["changed"][0]["count"] == sum(
        ref.changed(b[row["name"]], t[row["name"]], TAUS[0]) for row in doc["tensors"]
    )
    with preferring("dcp"), pytest.raises(InputError, match="2 weight sets"):
        open_checkpoint(folder)  # a preference the folder cannot meet changes nothing
    # a Trainer output folder: weights + training_args.bin, optimizer.pt, ... is one weight set
    trainer = tmp_path / "checkpoint-10"
    trainer.mkdir()
    shutil.copy(folder / "model.safetensors", trainer)
    torch.save({"lr": 1.0}, trainer / "training_args.bin")
    torch.save(optimizer_state(), trainer / "optimizer.pt")
    torch.save({"last_epoch": 1}, trainer / "scheduler.pt")
    torch.save({"cpu": torch.get_rng_state()}, trainer / "rng_state.pth")
    (trainer / "trainer_state.json").write_text("{}")
    doc = pair(base, trainer)
    same_figures(doc, expected)
    assert doc["notes"] == []
