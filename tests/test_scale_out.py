"""Scale-out: a pair analysis of a sharded checkpoint fans out as one Celery task per shard group
(a chord) to two real worker processes, and the merged result is identical to one worker's."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors.torch import save_file
from service import Api, Redis, Worker, running, service_env, wait_done

from deltalens.backend.jobs import shard_groups
from deltalens.worker.analyses import Options, run_analysis

LAYERS, SHARDS, SIZE = 8, 4, 768


@pytest.fixture(scope="module")
def sharded_pair(tmp_path_factory):
    """bf16, 4 shards of 2 layers each (attention + MLP matrices, norms), HF index; target moves ~30%."""
    root = tmp_path_factory.mktemp("scale")
    g = torch.Generator().manual_seed(3)
    names = [
        (f"model.layers.{i}.{m}", (SIZE, SIZE) if m.endswith("proj.weight") else (SIZE,))
        for i in range(LAYERS)
        for m in (
            "self_attn.q_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.up_proj.weight",
            "input_layernorm.weight",
        )
    ]
    base = {n: torch.randn(s, generator=g).bfloat16() for n, s in names}
    target = {
        n: (
            v.float() + 1e-2 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.3)
        ).bfloat16()
        for n, v in base.items()
    }
    per = len(names) // SHARDS
    for label, state in (("base", base), ("target", target)):
        folder = root / label
        folder.mkdir()
        weight_map = {}
        for k in range(SHARDS):
            shard = f"model-{k + 1:05d}-of-{SHARDS:05d}.safetensors"
            chunk = {n: state[n] for n, _ in names[k * per : (k + 1) * per]}
            save_file(chunk, folder / shard)
            weight_map.update(dict.fromkeys(chunk, shard))
        # HF writes the weight map sorted by name: layer 10 before layer 2, shards interleaved
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})
        )
    return root / "base", root / "target"


def test_shard_groups_are_whole_shards_balanced(sharded_pair):
    base, _ = sharded_pair
    groups = shard_groups(base, 2)
    assert len(groups) == 2 and sorted(sum(groups, [])) == sorted(
        json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    )
    assert [len(g) for g in groups] == [16, 16]
    assert len(shard_groups(base, 8)) == SHARDS and shard_groups(base, 1) == []


def test_fanned_out_analysis_equals_the_single_worker_run(tmp_path, sharded_pair):
    base, target = sharded_pair
    single = run_analysis("pair", [str(base), str(target)], Options(taus=[1e-5, 1e-3], device="cpu")).document
    redis = Redis(tmp_path / "redis")
    with running(redis):
        env = service_env(
            tmp_path / "data",
            f"{redis.url}/0",
            f"{redis.url}/1",
            "scale",
            [base.parent],
            DELTALENS_FANOUT="4",
        )
        workers = [Worker(env, tmp_path / f"worker{i}.log") for i in range(2)]
        with (
            running(*workers, Api(env, tmp_path / "api.log")) as (*_, api),
            httpx.Client(base_url=api.url, timeout=30) as client,
        ):
            ids = [
                client.post("/api/checkpoints", json={"path": str(p)}).json()["id"] for p in (base, target)
            ]
            aid = client.post(
                "/api/analyses", json={"kind": "pair", "checkpoints": ids, "taus": [1e-5, 1e-3]}
            ).json()["id"]
            status = wait_done(client, aid, 300)
            doc = client.get(f"/api/analyses/{aid}/result").json()
    assert status["status"] == "done", status
    assert status["detail"]["parts"] == SHARDS
    assert len({p["worker"] for p in status["detail"]["workers"]}) == 2  # both worker processes took parts
    assert sum(p["matrices"] for p in status["detail"]["workers"]) == len(single["tensors"])
    assert doc["tensors"] == single["tensors"]  # every figure of every matrix, in the same order
    assert doc["summary"] == single["summary"] and doc["skipped"] == single["skipped"]
