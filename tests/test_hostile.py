"""Every case of the hostile corpus (tests/hostile.py) through the CLI, the upload API and
register-by-path: a clear refusal, no worker crash, nothing executed, the store unchanged.
Figures go to test-output/reliability/hostile.json (docs/reliability.md)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import run_cli
from hostile import CASES
from safetensors.numpy import save_file
from service import hosted, wait_done

FIGURES = Path(__file__).resolve().parents[1] / "test-output" / "reliability"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("hostile")
    good = root / "good.safetensors"
    save_file({"w": np.ones((4, 4), np.float32)}, str(good))
    return good, {case.name: case.build(root / "corpus") for case in CASES}


def record(name: str, rows: list[dict]) -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    failed = [r for r in rows if not r["ok"]]
    (FIGURES / f"{name}.json").write_text(
        json.dumps({"cases": len(rows), "passed": len(rows) - len(failed), "rows": rows}, indent=1)
    )
    assert not failed, failed


def test_cli_refuses_every_case_in_one_line(corpus):
    good, paths = corpus
    rows = []
    for case in CASES:
        path = paths[case.name]
        proc = run_cli("analyze", good, path)
        line = proc.stderr.strip()
        ok = (
            proc.returncode == 2
            and proc.stderr.count("\n") == 1
            and "Traceback" not in proc.stderr
            and str(path) in line
            and case.problem in line
            and proc.stdout == ""
            and not (path.parent / "PWNED").exists()
        )
        rows.append({"case": case.name, "exit": proc.returncode, "message": line[:300], "ok": ok})
    record("hostile_cli", rows)


# --- the service ---------------------------------------------------------------------------------
def snapshot(client: httpx.Client, data: Path) -> tuple:
    files = sorted(
        str(p.relative_to(data))
        for p in data.rglob("*")
        if p.is_file() and p.name != "catalog.duckdb" and not p.name.startswith("catalog.duckdb")
    )
    return files, client.get("/api/checkpoints").json(), client.get("/api/analyses").json()


def upload(client: httpx.Client, path: Path) -> httpx.Response:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    r = client.post(
        "/api/uploads",
        json={"name": path.parent.name, "files": [{"name": p.name, "size": p.stat().st_size} for p in files]},
    )
    if r.status_code != 201:
        return r
    sid = r.json()["id"]
    for p in files:
        with open(p, "rb") as f:
            offset = 0
            while chunk := f.read(16 << 20):
                r = client.put(f"/api/uploads/{sid}/files/{p.name}", params={"offset": offset}, content=chunk)
                assert r.status_code == 200, r.text
                offset += len(chunk)
    return client.post(f"/api/uploads/{sid}/complete")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, corpus):
    good, paths = corpus
    root = tmp_path_factory.mktemp("hostile-stack")
    with hosted(root, "hostile", [good.parent], DELTALENS_MAX_UPLOAD_BYTES=str(128 << 20)) as s:
        yield s.client, root / "data", s.workers[0]


def refused(r: httpx.Response, status: int, problem: str) -> bool:
    body = r.json()
    return (
        r.status_code == status
        and set(body) == {"code", "message"}
        and (status != 422 or problem in body["message"])
    )


def test_api_refuses_every_case_and_keeps_the_store(stack, corpus):
    client, data, worker = stack
    good, paths = corpus
    base = client.post("/api/checkpoints", json={"path": str(good)}).json()["id"]
    pids = [worker.proc.pid, *worker.children()]
    rows = []
    for case in CASES:
        path = paths[case.name]
        before = snapshot(client, data)
        up, reg = upload(client, path), client.post("/api/checkpoints", json={"path": str(path)})
        row = {
            "case": case.name,
            "upload": up.status_code,
            "upload_message": up.json().get("message", "")[:200],
            "register": reg.status_code,
        }
        if case.values:  # well-formed: stored, and the analysis fails with the reason
            aid = client.post(
                "/api/analyses", json={"kind": "pair", "checkpoints": [base, up.json()["id"]]}
            ).json()["id"]
            status = wait_done(client, aid, 120)
            row["analysis"] = status["status"], status["error"]
            row["ok"] = (
                up.status_code == reg.status_code == 201
                and status["status"] == "failed"
                and case.problem in status["error"]["message"]
            )
            for cid in (up.json()["id"], reg.json()["id"]):  # not part of the comparison below
                assert client.get(f"/api/checkpoints/{cid}").status_code == 200
        else:
            why = "" if case.pickle else case.problem  # by path, a .bin is refused before anything reads it
            row["ok"] = (
                refused(up, case.status, case.problem)
                and refused(reg, case.status if case.pickle else 422, why)  # pickles: 415 either way
                and snapshot(client, data) == before
            )
        row["ok"] = row["ok"] and not (path.parent / "PWNED").exists()
        rows.append(row)
    # the worker survived all of it and still computes
    assert [worker.proc.pid, *worker.children()] == pids
    target = data.parent / "target.safetensors"
    save_file({"w": np.full((4, 4), 2, np.float32)}, str(target))
    target_id = upload(client, target).json()["id"]
    aid = client.post("/api/analyses", json={"kind": "pair", "checkpoints": [base, target_id]}).json()["id"]
    assert wait_done(client, aid)["status"] == "done"
    assert client.get(f"/api/analyses/{aid}/result").json()["summary"]["changed"][0]["count"] == 16
    record("hostile_api", rows)
