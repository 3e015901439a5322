"""API fuzzing: Schemathesis against the running service's own OpenAPI schema.

The real stack (redis-server, a Celery worker, uvicorn in hosted mode with a token) holds real data
first — registered checkpoints, finished pair/series/overlap analyses, an upload session — so that
generated requests reach real ids, not only 404s. Then every operation in /openapi.json gets:

- positive cases (schema-valid data), half of them with path parameters set to the real ids,
- negative cases (schema-invalid data), which must be rejected with a documented 4xx,
- a few explicit cases that must succeed (a real registration, analysis, upload chunk, ...),
- stateful sequences along the links the schema declares (create upload -> send chunk -> complete, ...),

each response checked for: no 5xx, a documented status code and content type, a body matching the
documented schema (every error is {code, message}). Figures go to test-output/reliability/api_fuzz.json.

    .venv/bin/python -m pytest tests/test_api_fuzz.py -q
    DELTALENS_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/test_api_fuzz.py -q   # a long run
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from service import ROOT, hosted, wait_done, wait_for

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = int(os.environ.get("DELTALENS_FUZZ_EXAMPLES", "10"))  # per operation and generation mode
REPORT = ROOT / "test-output" / "reliability" / "api_fuzz.json"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
NEGATIVE_CHECKS = [*CHECKS, negative_data_rejection]
# invalid data may also be too large: 413 (the body limit, before parsing) is a rejection too
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}}
)
# writes that destroy the real data the other operations read go last
LAST = {("DELETE", "/api/analyses/{aid}"): 2, ("POST", "/api/analyses/{aid}/cancel"): 1}


def _settings(examples: int, **extra) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        **extra,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory, family_pair, llama_series):
    root = tmp_path_factory.mktemp("fuzz")
    base, target = family_pair("llama")
    roots = [base.parent, llama_series[0].parent]
    with hosted(root, "fuzz", roots, token=TOKEN, DELTALENS_MAX_UPLOAD_BYTES=str(8 << 20)) as s:
        yield s.api, s.client, real_data(s.client, base, target, llama_series)


def real_data(client: httpx.Client, base: Path, target: Path, series: list[Path]) -> dict:
    """Checkpoints, finished analyses of each kind, an upload half sent: what generated requests aim at."""

    def register(path: Path) -> str:
        r = client.post("/api/checkpoints", json={"path": str(path)})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    pair_ids = [register(base), register(target)]
    series_ids = [register(p) for p in series]
    submitted = {}
    for kind, ids in (("pair", pair_ids), ("series", series_ids), ("overlap", series_ids[:4])):
        r = client.post("/api/analyses", json={"kind": kind, "checkpoints": ids, "taus": [1e-5, 1e-3]})
        assert r.status_code == 202, r.text
        submitted[kind] = r.json()["id"]
    for kind, aid in submitted.items():
        assert wait_done(client, aid)["status"] == "done", kind
    tensor = client.get(f"/api/analyses/{submitted['pair']}/tensors").json()[0]["name"]
    r = client.post(f"/api/analyses/{submitted['pair']}/masks", json={"format": "packed"})
    assert r.status_code == 202, r.text
    mask = r.json()["id"]
    status = wait_for(
        lambda: (
            (m := client.get(f"/api/analyses/{submitted['pair']}/masks/{mask}").json())["status"]
            in ("done", "failed")
            and m
        ),
        60,
        what="the mask job",
    )
    assert status["status"] == "done", status
    # a hub download (offline here: HF_HUB_OFFLINE=1 from conftest, so it fails at once, never the network)
    r = client.post("/api/checkpoints", json={"hub": "org/name@main"})
    assert r.status_code == 202, r.text
    download = r.json()["id"]
    weights = next(base.glob("*.safetensors"))
    r = client.post(
        "/api/uploads",
        json={
            "name": "fuzzed",
            "files": [
                {"name": "config.json", "size": 64},
                {"name": weights.name, "size": weights.stat().st_size},
            ],
        },
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert (
        client.put(
            f"/api/uploads/{sid}/files/{weights.name}", content=weights.read_bytes()[:1000]
        ).status_code
        == 200
    )
    # an upload with every byte in, for a completion that succeeds
    files = sorted(p for p in base.iterdir() if p.suffix in (".safetensors", ".json"))
    r = client.post(
        "/api/uploads", json={"files": [{"name": p.name, "size": p.stat().st_size} for p in files]}
    )
    assert r.status_code == 201, r.text
    for p in files:
        assert (
            client.put(f"/api/uploads/{r.json()['id']}/files/{p.name}", content=p.read_bytes()).status_code
            == 200
        )
    return {
        "checkpoints": pair_ids + series_ids,
        "analyses": submitted,
        "tensor": tensor,
        "mask": mask,
        "download": download,
        "upload": sid,
        "complete_upload": r.json()["id"],
        "file": weights.name,
        "weights": weights,
        "base": base,
        "target": target,
    }


def real_path_parameters(operation, real: dict) -> list[dict]:
    """Path parameters that name real things, for each parameter the operation has."""
    names = {p.name for p in operation.path_parameters}
    options = {
        "aid": list(real["analyses"].values()),
        "cid": real["checkpoints"][:2],
        "sid": [real["upload"]],
        "mid": [real["mask"]],
        "did": [real["download"]],
        "name": [real["tensor"]]
        if operation.path.startswith("/api/analyses")
        else [real["file"], "config.json"],
    }
    combos = [{}]
    for name in sorted(names):
        combos = [{**c, name: value} for c in combos for value in options.get(name, [])]
    return combos if names and all(names <= set(c) for c in combos) else []


def explicit(schema, tally: Tally, real: dict) -> None:
    """Requests that must succeed, which random data hardly ever builds: a real registration, analysis,
    cancel, upload (chunk and completion), short link, and views of the real pair analysis."""

    def send(method: str, path: str, expect: int, **case):
        return tally.send(schema[path][method].Case(headers=AUTH, **case), CHECKS, expect=expect)

    pair, (b, t) = real["analyses"]["pair"], real["checkpoints"][:2]
    send("POST", "/api/checkpoints", 201, body={"path": str(real["target"])})
    queued = send(
        "POST", "/api/analyses", 202, body={"kind": "pair", "checkpoints": [b, t], "taus": [1e-4]}
    ).json()["id"]
    send("POST", "/api/analyses/{aid}/cancel", 200, path_parameters={"aid": queued})
    send("POST", "/api/uploads", 201, body={"files": [{"name": "model.safetensors", "size": 10}]})
    send(
        "PUT",
        "/api/uploads/{sid}/files/{name}",
        200,
        path_parameters={"sid": real["upload"], "name": real["file"]},
        query={"offset": 1000},
        body=real["weights"].read_bytes()[1000:3000],
        media_type="application/octet-stream",
    )
    send("POST", "/api/uploads/{sid}/complete", 201, path_parameters={"sid": real["complete_upload"]})
    send("POST", "/api/links", 201, body={"url": f"/analyses/{pair}?tau=1e-4"})
    send(
        "GET",
        "/api/analyses/{aid}/heatmap",
        200,
        path_parameters={"aid": pair},
        query={"metric": "rank_pct", "tau": 1e-3},
    )
    send("POST", "/api/analyses/{aid}/masks", 202, path_parameters={"aid": pair}, body={"format": "packed"})
    for path in ("/api/analyses/{aid}/masks/{mid}", "/api/analyses/{aid}/masks/{mid}/file"):
        send("GET", path, 200, path_parameters={"aid": pair, "mid": real["mask"]})
    send("GET", "/api/compare", 200, query={"ids": f"{pair},{pair}", "tau": 0})


class Tally:
    """Requests sent and failures found, per operation."""

    def __init__(self):
        self.requests, self.statuses, self.failures = Counter(), Counter(), []
        self.per_operation: dict[str, Counter] = {}

    def count(self, label: str, status: int) -> None:
        self.requests[label] += 1
        self.statuses[status] += 1
        self.per_operation.setdefault(label, Counter())[str(status)] += 1

    def send(self, case, checks, expect: int | None = None):
        response = case.call(headers=AUTH, timeout=60)
        label = case.operation.label
        self.count(label, response.status_code)
        try:
            case.validate_response(response, checks=checks, headers=AUTH)
            if expect is not None:
                assert response.status_code == expect, (
                    f"expected {expect}, got {response.status_code}: {response.text[:300]}"
                )
        except (FailureGroup, AssertionError) as e:
            self.failures.append(
                {
                    "operation": label,
                    "status": response.status_code,
                    "error": str(e)[:2000],
                    "curl": case.as_curl_command(headers=AUTH),
                }
            )
        return response


def fuzz(tally: Tally, strategy, checks, examples: int) -> bool:
    """False when there is nothing to generate (negative data for an operation without inputs)."""

    @_settings(examples)
    @given(case=strategy)
    def run(case):
        tally.send(case, checks)

    try:
        run()
    except Unsatisfiable:
        return False
    return True


def stateful(schema, tally: Tally, examples: int) -> int:
    """Sequences along the schema's links (create upload -> status/chunk/complete, register -> get, ...)."""

    class Links(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": AUTH, "timeout": 60}

        def call(self, case, **kwargs):
            response = case.call(**kwargs)
            tally.count(case.operation.label, response.status_code)
            tally.requests["stateful"] += 1
            return response

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            try:
                case.validate_response(response, checks=CHECKS, headers=AUTH)
            except FailureGroup as e:
                tally.failures.append(
                    {
                        "operation": case.operation.label,
                        "status": response.status_code,
                        "error": str(e)[:2000],
                        "curl": case.as_curl_command(headers=AUTH),
                        "stateful": True,
                    }
                )

    Links.run(settings=_settings(examples, stateful_step_count=6))
    return schema.statistic.transitions.total


def test_api_fuzz(stack):
    api, _, real = stack
    started = time.monotonic()
    schema = schemathesis.openapi.from_url(api.url + "/openapi.json", config=CONFIG)
    operations = sorted(
        (result.ok() for result in schema.get_all_operations()),
        key=lambda o: (LAST.get((o.method.upper(), o.path), 0), o.path, o.method),
    )
    assert len(operations) >= 20
    tally, negated = Tally(), []
    explicit(schema, tally, real)
    for operation in operations:
        generated = operation.as_strategy(headers=AUTH)
        real_ids = [
            operation.as_strategy(headers=AUTH, path_parameters=p)
            for p in real_path_parameters(operation, real)
        ]
        fuzz(tally, st.one_of(generated, st.one_of(real_ids)) if real_ids else generated, CHECKS, EXAMPLES)
        if fuzz(
            tally, operation.as_strategy(GenerationMode.NEGATIVE, headers=AUTH), NEGATIVE_CHECKS, EXAMPLES
        ):
            negated.append(operation.label)
    links = stateful(schema, tally, max(10, EXAMPLES // 2))

    figures = {
        "schemathesis": schemathesis.__version__,
        "examples_per_mode": EXAMPLES,
        "operations": len(operations),
        "operations_exercised": sum(1 for o in operations if tally.requests[o.label]),
        "requests": sum(v for k, v in tally.requests.items() if k != "stateful"),  # stateful ones included
        "stateful_requests": tally.requests["stateful"],
        "links": links,
        "operations_with_negative_data": len(negated),
        "status_codes": {str(k): v for k, v in sorted(tally.statuses.items())},
        "per_operation": {
            o.label: {
                "requests": tally.requests[o.label],
                "status_codes": dict(sorted(tally.per_operation[o.label].items())),
            }
            for o in operations
        },
        "checks": [c.__name__ for c in NEGATIVE_CHECKS],
        "failures": len(tally.failures),
        "failure_details": tally.failures[:50],
        "seconds": round(time.monotonic() - started, 1),
    }
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(figures, indent=2) + "\n")
    assert figures["operations_exercised"] == len(operations)
    # fuzzing reached the real data: every operation answered with success at least once
    unanswered = [
        o.label for o in operations if not any(s.startswith("2") for s in tally.per_operation[o.label])
    ]
    assert not unanswered, unanswered
    assert not [status for status in tally.statuses if status >= 500]
    assert not tally.failures, json.dumps(tally.failures[:5], indent=2)
