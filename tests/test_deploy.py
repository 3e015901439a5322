"""The hosted deployment: docker-compose.yml is valid and wires redis, api and GPU workers right."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from service import ROOT


def compose_config() -> dict:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        cmd = ["docker", "compose", "config"]
    elif shutil.which("docker-compose"):
        cmd = ["docker-compose", "config"]
    else:
        pytest.fail(
            "neither 'docker compose' nor 'docker-compose' is installed (make test installs docker-compose)"
        )
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    )
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_file_is_valid_and_complete():
    config = compose_config()
    services = config["services"]
    assert set(services) == {"redis", "api", "worker"}
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "healthcheck" in redis
    worker = services["worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for name in ("api", "worker"):
        s = services[name]
        assert s["depends_on"]["redis"]["condition"] == "service_healthy"
        assert any(
            str(v).split(":")[:2] == ["data", "/data"]
            or (isinstance(v, dict) and (v.get("source"), v.get("target")) == ("data", "/data"))
            for v in s["volumes"]
        ), s["volumes"]  # the same named volume for both
        env = s["environment"]
        assert (
            env["DELTALENS_BROKER_URL"].startswith("redis://redis:") and env["DELTALENS_DATA_DIR"] == "/data"
        )
    assert worker["environment"]["DELTALENS_DEVICE"] == "cuda"
    assert "8000" in str(services["api"]["ports"])


@pytest.mark.parametrize("dockerfile", ["backend/Dockerfile"])
def test_dockerfiles_copy_what_exists(dockerfile):
    lines = (ROOT / dockerfile).read_text().splitlines()
    for line in lines:
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"{dockerfile}: {source} missing"
    assert any(line.startswith("CMD") for line in lines)
