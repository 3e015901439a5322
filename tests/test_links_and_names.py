"""Short links only lead to this site and are built from DELTALENS_PUBLIC_URL, never from the Host
header; the docs' relaxed CSP is chosen by exact path; a cancel that races a finishing worker ends in
one consistent state without an orphan artifact; what finished or deleted analyses leave in the data
folder (cancel markers, attempt counters, parts, task states) is cleaned.

Real uvicorn and Celery worker processes with the filesystem broker and the file result backend, as
`deltalens up` runs them; the API sweeps every 0.3 s here (DELTALENS_SWEEP_INTERVAL)."""

from __future__ import annotations

import http.client
import os
import secrets
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from service import ROOT, Api, Worker, running, service_env, wait_done, wait_for

from deltalens.backend.catalog import Catalog
from deltalens.backend.headers import DASHBOARD_CSP, DOCS_CSP
from deltalens.worker.service import safe_environment, worker_command

TOKEN = "links-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MONTH_AGO = time.time() - 30 * 24 * 3600


def local_env(root: Path, roots: list[Path], backend: Path | None = None, **extra: str) -> dict:
    """`deltalens up`'s transports in `root`: the filesystem broker, the file result backend."""
    backend = backend or root / "celery-results"
    backend.mkdir(parents=True, exist_ok=True)
    return service_env(
        root / "data",
        "filesystem://",
        f"file://{backend}",
        "links",
        roots,
        DELTALENS_TOKEN=TOKEN,
        DELTALENS_SWEEP_INTERVAL="0.3",
        **extra,
    )


def leftovers(data: Path, results: Path, aid: str) -> list[str]:
    """Everything the data folder and the result backend still hold for analysis `aid`."""
    found = [
        *(data / "cancel").glob(aid),
        *(data / "attempts").glob(f"{aid}*"),
        *(data / "results").glob(f"{aid}.parts"),
        *(data / "results").glob(f".{aid}.duckdb.tmp-*"),
        *results.glob(f"celery-task-meta-{aid}*"),
    ]
    return sorted(str(p.relative_to(p.parents[1])) for p in found)


class LoggingWorker(Worker):
    """A worker that logs each task's outcome (INFO)."""

    def start(self) -> LoggingWorker:
        self.proc = subprocess.Popen(
            worker_command(self.env["DELTALENS_QUEUE"], "INFO"),
            env=safe_environment(self.env),
            cwd=ROOT,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self


def old_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os.utime(path, (MONTH_AGO, MONTH_AGO))
    return path


LEGACY = {  # links stored before they were checked: what old code let in
    "legacy-four-slashes": "//evil.example/x",
    "legacy-backslash": "/\\evil.example/x",
    "legacy-encoded": "/%2F%2Fevil.example/x",
    "legacy-scheme": "https://evil.example/x",
    "legacy-fine": "/analyses?tau=1e-4",
}
STALE_ID, FRESH_ID = "5ca1ab1e0001", "5ca1ab1e0002"  # analyses this catalog never had


@pytest.fixture(scope="module")
def site(tmp_path_factory, family_pair):
    root = tmp_path_factory.mktemp("links")
    data = root / "data"
    data.mkdir()
    catalog = Catalog(data / "catalog.duckdb")
    for code, url in LEGACY.items():
        catalog.add_link(code, url)
    catalog.close()
    # leftovers of an analysis deleted long ago, and a fresh marker of one that may still be queued
    for path in (
        data / "cancel" / STALE_ID,
        data / "attempts" / STALE_ID,
        data / "attempts" / f"{STALE_ID}.1",
        data / "results" / f"{STALE_ID}.duckdb",
        data / "results" / f"{STALE_ID}.parts" / "0.json",
        root / "celery-results" / f"celery-task-meta-{STALE_ID}-p0",
    ):
        old_file(path)
    os.utime(data / "results" / f"{STALE_ID}.parts", (MONTH_AGO, MONTH_AGO))
    (data / "cancel" / FRESH_ID).touch()
    env = local_env(root, [family_pair("llama")[0].parent], DELTALENS_FANOUT="2")
    with running(Worker(env, root / "worker.log"), Api(env, root / "api.log")) as (_, api):
        with httpx.Client(base_url=api.url, timeout=30, headers=AUTH) as client:
            yield client, data, root / "celery-results"


def register(client: httpx.Client, path: Path) -> str:
    r = client.post("/api/checkpoints", json={"path": str(path)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def submit(client: httpx.Client, ids: list[str]) -> str:
    r = client.post("/api/analyses", json={"kind": "pair", "checkpoints": ids, "taus": [1e-5]})
    assert r.status_code == 202, r.text
    return r.json()["id"]


# --- short links ----------------------------------------------------------------------------------
OFF_SITE = [
    "//evil.example/x",
    "////evil.example/x",  # old code stored this as //evil.example/x
    "///evil.example",
    "/\\evil.example/x",
    "\\\\evil.example/x",
    "\\/evil.example",
    "/\t/evil.example/x",  # browsers drop tabs and newlines anywhere in a URL
    "/\n/evil.example/x",
    "\t//evil.example",
    "/%2F/evil.example",
    "/%2f%2fevil.example",
    "/%5Cevil.example",
    "/%252F%252Fevil.example",  # encoded twice
    "/%09/evil.example",
    "/analyses/../../evil",
    "/analyses/%2e%2e/x",
    "https://evil.example/analyses",
    "javascript:alert(1)",
    "evil.example/analyses",
    "/analyses\x00",
    "",
]


@pytest.mark.parametrize("url", OFF_SITE, ids=repr)
def test_a_link_off_this_site_is_refused(site, url):
    client, _, _ = site
    r = client.post("/api/links", json={"url": url})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request", (url, r.status_code, r.text)


def test_short_links_lead_to_views_on_this_site_only(site):
    client, _, _ = site
    # the Host header and forwarding headers do not make the link: without a public URL it is relative
    r = client.post(
        "/api/links",
        json={"url": "/analyses/ab12?tau=1e-4&metric=rank_pct"},
        headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"},
    )
    assert r.status_code == 201, r.text
    link = r.json()
    assert (
        link["short_url"] == f"/s/{link['code']}" and link["url"] == "/analyses/ab12?tau=1e-4&metric=rank_pct"
    )
    follow = client.get(link["short_url"], follow_redirects=False)
    assert follow.status_code == 307 and follow.headers["location"] == link["url"]
    # tabs and newlines are dropped as a browser would, then the path is stored
    assert client.post("/api/links", json={"url": "\t/compare?ids=a,b\n"}).json()["url"] == "/compare?ids=a,b"
    # links stored by older versions: never a redirect off the site
    for code, url in LEGACY.items():
        r = client.get(f"/s/{code}", follow_redirects=False)
        if code == "legacy-fine":
            assert r.status_code == 307 and r.headers["location"] == url
        else:
            assert r.status_code == 404 and r.json()["code"] == "not_found", (code, r.status_code, r.headers)
            assert "location" not in r.headers


def test_short_url_comes_from_the_public_url(tmp_path, family_pair):
    env = local_env(tmp_path, [], DELTALENS_PUBLIC_URL="https://lens.example.org/")
    with running(Api(env, tmp_path / "api.log")) as (api,):
        r = httpx.post(
            f"{api.url}/api/links",
            json={"url": "/analyses/ab12"},
            headers={**AUTH, "Host": "evil.example", "X-Forwarded-Host": "evil.example"},
        )
    assert r.status_code == 201, r.text
    assert r.json()["short_url"] == f"https://lens.example.org/s/{r.json()['code']}"


# --- CSP by exact route ---------------------------------------------------------------------------
def csp_of(base_url: str, raw_path: str) -> str:
    """The CSP answered for a path sent exactly as written (no client-side normalisation)."""
    url = httpx.URL(base_url)
    conn = http.client.HTTPConnection(url.host, url.port, timeout=10)
    try:
        conn.request("GET", raw_path)
        response = conn.getresponse()
        response.read()
        return response.getheader("content-security-policy") or ""
    finally:
        conn.close()


def test_only_the_exact_docs_paths_get_the_docs_csp(site):
    client, _, _ = site
    base = str(client.base_url)
    for path in ("/docs", "/docs/oauth2-redirect", "/redoc"):
        assert csp_of(base, path) == DOCS_CSP, path
    for path in (
        "/docsX",
        "/docs/",
        "/docs/x",
        "/docs/../analyses",
        "/docs/..%2Fanalyses",
        "/docs%2F..%2Fanalyses",
        "/redocs",
        "/redoc/x",
        "/docs.html",
        "/analyses/docs",
        "/",
    ):
        assert csp_of(base, path) == DASHBOARD_CSP, path


# --- cancel against a finishing worker ------------------------------------------------------------
@pytest.fixture(scope="module")
def blind(tmp_path_factory, family_pair):
    """A worker that never sees a cancel: its data folder shares everything with the API's but the
    cancel markers — like a worker past its last look at the marker when the cancel lands."""
    root = tmp_path_factory.mktemp("blind")
    env = local_env(root, [family_pair("llama")[0].parent])
    data, own = root / "data", root / "worker-data"
    (own / "cancel").mkdir(parents=True)
    for folder in ("results", "attempts", "broker", "broker-done", "broker-control"):
        (data / folder).mkdir(parents=True)
        (own / folder).symlink_to(data / folder, target_is_directory=True)
    with running(LoggingWorker({**env, "DELTALENS_DATA_DIR": str(own)}, root / "worker.log")):
        yield root, env


def finished(root: Path, aid: str) -> bool:
    return f"[{aid}] succeeded" in (root / "worker.log").read_text()


def test_cancel_after_the_worker_published_is_too_late(blind, family_pair):
    """The worker has published the artifact; the API has not seen the outcome yet (here: it reads
    another result backend, so it never does). Cancel must not strand the result: it is ingested and
    the analysis is done; cancel answers 409."""
    root, _ = blind
    data = root / "data"
    env = local_env(root, [family_pair("llama")[0].parent], backend=root / "api-sees-nothing")
    with running(Api(env, root / "api-1.log")) as (api,):
        with httpx.Client(base_url=api.url, timeout=30, headers=AUTH) as client:
            aid = submit(client, [register(client, p) for p in family_pair("llama")])
            wait_for(lambda: finished(root, aid), 120, what="the worker to finish")
            assert (data / "results" / f"{aid}.duckdb").exists()
            assert client.get(f"/api/analyses/{aid}").json()["status"] in ("queued", "running")
            r = client.post(f"/api/analyses/{aid}/cancel")
            assert r.status_code == 409 and r.json()["code"] == "already_finished", r.text
            status = client.get(f"/api/analyses/{aid}").json()
            assert status["status"] == "done" and status["progress"] == 1.0, status
            assert client.get(f"/api/analyses/{aid}/summary").status_code == 200
            assert not (data / "cancel" / aid).exists() and not list((data / "attempts").glob(f"{aid}*"))


def test_cancel_while_the_worker_finishes_leaves_no_artifact(blind, family_pair):
    """The cancel lands after the worker's last look at its cancel marker: it publishes anyway. The
    analysis stays cancelled, and the artifact, marker, counters and task state are removed."""
    root, env = blind
    data = root / "data"
    with running(Api(env, root / "api-2.log")) as (api,):
        with httpx.Client(base_url=api.url, timeout=30, headers=AUTH) as client:
            ids = [register(client, p) for p in family_pair("llama")]
            wait_for(lambda: not list((data / "broker").glob("*.msg")), 60, what="an idle worker")
            aid = submit(client, ids)
            r = client.post(f"/api/analyses/{aid}/cancel")
            assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
            assert (data / "cancel" / aid).exists()
            wait_for(lambda: finished(root, aid), 120, what="the worker to finish")
            assert "'status': 'done'" in (root / "worker.log").read_text()  # it published after the cancel
            wait_for(
                lambda: (
                    not leftovers(data, root / "celery-results", aid)
                    and not (data / "results" / f"{aid}.duckdb").exists()
                ),
                20,
                what=f"the sweep to remove what {aid} left",
            )
            status = client.get(f"/api/analyses/{aid}").json()
            assert status["status"] == "cancelled", status
            assert client.get(f"/api/analyses/{aid}/summary").status_code == 409


# --- what finished and deleted analyses leave behind ----------------------------------------------
def test_finished_and_deleted_analyses_leave_nothing_behind(site, family_pair):
    client, data, results = site
    base, target = family_pair("llama")
    ids = [register(client, base), register(client, target)]
    # a fanned-out pair (two shard groups, then a merge): counters and task states of every part
    done = submit(client, ids)
    assert wait_done(client, done, 120)["status"] == "done"
    detail = client.get(f"/api/analyses/{done}").json()["detail"]
    assert detail["parts"] == 2 and detail["attempts"] == 1, detail  # the count outlives its counters
    wait_for(lambda: not leftovers(data, results, done), 10, what=f"{leftovers(data, results, done)} to go")
    assert (data / "results" / f"{done}.duckdb").exists()  # a done analysis keeps its artifact
    # deleted while queued or running: its task returns (cancelled, or done just before), then nothing stays
    deleted = submit(client, ids)
    assert client.delete(f"/api/analyses/{deleted}").status_code == 204
    wait_for(
        lambda: (
            not leftovers(data, results, deleted) and not (data / "results" / f"{deleted}.duckdb").exists()
        ),
        60,
        what=f"{leftovers(data, results, deleted)} to go",
    )
    # deleted after it finished: at once
    again = submit(client, ids)
    assert wait_done(client, again, 120)["status"] == "done"
    assert client.delete(f"/api/analyses/{again}").status_code == 204
    assert not leftovers(data, results, again) and not (data / "results" / f"{again}.duckdb").exists()
    # leftovers of an analysis gone for a month are swept; a fresh marker nobody has answered stays
    assert not leftovers(data, results, STALE_ID) and not (data / "results" / f"{STALE_ID}.duckdb").exists()
    assert (data / "cancel" / FRESH_ID).exists()
