"""Update-mask export as a worker job: real redis-server, a real Celery worker, uvicorn in hosted mode.

POST /api/analyses/{id}/masks queues `deltalens.export_mask`; the worker writes
masks/<analysis>/<mask>.safetensors (or a readable reason); the API serves the finished file. The API
never computes a mask, never unpickles and never imports torch; hostile checkpoints end in a failed
mask job, never in a 200 that dies mid-stream; creating jobs needs the token and is rate-limited.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_safetensors
from safetensors.torch import save_file
from service import Api, hosted, wait_done, wait_for

from deltalens.worker.errors import InputError
from deltalens.worker.mask_export import write_mask

TOKEN = "mask-token"
PER_MINUTE = 12


def _tensors(seed: int, moved: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = {
        "layers.0.w": torch.randn(24, 16, generator=g),
        "layers.0.b": torch.randn(40, generator=g).to(torch.bfloat16),
        "layers.1.w": torch.randn(8, 8, generator=g).to(torch.float16),
    }
    if not moved:
        return base
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        step = torch.randn(t.shape, generator=g) * 1e-3 * (torch.rand(t.shape, generator=g) < moved)
        out[name] = (t.float() + step).to(t.dtype)
    return out


def _expected(base: dict, target: dict, tau: float, relative: bool = False) -> dict[str, np.ndarray]:
    out = {}
    for name, b in base.items():
        b64, t64 = b.double().numpy(), target[name].double().numpy()
        out[name] = np.abs(t64 - b64) > (tau * np.abs(b64) if relative else tau)
    return out


def _unpack(stored: dict, expected: dict) -> dict:
    return {
        n: np.unpackbits(v, bitorder="little")[: expected[n].size].reshape(expected[n].shape).astype(bool)
        for n, v in stored.items()
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    ckpts = root / "ckpts"
    base, target = _tensors(0, 0), _tensors(1, 0.3)
    for folder in ("st", "swap"):
        (ckpts / folder).mkdir(parents=True)
        save_file(base, str(ckpts / folder / "base.safetensors"))
        save_file(target, str(ckpts / folder / "target.safetensors"))
    (ckpts / "bin").mkdir()
    torch.save(base, ckpts / "bin" / "base.bin")
    torch.save(target, ckpts / "bin" / "target.bin")
    limits = {"DELTALENS_ALLOW_PICKLE": "1", "DELTALENS_MASK_JOBS_PER_MINUTE": str(PER_MINUTE)}
    with hosted(root, "masks", [ckpts], token=TOKEN, timeout=30, **limits) as s:
        yield {
            "client": s.client,
            "api": s.api,
            "data": root / "data",
            "ckpts": ckpts,
            "base": base,
            "target": target,
        }


def _analyse(client: httpx.Client, base: Path, target: Path) -> str:
    ids = []
    for path in (base, target):
        r = client.post("/api/checkpoints", json={"path": str(path)})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    r = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids, "taus": [1e-4]})
    assert r.status_code == 202, r.text
    status = wait_done(client, r.json()["id"], timeout=120)
    assert status["status"] == "done", status
    return status["id"]


def _mask(client: httpx.Client, aid: str, **body) -> dict:
    """Create a mask job and poll it until it is done or failed."""
    r = client.post(f"/api/analyses/{aid}/masks", json=body)
    assert r.status_code == 202, r.text
    mid = r.json()["id"]
    return wait_for(
        lambda: (
            (s := client.get(f"/api/analyses/{aid}/masks/{mid}").json())["status"] in ("done", "failed") and s
        ),
        60,
        0.1,
        what=f"mask {mid}",
    )


@pytest.fixture(scope="module")
def st_pair(stack):
    return _analyse(
        stack["client"],
        stack["ckpts"] / "st" / "base.safetensors",
        stack["ckpts"] / "st" / "target.safetensors",
    )


@pytest.mark.parametrize("fmt", ["bool", "packed"])
def test_mask_job_file_matches_numpy(stack, st_pair, fmt):
    client = stack["client"]
    status = _mask(client, st_pair, tau=1e-4, format=fmt)
    assert status["status"] == "done", status
    assert status["file"] == f"/api/analyses/{st_pair}/masks/{status['id']}/file"
    r = client.get(status["file"])
    assert r.status_code == 200 and len(r.content) == status["size"] == int(r.headers["content-length"])
    assert "attachment" in r.headers["content-disposition"]
    stored = load_safetensors(r.content)
    expected = _expected(stack["base"], stack["target"], 1e-4)
    assert set(stored) == set(expected)
    if fmt == "packed":
        stored = _unpack(stored, expected)
    for name in expected:
        assert np.array_equal(stored[name], expected[name]), name
    # published whole, under the data folder, by the worker
    published = stack["data"] / "masks" / st_pair / f"{status['id']}.safetensors"
    assert published.read_bytes() == r.content


def test_relative_mode_and_defaults(stack, st_pair):
    client = stack["client"]
    status = _mask(client, st_pair, relative=True, tau=1e-3)
    assert status["status"] == "done" and status["relative"] is True and status["run"] == 1, status
    stored = load_safetensors(client.get(status["file"]).content)
    expected = _expected(stack["base"], stack["target"], 1e-3, relative=True)
    for name in expected:
        assert np.array_equal(stored[name], expected[name]), name
    default = _mask(client, st_pair)  # the analysis' first τ and mode
    assert (default["tau"], default["relative"], default["format"]) == (1e-4, False, "bool")


def test_the_same_mask_is_computed_once(stack, st_pair):
    client = stack["client"]
    first = _mask(client, st_pair, tau=2e-4, format="packed")
    published = stack["data"] / "masks" / st_pair / f"{first['id']}.safetensors"
    stamp = published.stat().st_mtime_ns
    again = client.post(f"/api/analyses/{st_pair}/masks", json={"tau": 2e-4, "format": "packed", "run": -1})
    assert again.status_code == 202 and again.json()["id"] == first["id"]
    assert again.json()["status"] == "done"  # served from the cache at once, not queued again
    assert published.stat().st_mtime_ns == stamp
    other = client.post(f"/api/analyses/{st_pair}/masks", json={"tau": 2e-4, "format": "bool"})
    assert other.json()["id"] != first["id"]


def test_writes_need_the_token_reads_do_not(stack, st_pair):
    client, api = stack["client"], stack["api"]
    done = _mask(client, st_pair, tau=1e-4)
    with httpx.Client(base_url=api.url, timeout=30) as anonymous:
        r = anonymous.post(f"/api/analyses/{st_pair}/masks", json={"tau": 3e-4})
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        assert anonymous.get(f"/api/analyses/{st_pair}/masks/{done['id']}").json()["status"] == "done"
        assert anonymous.get(done["file"]).status_code == 200
    # the old in-API stream is gone
    assert client.get(f"/api/analyses/{st_pair}/mask").status_code == 404


def test_bad_requests_are_4xx_json(stack, st_pair):
    client = stack["client"]
    for body, status in (({"run": 0}, 422), ({"run": 2}, 422), ({"tau": -1}, 422), ({"format": "npz"}, 422)):
        r = client.post(f"/api/analyses/{st_pair}/masks", json=body)
        assert r.status_code == status and set(r.json()) == {"code", "message"}, (body, r.text)
    assert client.post("/api/analyses/nope/masks", json={}).status_code == 404
    for mid in ("0123456789abcdef", "%2e%2e", "..%2f..%2fcatalog", "ABCDEF0123456789"):
        r = client.get(f"/api/analyses/{st_pair}/masks/{mid}")
        assert r.status_code == 404 and r.json()["code"] == "not_found", mid
        assert client.get(f"/api/analyses/{st_pair}/masks/{mid}/file").status_code == 404


def _api_libraries(api: Api) -> str:
    return Path(f"/proc/{api.proc.pid}/maps").read_text()


def test_bin_mask_is_computed_by_the_worker_and_the_api_never_imports_torch(stack):
    client, api = stack["client"], stack["api"]
    aid = _analyse(client, stack["ckpts"] / "bin" / "base.bin", stack["ckpts"] / "bin" / "target.bin")
    status = _mask(client, aid, tau=1e-4, format="packed")
    assert status["status"] == "done", status
    stored = load_safetensors(client.get(status["file"]).content)
    expected = _expected(stack["base"], stack["target"], 1e-4)
    stored = _unpack(stored, expected)
    for name in expected:
        assert np.array_equal(stored[name], expected[name]), name
    # the API process mapped no torch library: it neither imported torch nor unpickled anything
    maps = _api_libraries(api)
    assert "libtorch" not in maps and "/torch/" not in maps


def _overflowing_shape(path: Path) -> None:
    """A header that passes the byte checks (0 elements, 0 bytes) but whose shape no array can hold."""
    header = json.dumps(
        {name: {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]} for name in ("layers.0.w",)}
    ).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_changed_or_hostile_files_give_a_failed_mask_job_not_a_broken_download(stack):
    client = stack["client"]
    swap = stack["ckpts"] / "swap"
    aid = _analyse(client, swap / "base.safetensors", swap / "target.safetensors")
    good = {p: (p.read_bytes(), p.stat()) for p in swap.iterdir()}
    try:
        # the files change after the analysis: shapes that overflow, then a truncated file
        for p in good:
            _overflowing_shape(p)
        failed = _mask(client, aid, tau=1e-4)
        assert failed["status"] == "failed" and failed["file"] is None, failed
        assert failed["error"]["code"] in ("checkpoint_changed", "invalid_checkpoint"), failed
        message = failed["error"]["message"]
        assert "base.safetensors" in message, message
        assert "Traceback" not in message and "Error" not in message, message
        r = client.get(f"/api/analyses/{aid}/masks/{failed['id']}/file")
        assert r.status_code == 409 and r.json()["code"] == "mask_failed"
        (swap / "target.safetensors").write_bytes(b"\x01\x02\x03")
        truncated = _mask(client, aid, tau=5e-4)
        assert truncated["status"] == "failed", truncated
    finally:
        for p, (data, st) in good.items():  # the same bytes and times as when they were registered
            p.write_bytes(data)
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    # a failed mask is tried again on request: with the files back, it is done
    again = _mask(client, aid, tau=1e-4)
    assert again["id"] == failed["id"] and again["status"] == "done", again


def test_deleting_the_analysis_removes_its_masks(stack):
    client = stack["client"]
    swap = stack["ckpts"] / "swap"
    aid = _analyse(client, swap / "base.safetensors", swap / "target.safetensors")
    status = _mask(client, aid, format="packed")
    assert (stack["data"] / "masks" / aid / f"{status['id']}.safetensors").exists()
    assert client.delete(f"/api/analyses/{aid}").status_code == 204
    assert not (stack["data"] / "masks" / aid).exists()
    assert client.get(f"/api/analyses/{aid}/masks/{status['id']}").status_code == 404


def test_creating_mask_jobs_is_rate_limited_per_client(stack, st_pair):
    """Last in this module: it uses up the client's quota for a minute."""
    client = stack["client"]
    cached = _mask(client, st_pair, tau=1e-4)
    codes = []
    for k in range(PER_MINUTE + 1):
        r = client.post(f"/api/analyses/{st_pair}/masks", json={"tau": 1e-2 + k * 1e-3})
        codes.append(r.status_code)
        if r.status_code == 429:
            assert r.json()["code"] == "rate_limited" and "per minute" in r.json()["message"]
            break
    assert codes[-1] == 429 and len(codes) <= PER_MINUTE, codes
    # a mask already made is still served while the client is limited
    r = client.post(f"/api/analyses/{st_pair}/masks", json={"tau": 1e-4})
    assert r.status_code == 202 and r.json()["id"] == cached["id"] and r.json()["status"] == "done"


# --- the export itself, without the service -----------------------------------------------------
def test_zero_size_tensors_give_zero_size_masks(tmp_path):
    tensors = {"empty": np.zeros((0, 4), np.float32), "w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    moved = {**tensors, "w": tensors["w"] + np.array([[0, 1, 0], [0, 0, 1]], np.float32)}
    from safetensors.numpy import save_file as save_numpy

    save_numpy(tensors, str(tmp_path / "b.safetensors"))
    save_numpy(moved, str(tmp_path / "t.safetensors"))
    for packed in (False, True):
        out = tmp_path / f"mask-{packed}.safetensors"
        size = write_mask(
            str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), 0.5, False, packed, out
        )
        assert out.stat().st_size == size
        stored = load_safetensors(out.read_bytes())
        assert stored["empty"].size == 0
        w = stored["w"] if not packed else np.unpackbits(stored["w"], bitorder="little")[:6].reshape(2, 3)
        assert w.astype(bool).tolist() == [[False, True, False], [False, False, True]]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # nothing half-written left


def test_overflowing_shape_is_an_input_error_and_nothing_is_published(tmp_path):
    _overflowing_shape(tmp_path / "b.safetensors")
    _overflowing_shape(tmp_path / "t.safetensors")
    out = tmp_path / "mask.safetensors"
    with pytest.raises(InputError, match="layers.0.w|shape"):
        write_mask(str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), 1e-4, False, False, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "t.safetensors"]
