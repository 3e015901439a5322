"""Access in hosted mode: every write operation needs the token; short links are random and not
enumerable; security headers on every response; dependency floors without known advisories."""

from __future__ import annotations

import os
import re
import secrets
from importlib.metadata import PackageNotFoundError, version

import httpx
import pytest
from service import Api, Redis, running, service_env

TOKEN = "hosted-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("access")
    redis = Redis(root / "redis")
    with running(redis):
        env = service_env(
            root / "data", f"{redis.url}/0", f"{redis.url}/1", "access", [root], DELTALENS_TOKEN=TOKEN
        )
        with running(Api(env, root / "api.log")) as (server,):
            with httpx.Client(base_url=server.url, timeout=30) as client:
                yield client


def write_operations(client: httpx.Client) -> list[tuple[str, str]]:
    schema = client.get("/openapi.json").json()
    ops = [
        (method.upper(), re.sub(r"\{[^}]+\}", "0123456789abcdef", path))
        for path, item in schema["paths"].items()
        for method in item
        if method in ("post", "put", "patch", "delete")
    ]
    assert len(ops) >= 7, ops
    return ops


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["none", "wrong", "no-scheme", "basic"],
)
def test_every_write_operation_needs_the_token(api, headers):
    for method, path in write_operations(api):
        r = api.request(method, path, headers=headers, json={})
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", (
            method,
            path,
            r.status_code,
            r.text,
        )


def test_reads_need_no_token_and_writes_pass_with_it(api):
    assert api.get("/api/analyses").status_code == 200
    assert api.post("/api/links", json={"url": "/analyses"}, headers=AUTH).status_code == 201


def test_short_links_are_random_128_bit_codes(api):
    codes = [
        api.post("/api/links", json={"url": f"/analyses/{i}?tau=1e-5"}, headers=AUTH).json()["code"]
        for i in range(200)
    ]
    assert len(set(codes)) == len(codes)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", c) for c in codes)  # token_urlsafe(16): 16 random bytes
    # no structure to walk: neighbouring views share no prefix beyond chance
    assert max(len(os.path.commonprefix([a, b])) for a, b in zip(codes, codes[1:])) <= 4
    again = api.post("/api/links", json={"url": "/analyses/7?tau=1e-5"}, headers=AUTH).json()["code"]
    assert again == codes[7]  # one view, one link
    for guess in [codes[0][:-1] + ("A" if codes[0][-1] != "A" else "B"), "0" * 22, secrets.token_urlsafe(16)]:
        r = api.get(f"/s/{guess}", follow_redirects=False)
        assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert api.get(f"/s/{codes[3]}", follow_redirects=False).headers["location"] == "/analyses/3?tau=1e-5"


@pytest.mark.parametrize(
    "path", ["/", "/analyses/x?view=heatmap", "/api/health", "/api/analyses/nope", "/openapi.json"]
)
def test_security_headers_on_every_response(api, path):
    r = api.get(path)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert policy["script-src"] == "'self'"  # no inline script, no eval, no other origin
    assert policy["frame-ancestors"] == "'none'" and policy["object-src"] == "'none'"


FLOORS = {  # package: first version without a published advisory that affects deltalens
    "torch": "2.10",  # torch.load(weights_only=True) bypasses (CVE-2025-32434 and later fixes)
    "starlette": "0.49.1",  # CVE-2024-47874 (multipart DoS), CVE-2025-54121, CVE-2025-62727 (Range DoS)
    "h11": "0.16.0",  # CVE-2025-43859 (request smuggling)
    "fastapi": "0.120",
    "python-multipart": "0.0.18",  # CVE-2024-53981; not a dependency, checked if something pulls it in
    "jinja2": "3.1.6",  # CVE-2025-27516; same
}


def as_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_dependency_versions_have_no_known_advisories(package):
    try:
        installed = version(package)
    except PackageNotFoundError:
        pytest.skip(f"{package} is not installed")
    assert as_tuple(installed) >= as_tuple(FLOORS[package]), f"{package} {installed} < {FLOORS[package]}"
