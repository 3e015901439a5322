"""Scale-out: a pair, series or overlap analysis of a sharded base fans out as one Celery task per
shard group (a chord) to two real worker processes, and the merged result is identical to one worker's."""

from __future__ import annotations

import json
import shutil

import duckdb
import httpx
import pytest
import torch
from safetensors.torch import save_file
from service import Api, Redis, Worker, running, service_env, wait_done

from deltalens.backend.jobs import shard_groups
from deltalens.worker.analyses import Options, run_analysis
from deltalens.worker.store import write_artifact

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


@pytest.fixture(scope="module")
def tied_and_adapter(tmp_path_factory, sharded_pair):
    """Two inputs a fanned-out part must not lose: a target that stores an output head the sharded
    base reads from its tied embedding, and a LoRA adapter (q_proj, r = 4) over the sharded base."""
    base, _ = sharded_pair
    root = tmp_path_factory.mktemp("tied")
    g = torch.Generator().manual_seed(5)
    tied_base = root / "tied-base"
    shutil.copytree(base, tied_base)
    embed = torch.randn(96, SIZE, generator=g).bfloat16()
    save_file({"model.embed_tokens.weight": embed}, tied_base / "model-embed.safetensors")
    index = json.loads((tied_base / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.embed_tokens.weight"] = "model-embed.safetensors"
    (tied_base / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "untied").mkdir()
    moved = (embed.float() + 1e-2 * torch.randn(embed.shape, generator=g)).bfloat16()
    save_file(
        {"model.embed_tokens.weight": embed, "lm_head.weight": moved}, root / "untied" / "model.safetensors"
    )
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    prefix = "base_model.model.model.layers"
    save_file(
        {
            f"{prefix}.{i}.self_attn.q_proj.lora_{ab}.weight": 0.05 * torch.randn(shape, generator=g)
            for i in range(LAYERS)
            for ab, shape in (("A", (4, SIZE)), ("B", (SIZE, 4)))
        },
        adapter / "adapter_model.safetensors",
    )
    return (tied_base, root / "untied"), (base, adapter)


def test_shard_groups_are_whole_shards_balanced(sharded_pair):
    base, _ = sharded_pair
    groups = shard_groups(base, 2)
    assert len(groups) == 2 and sorted(sum(groups, [])) == sorted(
        json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    )
    assert [len(g) for g in groups] == [16, 16]
    assert len(shard_groups(base, 8)) == SHARDS and shard_groups(base, 1) == []


def artifact_rows(path) -> dict[str, list[str]]:
    """Every table of an artifact: its rows (analysis id and creation time left out), sorted."""
    with duckdb.connect(str(path), read_only=True) as con:
        tables = con.execute(
            "SELECT table_name, list(column_name ORDER BY ordinal_position) "
            "FROM information_schema.columns GROUP BY table_name"
        ).fetchall()
        return {
            table: sorted(
                map(repr, con.execute(f"SELECT {', '.join(kept)} FROM {table}").fetchall())
            )  # repr: NaN equals NaN, floats compare bit for bit
            for table, columns in tables
            if (kept := [c for c in columns if c not in ("analysis_id", "created_at")])
        }


def test_fanned_out_analysis_equals_the_single_worker_run(tmp_path, sharded_pair, tied_and_adapter):
    (tied_base, untied), (base, adapter) = tied_and_adapter
    target = sharded_pair[1]
    analyses = [("pair", pair, [1e-5, 1e-3]) for pair in (sharded_pair, *tied_and_adapter)] + [
        ("series", (base, adapter, target), [1e-5]),  # a LoRA step merged onto the sharded base
        ("overlap", (base, target, adapter), [1e-5]),
        ("series", (tied_base, untied), [1e-5]),  # only the tied head and embedding align: empty parts
    ]
    singles = [
        # geometry off: the merge of per-matrix figures is what is tested here, and SVDs of 96
        # 768×768 matrices would triple the test's time (tests/test_geometry.py covers geometry)
        run_analysis(kind, [str(p) for p in paths], Options(taus=taus, device="cpu", geometry=False))
        for kind, paths, taus in analyses
    ]
    for i, single in enumerate(singles):
        write_artifact(single, tmp_path / f"single{i}.duckdb", f"single{i}")
    redis = Redis(tmp_path / "redis")
    with running(redis):
        env = service_env(
            tmp_path / "data",
            f"{redis.url}/0",
            f"{redis.url}/1",
            "scale",
            [base.parent, tied_and_adapter[0][0].parent],
            DELTALENS_FANOUT="4",
        )
        workers = [Worker(env, tmp_path / f"worker{i}.log") for i in range(2)]
        with (
            running(*workers, Api(env, tmp_path / "api.log")) as (*_, api),
            httpx.Client(base_url=api.url, timeout=30) as client,
        ):
            aids = []
            for kind, paths, taus in analyses:
                answers = [client.post("/api/checkpoints", json={"path": str(p)}).json() for p in paths]
                assert all("id" in a for a in answers), answers
                ids = [a["id"] for a in answers]
                aids.append(
                    client.post(
                        "/api/analyses",
                        json={"kind": kind, "checkpoints": ids, "taus": taus, "geometry": False},
                    ).json()["id"]
                )
            statuses = [wait_done(client, aid, 300) for aid in aids]
            docs = [client.get(f"/api/analyses/{aid}/result").json() for aid in aids]
    for i, (aid, status, doc, single) in enumerate(zip(aids, statuses, docs, singles)):
        assert status["status"] == "done", status
        assert status["detail"]["parts"] >= 2
        assert sum(p["matrices"] for p in status["detail"]["workers"]) == len(single.details)
        assert doc == single.document  # every figure of every matrix, in the same order
        # and the published artifact holds the same rows, table by table
        assert artifact_rows(tmp_path / "data" / "results" / f"{aid}.duckdb") == artifact_rows(
            tmp_path / f"single{i}.duckdb"
        ), analyses[i][0]
    assert statuses[0]["detail"]["parts"] == SHARDS
    assert len({p["worker"] for p in statuses[0]["detail"]["workers"]}) == 2  # both workers took parts
    assert [p["matrices"] for p in statuses[5]["detail"]["workers"]].count(0) >= 2  # layers skipped
    assert [t["source"] for t in docs[5]["tensors"]] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert docs[1]["tensors"][-1]["tied_to"] == "model.embed_tokens.weight"  # the target-only head
    assert [w["code"] for w in docs[1]["warnings"]] == ["tied_embedding"]
    assert len(docs[2]["adapters"][0]["modules"]) == LAYERS  # exact ΔW figures of the adapter
