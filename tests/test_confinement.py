"""Confinement of every file the reader opens, and pins (hardening round 2, item 2 and `.bin`).

Real processes (tests/service.py): redis-server, a Celery worker and uvicorn in hosted mode. A
checkpoint folder inside an allowed root whose weights, index, shard or config.json is a symlink to a
file outside is refused at registration; a symlink swapped in afterwards, or a file rewritten
afterwards, fails the analysis with a readable reason; pickled weights are refused by path unless
DELTALENS_ALLOW_PICKLE, and with it an upload's pickles are read (in a child process, never in the
API) before the checkpoint is registered.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import duckdb
import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from service import Api, Redis, hosted, running, service_env, wait_done

TOKEN = "confine-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RAW_TEXT = ("Traceback", "Error:", "Exception", "errno", "Errno")  # what a readable reason never shows


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((8, 16)).astype(np.float32),
    }


def folder(path: Path, seed: int) -> Path:
    path.mkdir(parents=True)
    save_file(weights(seed), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def sharded(path: Path, seed: int) -> Path:
    """Two shards and an index, as save_pretrained writes them."""
    path.mkdir(parents=True)
    w = weights(seed)
    index = {}
    for k, (name, value) in enumerate(w.items(), 1):
        shard = f"model-0000{k}-of-00002.safetensors"
        save_file({name: value}, str(path / shard))
        index[name] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Hosted service, pickles off; `root` is the only allowed root, `outside` is not one."""
    tmp = tmp_path_factory.mktemp("confine")
    root, outside = tmp / "models", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    with hosted(tmp, "confine", [root], token=TOKEN) as s:
        yield s.client, root, outside


def register(client: httpx.Client, path: Path) -> httpx.Response:
    return client.post("/api/checkpoints", json={"path": str(path)})


def refused(r: httpx.Response, status: int, code: str, *words: str) -> None:
    body = r.json()
    assert r.status_code == status and set(body) == {"code", "message"} and body["code"] == code, r.text
    assert all(w in body["message"] for w in words), body["message"]
    assert not any(w in body["message"] for w in RAW_TEXT), body["message"]


def analyse(client: httpx.Client, base: str, target: str) -> dict:
    r = client.post("/api/analyses", json={"kind": "pair", "checkpoints": [base, target], "taus": [1e-5]})
    assert r.status_code == 202, r.text
    return wait_done(client, r.json()["id"], timeout=120)


# --- registration ----------------------------------------------------------------------------------
def test_a_symlink_out_of_the_roots_is_refused_at_registration(stack):
    client, root, outside = stack
    secret = folder(outside / "secret", 1)  # a valid checkpoint, but not under an allowed root
    sharded(outside / "secret-sharded", 1)
    before = client.get("/api/checkpoints").json()

    weights_link = folder(root / "weights-link", 2)
    (weights_link / "model.safetensors").unlink()
    (weights_link / "model.safetensors").symlink_to(secret / "model.safetensors")

    index_link = sharded(root / "index-link", 2)  # its own shards, but the index is the outside one
    (index_link / "model.safetensors.index.json").unlink()
    (index_link / "model.safetensors.index.json").symlink_to(
        outside / "secret-sharded" / "model.safetensors.index.json"
    )

    shard_link = sharded(root / "shard-link", 2)
    (shard_link / "model-00002-of-00002.safetensors").unlink()
    (shard_link / "model-00002-of-00002.safetensors").symlink_to(
        outside / "secret-sharded" / "model-00002-of-00002.safetensors"
    )

    config_link = folder(root / "config-link", 2)
    (config_link / "config.json").unlink()
    (config_link / "config.json").symlink_to(secret / "config.json")

    for bad, culprit in [
        (weights_link, "model.safetensors"),
        (index_link, "model.safetensors.index.json"),
        (shard_link, "model-00002-of-00002.safetensors"),
        (config_link, "config.json"),
        (weights_link / "model.safetensors", "model.safetensors"),  # the file itself, by path
    ]:
        r = register(client, bad)
        if bad.name == "model.safetensors":  # resolves outside before anything is opened
            refused(r, 403, "path_not_allowed", "not under an allowed root")
        else:
            refused(r, 403, "path_not_allowed", culprit, "outside the allowed roots")
        assert str(secret) not in r.json()["message"]  # where the link points is not told
    assert client.get("/api/checkpoints").json() == before  # nothing registered

    # a symlink that stays inside the roots is fine (the Hugging Face cache layout: snapshot -> blobs)
    cache = root / "hub"
    (cache / "blobs").mkdir(parents=True)
    save_file(weights(3), str(cache / "blobs" / "4f2a9c"))
    (cache / "snapshot").mkdir()
    (cache / "snapshot" / "model.safetensors").symlink_to(Path("..") / "blobs" / "4f2a9c")
    assert register(client, cache / "snapshot").status_code == 201


def test_pickled_weights_are_refused_by_path_without_allow_pickle(stack):
    client, root, _ = stack
    bin_folder = root / "bin-folder"
    bin_folder.mkdir()
    torch.save({"w": torch.ones(4, 4)}, bin_folder / "pytorch_model.bin")
    (bin_folder / "config.json").write_text("{}")
    refused(register(client, bin_folder), 415, "pickle_refused", "pytorch_model.bin")
    refused(register(client, bin_folder / "pytorch_model.bin"), 415, "pickle_refused")
    # a Trainer folder: safetensors weights next to training_args.bin, which the reader never opens
    trainer = folder(root / "trainer-out", 4)
    torch.save({"lr": 1e-4}, trainer / "training_args.bin")
    assert register(client, trainer).status_code == 201


# --- after registration: the worker checks again ---------------------------------------------------
def test_a_symlink_swapped_in_after_registration_fails_the_analysis(stack):
    client, root, outside = stack
    base = register(client, folder(root / "swap-base", 5)).json()["id"]
    target_dir = folder(root / "swap-target", 6)
    target = register(client, target_dir).json()["id"]
    # the same bytes and mtime outside: the pin alone would not notice, confinement must
    copy = outside / "swap-copy.safetensors"
    shutil.copy2(target_dir / "model.safetensors", copy)
    (target_dir / "model.safetensors").unlink()
    (target_dir / "model.safetensors").symlink_to(copy)
    assert os.stat(target_dir / "model.safetensors").st_mtime_ns == os.stat(copy).st_mtime_ns

    job = analyse(client, base, target)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "path_not_allowed", job["error"]
    message = job["error"]["message"]
    assert "model.safetensors" in message and "outside the allowed roots" in message, message
    assert not any(w in message for w in RAW_TEXT), message


def test_a_file_rewritten_after_registration_fails_with_changed(stack):
    client, root, _ = stack
    base = register(client, folder(root / "pin-base", 7)).json()["id"]
    target_dir = sharded(root / "pin-target", 8)
    target = register(client, target_dir).json()["id"]
    assert analyse(client, base, target)["status"] == "done"  # pinned and unchanged: runs

    shard = target_dir / "model-00001-of-00002.safetensors"
    before = os.stat(shard).st_mtime_ns
    name, value = next(iter(weights(8).items()))
    save_file({name: value + 1}, str(shard))  # same shape and size, other values
    if os.stat(shard).st_mtime_ns == before:  # a coarse clock: make the rewrite visible
        os.utime(shard, ns=(before + 10**9, before + 10**9))

    job = analyse(client, base, target)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "checkpoint_changed", job["error"]
    message = job["error"]["message"]
    assert "changed since it was registered" in message, message
    assert "model-00001-of-00002.safetensors size/mtime differ" in message, message
    assert str(target_dir) in message and not any(w in message for w in RAW_TEXT), message
    # registered again, the new content is pinned and runs
    again = register(client, target_dir).json()["id"]
    assert analyse(client, base, again)["status"] == "done"


def test_a_catalog_from_before_pins_still_opens(tmp_path):
    """The migration: a catalog whose checkpoints table has no pins column gains one; old rows read
    back with pins None (not checked), new rows keep theirs."""
    from deltalens.backend.catalog import Catalog

    path = tmp_path / "catalog.duckdb"
    with duckdb.connect(str(path)) as db:
        db.execute(
            "CREATE TABLE checkpoints (id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, "
            "source VARCHAR NOT NULL, "
            "path VARCHAR NOT NULL, files JSON NOT NULL, bytes BIGINT NOT NULL, sha256 VARCHAR, "
            "created_at TIMESTAMP NOT NULL)"
        )
        db.execute("INSERT INTO checkpoints VALUES ('old', 'old', 'path', '/m/old', '[]', 0, NULL, now())")
    catalog = Catalog(path)
    try:
        assert catalog.checkpoint("old")["pins"] is None
        pins = {"files": {"model.safetensors": {"size": 8, "mtime_ns": 1}}}
        catalog.add_checkpoint(
            id="new", name="new", source="path", path="/m/new", files=[], bytes=0, sha256=None, pins=pins
        )
        assert catalog.checkpoint("new")["pins"] == pins
        assert [c["id"] for c in catalog.checkpoints()] == ["old", "new"]
    finally:
        catalog.close()


# --- pickles allowed: an upload's pickles are read before registration -------------------------------
@pytest.fixture(scope="module")
def pickle_api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("confine-pickle")
    redis = Redis(tmp / "redis")
    with running(redis):
        env = service_env(
            tmp / "data",
            f"{redis.url}/0",
            f"{redis.url}/1",
            "confine-pickle",
            [tmp],
            DELTALENS_TOKEN=TOKEN,
            DELTALENS_ALLOW_PICKLE="1",
        )
        with running(Api(env, tmp / "api.log")) as (api,):
            with httpx.Client(base_url=api.url, timeout=120, headers=AUTH) as client:
                yield client, api, tmp


def upload(client: httpx.Client, files: dict[str, bytes]) -> httpx.Response:
    r = client.post(
        "/api/uploads", json={"name": "u", "files": [{"name": n, "size": len(b)} for n, b in files.items()]}
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    for name, data in files.items():
        assert client.put(f"/api/uploads/{sid}/files/{name}", params={"offset": 0}, content=data).is_success
    return client.post(f"/api/uploads/{sid}/complete")


def saved(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_pickled_uploads_are_checked_before_registration(pickle_api):
    client, api, tmp = pickle_api
    config = json.dumps({"model_type": "llama"}).encode()
    cases = [
        ("not a pickle", b"\xffnot a checkpoint" * 256, "not a torch.save"),
        ("not tensors", saved({"w": torch.ones(4, 4), "step": 5}), "not a state dict"),
    ]
    for what, data, problem in cases:
        r = upload(client, {"pytorch_model.bin": data, "config.json": config})
        refused(r, 422, "invalid_checkpoint", "pytorch_model.bin", problem)
        assert not r.json()["message"].startswith("/"), what  # the file, not the server path
    assert client.get("/api/checkpoints").json() == []  # nothing registered
    good = upload(client, {"pytorch_model.bin": saved({"w": torch.ones(4, 4)}), "config.json": config})
    assert good.status_code == 201, good.text
    assert [c["id"] for c in client.get("/api/checkpoints").json()] == [good.json()["id"]]
    # the pickles were read in a child process: torch never entered the API
    assert "libtorch" not in Path(f"/proc/{api.proc.pid}/maps").read_text()
