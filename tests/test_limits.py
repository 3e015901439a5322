"""Limits before parsing, uploads under concurrency and abandonment, hostile shapes — against the real
service (redis-server, uvicorn, a Celery worker) in hosted mode.

- a 150 MB body without the token is refused with 401 before it is read: /api/health keeps
  answering at once and the API's memory does not grow; with the token, bodies over a route's
  limit get 413 (declared or streamed);
- concurrent PUTs of one file at one offset never grow it past its declared size; the upload
  completes with the right sha256;
- a PUT never hashes the whole file in the request (event) loop;
- upload sessions: a per-client quota, abandoned sessions expire with their files, metadata files
  have a size cap;
- header shapes whose size overflows are refused at upload; zero-size tensors are analysed (skipped as
  `empty`), and an unexpected exception in the worker becomes a readable `failed` reason.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file
from service import Api, hosted, running, service_env, wait_done

TOKEN = "limits-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    (root / "ckpts").mkdir()
    with hosted(root, "limits", [root / "ckpts"], token=TOKEN) as s:
        yield s.api, s.client, root, s.redis


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def health_while(action, api_url: str) -> tuple[object, float]:
    """Run `action` in a thread while polling /api/health; (its result, the slowest health answer)."""
    out, slowest, done = {}, 0.0, threading.Event()

    def run():
        try:
            out["result"] = action()
        finally:
            done.set()

    thread = threading.Thread(target=run)
    with httpx.Client(base_url=api_url, timeout=30) as probe:
        thread.start()
        while not done.is_set():
            started = time.monotonic()
            assert probe.get("/api/health").status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.01)
    thread.join(60)
    return out["result"], slowest


# --- bodies --------------------------------------------------------------------------------------
def test_a_huge_body_without_the_token_is_refused_before_it_is_read(stack):
    api, *_ = stack
    # valid JSON of 150 MB: parsing it (what FastAPI did before checking the token) takes seconds
    body = b'{"kind": "pair", "checkpoints": [' + b'"0123456789ab", ' * 10_000_000 + b'"x"]}'
    assert len(body) > 150_000_000
    pieces = (body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20))  # a fast client
    before = rss_kib(api.proc.pid)

    def send():
        with httpx.Client(base_url=api.url, timeout=60) as anonymous:
            started = time.monotonic()
            r = anonymous.post("/api/analyses", content=pieces, headers={"content-type": "application/json"})
            return r, time.monotonic() - started

    (r, seconds), slowest_health = health_while(send, api.url)
    grown_mib = (rss_kib(api.proc.pid) - before) / 1024
    assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
    assert set(r.json()) == {"code", "message"}
    assert slowest_health < 0.5, f"/api/health took {slowest_health:.2f} s while the body came in"
    assert grown_mib < 50, f"the API grew by {grown_mib:.0f} MiB"
    assert seconds < 10


def test_bodies_over_a_routes_limit_get_413_declared_or_streamed(stack):
    _, client, *_ = stack
    big = b'{"url": "/' + b"a" * (2 << 20) + b'"}'  # 2 MiB: over the 1 MiB JSON limit
    r = client.post("/api/links", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "too_large", r.text

    def chunked():  # no Content-Length: counted as it streams in
        for i in range(0, len(big), 64 << 10):
            yield big[i : i + (64 << 10)]

    r = client.post("/api/links", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "too_large", r.text
    # small bodies still work, on the same connection pool
    r = client.post("/api/links", json={"url": "/analyses/abc?tau=1e-4"})
    assert r.status_code == 201, r.text


# --- uploads -------------------------------------------------------------------------------------
def u8_safetensors(payload: bytes) -> bytes:
    """A valid .safetensors file holding `payload` as one U8 tensor."""
    header = json.dumps({"blob": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}})
    header = header.encode() + b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + payload


def new_upload(client: httpx.Client, files: dict[str, int]) -> httpx.Response:
    return client.post(
        "/api/uploads", json={"name": "limits", "files": [{"name": n, "size": s} for n, s in files.items()]}
    )


def test_concurrent_puts_at_one_offset_never_grow_the_file(stack):
    _, client, *_ = stack
    content = u8_safetensors(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    sid = new_upload(client, {"model.safetensors": len(content)}).json()["id"]
    url = f"/api/uploads/{sid}/files/model.safetensors"
    start = threading.Barrier(6)

    def put() -> httpx.Response:
        def slowly():  # the whole file in 48 pieces over ~0.5 s: the requests overlap
            for i in range(0, len(content), 64 << 10):
                yield content[i : i + (64 << 10)]
                time.sleep(0.01)

        with httpx.Client(base_url=client.base_url, timeout=60, headers=AUTH) as own:
            start.wait()
            return own.put(url, params={"offset": 0}, content=slowly())

    results: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: results.append(put())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted((r.status_code, r.json().get("code")) for r in results)
    assert all(c in ((200, None), (409, "upload_busy")) for c in codes), codes
    assert (409, "upload_busy") in codes, codes  # they did overlap, and all but one were turned away
    assert any(r.status_code == 200 for r in results)
    status = client.get(f"/api/uploads/{sid}").json()
    assert status["files"][0]["received"] == len(content) and status["complete"], status
    done = client.post(f"/api/uploads/{sid}/complete")
    assert done.status_code == 201, done.text
    files = client.get(f"/api/checkpoints/{done.json()['id']}").json()["files"]
    assert files[0]["sha256"] == hashlib.sha256(content).hexdigest()


def test_a_put_never_hashes_the_whole_file_in_the_event_loop(stack):
    """A file whose first 512 MiB came in before an API restart (the hasher is gone): the next chunk,
    and one that fails, answer at once; the sha256 is computed at completion, off the event loop."""
    api, client, root, _ = stack
    payload_size = 512 << 20
    # the header of a U8 tensor of 512 MiB; the payload is zeros (a sparse file on disk)
    header = json.dumps({"blob": {"dtype": "U8", "shape": [payload_size], "data_offsets": [0, payload_size]}})
    header = header.encode() + b" " * (-len(header) % 8)
    head = struct.pack("<Q", len(header)) + header
    size = len(head) + payload_size
    sid = new_upload(client, {"model.safetensors": size}).json()["id"]
    part = root / "data" / "uploads" / sid / "model.safetensors.part"
    with open(part, "r+b") as f:  # what the earlier PUTs (before the restart) left
        f.write(head)
        f.truncate(size - 2)
    started, expected, zeros = time.monotonic(), hashlib.sha256(head), bytes(64 << 20)
    for _ in range(payload_size // len(zeros)):
        expected.update(zeros)
    hash_s = time.monotonic() - started  # what hashing the prefix inside a request would cost
    url = f"/api/uploads/{sid}/files/model.safetensors"

    def put(data: bytes) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        r = client.put(url, params={"offset": size - 2}, content=data)
        return r, time.monotonic() - started

    (failed, failed_s), health_failed = health_while(lambda: put(b"\0\0\0"), api.url)  # past the size
    (ok, ok_s), health_ok = health_while(lambda: put(b"\0\0"), api.url)
    assert failed.status_code == 413 and ok.status_code == 200, (failed.text, ok.text)
    budget = max(0.1, hash_s / 3)
    assert failed_s < budget and ok_s < budget, (failed_s, ok_s, hash_s)
    assert max(health_failed, health_ok) < budget
    # completion hashes the file from disk, in the thread pool: /api/health keeps answering meanwhile
    done, health_complete = health_while(lambda: client.post(f"/api/uploads/{sid}/complete"), api.url)
    assert done.status_code == 201, done.text
    assert health_complete < max(0.25, hash_s / 3)
    files = client.get(f"/api/checkpoints/{done.json()['id']}").json()["files"]
    assert files[0]["sha256"] == expected.hexdigest()


def test_a_failed_chunk_keeps_the_file_and_its_hash_consistent(stack):
    _, client, *_ = stack
    content = u8_safetensors(bytes(range(256)) * 4096)
    sid = new_upload(client, {"model.safetensors": len(content)}).json()["id"]
    url = f"/api/uploads/{sid}/files/model.safetensors"
    half = len(content) // 2
    assert client.put(url, params={"offset": 0}, content=content[:half]).json()["received"] == half
    over = client.put(url, params={"offset": half}, content=content[half:] + b"extra")
    assert over.status_code == 413 and over.json()["code"] == "too_large"
    assert client.get(f"/api/uploads/{sid}").json()["files"][0]["received"] == half
    assert client.put(url, params={"offset": half}, content=content[half:]).status_code == 200
    done = client.post(f"/api/uploads/{sid}/complete")
    assert done.status_code == 201, done.text
    files = client.get(f"/api/checkpoints/{done.json()['id']}").json()["files"]
    assert files[0]["sha256"] == hashlib.sha256(content).hexdigest()


def test_metadata_files_have_a_size_cap(stack):
    _, client, *_ = stack
    r = new_upload(client, {"config.json": 1 << 30, "model.safetensors": 100})
    assert r.status_code == 413 and r.json()["code"] == "too_large", r.text
    assert "config.json" in r.json()["message"]
    assert new_upload(client, {"config.json": 4096, "model.safetensors": 100}).status_code == 201


def test_upload_sessions_have_a_quota_per_client_and_expire(stack, tmp_path):
    *_, redis = stack
    env = service_env(
        tmp_path / "data",
        f"{redis.url}/2",
        f"{redis.url}/3",
        "quota",
        [tmp_path],
        DELTALENS_TOKEN=TOKEN,
        DELTALENS_MAX_UPLOAD_SESSIONS="3",
        DELTALENS_UPLOAD_SESSION_TTL="2",
    )
    with (
        running(Api(env, tmp_path / "api.log")) as (api,),
        httpx.Client(base_url=api.url, timeout=30, headers=AUTH) as client,
    ):
        sessions = [new_upload(client, {"model.safetensors": 1000}) for _ in range(3)]
        assert [r.status_code for r in sessions] == [201] * 3
        over = new_upload(client, {"model.safetensors": 1000})
        assert over.status_code == 429 and over.json()["code"] == "too_many_uploads", over.text
        sids = [r.json()["id"] for r in sessions]
        uploads = tmp_path / "data" / "uploads"
        time.sleep(1)
        url = f"/api/uploads/{sids[0]}/files/model.safetensors"
        assert client.put(url, content=bytes(10)).status_code == 200  # this one is alive
        time.sleep(1.5)  # the other two: no byte for more than the TTL
        fresh = new_upload(client, {"model.safetensors": 1000})
        assert fresh.status_code == 201, fresh.text
        assert client.get(f"/api/uploads/{sids[0]}").status_code == 200
        for sid in sids[1:]:
            assert client.get(f"/api/uploads/{sid}").status_code == 404
            assert not (uploads / sid).exists()
        time.sleep(2.5)  # now the first one is abandoned too: removed when next looked at
        assert client.get(f"/api/uploads/{sids[0]}").status_code == 404
        assert not (uploads / sids[0]).exists()


# --- hostile shapes, and failures in the worker --------------------------------------------------
def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def upload_file(client: httpx.Client, path: Path) -> httpx.Response:
    sid = new_upload(client, {path.name: path.stat().st_size}).json()["id"]
    r = client.put(f"/api/uploads/{sid}/files/{path.name}", content=path.read_bytes())
    assert r.status_code == 200, r.text
    return client.post(f"/api/uploads/{sid}/complete")


# each is otherwise well-formed (its bytes match its shape): before, all were stored, then broke the worker
@pytest.mark.parametrize(
    "shape, nbytes",
    [([2**62, 2**62, 0], 0), ([2**70, 0], 0), ([0, 2**40, 2**40], 0), ([1] * 65, 4)],
    ids=["product-overflows", "dim-over-64-bits", "numpy-too-big", "65-dims"],
)
def test_shapes_whose_size_overflows_are_refused_at_upload(stack, tmp_path, shape, nbytes):
    _, client, *_ = stack
    path = raw_safetensors(
        tmp_path / "model.safetensors",
        {
            "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "big": {"dtype": "F32", "shape": shape, "data_offsets": [16, 16 + nbytes]},
        },
        bytes(16 + nbytes),
    )
    r = upload_file(client, path)
    assert r.status_code == 422 and r.json()["code"] == "invalid_checkpoint", r.text
    message = r.json()["message"]
    assert "'big'" in message and ("too large" in message or "dimensions exceed" in message), message


def analyse(client: httpx.Client, ids: list[str]) -> dict:
    r = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids})
    assert r.status_code == 202, r.text
    return wait_done(client, r.json()["id"], 120)


def test_zero_size_tensors_are_analysed_as_empty(stack, tmp_path):
    _, client, *_ = stack
    ids = []
    for scale in (1, 2):
        path = tmp_path / str(scale) / "model.safetensors"
        path.parent.mkdir()
        empty = np.zeros((0, 4), np.float32)
        save_file({"w": np.full((4, 4), scale, np.float32), "e": empty, "s": np.zeros((3, 0))}, str(path))
        r = upload_file(client, path)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    status = analyse(client, ids)
    assert status["status"] == "done", status
    result = client.get(f"/api/analyses/{status['id']}/result").json()
    assert sorted(result["skipped"]["empty"]) == ["e", "s"]
    assert result["summary"]["numel"] == 16 and result["summary"]["changed"][0]["count"] == 16


def test_an_unexpected_error_in_the_worker_is_a_readable_failure(stack):
    """A config.json whose head count is a string: the engine trips over it (a TypeError). The analysis
    fails with a reason in words, not the exception's own text."""
    _, client, root, _ = stack
    ids = []
    for scale in (1, 2):
        folder = root / "ckpts" / f"odd-config-{scale}"
        folder.mkdir()
        weight = np.full((24, 8), scale, np.float32)
        save_file(
            {"gpt_neox.layers.0.attention.query_key_value.weight": weight}, str(folder / "model.safetensors")
        )
        (folder / "config.json").write_text(
            json.dumps({"model_type": "gpt_neox", "num_attention_heads": "x"})
        )
        r = client.post("/api/checkpoints", json={"path": str(folder)})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    status = analyse(client, ids)
    assert status["status"] == "failed", status
    error = status["error"]
    assert error["code"] == "worker_error", error
    assert "unexpected error (TypeError)" in error["message"], error
    assert "unsupported operand" not in error["message"] and "Traceback" not in error["message"]
