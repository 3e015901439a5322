"""Models on the Hugging Face hub as inputs (`hf://org/name[@revision]`, or a plain `org/name` that is no
local path), against tests/fakehub.py on loopback (never the network): the CLI gives the counts of the
same folders read locally (and of the float64 reference), a second run works offline from the cache,
bad specs / missing repos / revisions exit 2 with one line, only weight/config/index files are fetched,
and the API downloads in the background (202, then GET /api/downloads/{id}) into a checkpoint that an
analysis runs on."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios

import pytest
import reference
from conftest import ROOT, build, perturb_, save
from fakehub import FakeHub
from service import Api, hosted, running, service_env, wait_done, wait_for

from deltalens.worker import hub
from deltalens.worker.errors import InputError

TOKEN = "hub-" + "5" * 16
GATE = "gate-token"
CHROMIUM = "/usr/bin/chromium"
# what the readers open; the rest the repos hold (README, tokenizer, generation config) is never asked for
WEIGHTS = {"config.json", "model.safetensors.index.json"}
EXTRA = {"README.md": b"# tiny\n", "tokenizer.json": b"{}", "special_tokens_map.json": b"{}"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Local folders: a sharded tiny Llama base, and two fine-tunes of it (v1, then main)."""
    root = tmp_path_factory.mktemp("hubmodels")
    model = build("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folders = {"base": save(model, "llama", root / "base")}
    for name, seed in (("v1", 1), ("main", 2)):
        model.load_state_dict(state)
        perturb_(model, seed=seed, fraction=0.2)
        folders[name] = save(model, "llama", root / name)
    (root / "readme-only").mkdir()
    (root / "readme-only" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folders, root


@pytest.fixture(scope="module")
def fakehub(models):
    folders, root = models
    server = FakeHub().start()
    server.commits = {
        "base": server.add("org/base", folders["base"], extra=EXTRA),
        "v1": server.add("org/tuned", folders["v1"], refs=("v1",), extra=EXTRA),
        "main": server.add("org/tuned", folders["main"], extra=EXTRA),
    }
    server.add("org/empty", root / "readme-only", extra=EXTRA)
    server.add("org/gated", folders["base"])
    server.repos["org/gated"].token = GATE
    yield server
    server.stop()


def hub_env(fakehub, home, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DELTALENS_"))}
    return {**env, "HF_ENDPOINT": fakehub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", **extra}


def cli(env, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deltalens.worker.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def counts(doc: dict) -> dict:
    return {t["name"]: t["changed"] for t in doc["tensors"]}


def reference_total(base, target, tau=1e-5) -> int:
    b, t = reference.load(base), reference.load(target)
    return sum(reference.changed(b[n], t[n], tau) for n in b)


# --- specs and file choice (no server) ----------------------------------------------------------------
@pytest.mark.parametrize(
    "text, repo, revision",
    [
        ("hf://org/name", "org/name", "main"),
        ("org/name@v1.0", "org/name", "v1.0"),
        ("hf://Meta-Llama/Llama_3.1-8B@refs/pr/3", "Meta-Llama/Llama_3.1-8B", "refs/pr/3"),
        ("hf://a/b@" + "0123456789abcdef" * 2 + "01234567", "a/b", "0123456789abcdef" * 2 + "01234567"),
    ],
)
def test_specs_parse(text, repo, revision):
    assert hub.parse_spec(text) == hub.HubSpec(repo, revision)


@pytest.mark.parametrize(
    "text",
    [
        "hf://name-only",
        "hf://a/b/c",
        "hf://org/bad--name",
        "hf://org/.hidden",
        "hf://org/x..y",
        "hf://org/" + "n" * 97,
        "hf://org/name@",
        "hf://org/name@a..b",
        "hf://org/name@-x",
        "hf://org/name@x y",
        "hf://org/na me",
    ],
)
def test_bad_specs_are_refused_naming_them(text):
    with pytest.raises(InputError) as e:
        hub.parse_spec(text)
    assert str(e.value).startswith(text) and "not a hub model id" in str(e.value)


@pytest.mark.parametrize(
    "names, files",
    [
        (
            [
                "config.json",
                "model.safetensors.index.json",
                "model-1.safetensors",
                "README.md",
                "tokenizer.json",
            ],
            ["config.json", "model.safetensors.index.json"],  # shards come from the index
        ),
        (
            ["config.json", "model.safetensors", "consolidated.safetensors"],
            ["config.json", "model.safetensors"],
        ),
        (
            ["config.json", "pytorch_model.bin", "training_args.bin", "generation_config.json"],
            ["config.json", "pytorch_model.bin"],
        ),
        (["config.json", "pytorch_model.bin", "model.safetensors"], ["config.json", "model.safetensors"]),
        (["config.json", "weights.bin", "training_args.bin"], ["config.json", "weights.bin"]),
        (
            ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"],
            ["adapter_config.json", "adapter_model.safetensors"],
        ),
        (["adapter_config.json", "adapter_model.bin"], ["adapter_config.json", "adapter_model.bin"]),
        (["config.json", "README.md", "sub/model.safetensors"], []),
    ],
)
def test_only_weights_config_and_index_are_wanted(names, files):
    assert hub.wanted(names) == files


# --- the CLI ----------------------------------------------------------------------------------------
def test_cli_reads_hub_models_like_local_folders_and_then_offline(fakehub, models, tmp_path):
    folders, _ = models
    home = tmp_path / "hf"
    local = cli(hub_env(fakehub, home), "analyze", folders["base"], folders["v1"], "--json", "-", "--quiet")
    assert local.returncode == 0, local.stderr
    fakehub.log.clear()
    online = cli(hub_env(fakehub, home), "analyze", "hf://org/base", "hf://org/tuned@v1", "--json", "-")
    assert online.returncode == 0, online.stderr
    a, b = json.loads(local.stdout), json.loads(online.stdout)
    assert counts(a) == counts(b) and a["summary"]["changed"] == b["summary"]["changed"]
    assert b["summary"]["changed"][0]["count"] == reference_total(folders["base"], folders["v1"]) > 0
    assert (b["base"], b["target"]) == ("hf://org/base", "hf://org/tuned@v1")  # named as given
    assert b["notes"][1].startswith("hf://org/tuned@v1: read from ") and "snapshots" in b["notes"][1]
    shards = {
        n for f in (folders["base"], folders["v1"]) for n in os.listdir(f) if n.endswith(".safetensors")
    }
    assert set(fakehub.fetched()) == WEIGHTS | shards  # no README, tokenizer or generation config
    snapshot = home / "hub" / "models--org--tuned" / "snapshots" / fakehub.commits["v1"]
    assert sorted(os.listdir(snapshot)) == sorted(
        WEIGHTS | {n for n in os.listdir(folders["v1"]) if "-of-" in n}
    )

    fakehub.log.clear()
    offline = hub_env(fakehub, home, HF_HUB_OFFLINE="1")
    for target in ("hf://org/tuned@v1", f"hf://org/tuned@{fakehub.commits['v1']}"):
        again = cli(offline, "analyze", "hf://org/base", target, "--json", "-", "--quiet")
        assert again.returncode == 0, again.stderr
        assert counts(json.loads(again.stdout)) == counts(a)
    assert fakehub.log == []  # served from the cache alone
    missing = cli(offline, "analyze", "hf://org/base", "hf://org/tuned@main", "--quiet")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert (
        "hf://org/tuned@main: not in the hub cache" in missing.stderr and "HF_HUB_OFFLINE" in missing.stderr
    )


@pytest.mark.parametrize(
    "target, says",
    [
        ("hf://org/bad--name", "hf://org/bad--name: not a hub model id"),
        ("hf://org/nope", "hf://org/nope@main: not found on the hub"),
        ("hf://org/tuned@nope", "hf://org/tuned@nope: no such revision"),
        ("hf://org/empty", "hf://org/empty@main: holds no weights"),
        ("hf://org/gated", "hf://org/gated@main: is gated"),
        (
            "org/missing",
            "org/missing: no such file or directory, and hf://org/missing@main: not found on the hub",
        ),
    ],
)
def test_cli_refuses_what_the_hub_cannot_give_with_one_line(fakehub, tmp_path, target, says):
    proc = cli(hub_env(fakehub, tmp_path / "hf"), "analyze", "hf://org/base", target, "--quiet")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"deltalens: error: {says}"), proc.stderr


def test_gated_repo_downloads_with_hf_token(fakehub, models, tmp_path):
    folders, _ = models
    env = hub_env(fakehub, tmp_path / "hf", HF_TOKEN=GATE)
    proc = cli(env, "analyze", "hf://org/gated", folders["v1"], "--json", "-", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["changed"][0]["count"] == reference_total(
        folders["base"], folders["v1"]
    )


def test_plain_org_name_is_the_hub_only_when_no_such_path_exists(fakehub, models, tmp_path):
    folders, _ = models
    env = hub_env(fakehub, tmp_path / "hf")
    shutil.copytree(folders["main"], tmp_path / "org" / "tuned")  # a local folder spelled like the repo
    fakehub.log.clear()
    proc = cli(env, "analyze", "org/base", "org/tuned@v1", "--json", "-", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {p.split("/resolve/")[0] for _, p in fakehub.log if "/resolve/" in p} == {
        "/org/base",
        "/org/tuned",
    }
    v1 = json.loads(proc.stdout)
    fakehub.log.clear()
    proc = cli(env, "analyze", "org/base", "org/tuned", "--json", "-", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all("/org/tuned/" not in p for _, p in fakehub.log)  # the local folder, not the hub's main
    local = json.loads(proc.stdout)["summary"]["changed"][0]["count"]
    assert local == reference_total(folders["base"], folders["main"]) != v1["summary"]["changed"][0]["count"]


def test_cli_shows_a_download_bar_on_a_terminal_unless_quiet(fakehub, tmp_path):
    def stderr_of(*flags) -> str:
        controller, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm hides on 0 rows
        env = hub_env(fakehub, tmp_path / "hf")
        args = [sys.executable, "-m", "deltalens.worker.cli", "analyze", "hf://org/base", "hf://org/tuned@v1"]
        with subprocess.Popen(
            [*args, *flags], stdout=subprocess.DEVNULL, stderr=terminal, cwd=ROOT, env=env
        ) as p:
            os.close(terminal)
            chunks = []
            while True:
                try:
                    chunk = os.read(controller, 1 << 16)
                except OSError:  # the terminal closed: the process ended
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            assert p.wait(120) == 0
        os.close(controller)
        return b"".join(chunks).decode(errors="replace")

    first = stderr_of()
    assert "downloading" in first and "-of-00004.safetensors" in first  # shard by shard
    assert "downloading" not in stderr_of("--quiet")


# --- the API ----------------------------------------------------------------------------------------
def wait_download(client, did: str) -> dict:
    return wait_for(
        lambda: (d := client.get(f"/api/downloads/{did}").json()) and d["state"] in ("done", "failed") and d,
        120,
        0.2,
        what=f"download {did}",
    )


def test_api_downloads_from_the_hub_and_analyses_the_checkpoints(fakehub, models, tmp_path):
    folders, _ = models
    env = {"HF_ENDPOINT": fakehub.url, "HF_HOME": str(tmp_path / "hf-unused"), "HF_HUB_OFFLINE": "0"}
    with hosted(tmp_path, "hubq", [tmp_path / "roots"], token=TOKEN, **env) as stack:
        c = stack.client
        fakehub.log.clear()
        ids = []
        for spec in ("org/base", "hf://org/tuned@v1"):
            r = c.post("/api/checkpoints", json={"hub": spec})
            assert r.status_code == 202, r.text
            assert r.json()["state"] in ("queued", "downloading", "done")
            d = wait_download(c, r.json()["id"])
            assert d["state"] == "done" and d["error"] is None, d
            assert d["files_done"] == d["files_total"] >= 3 and d["done_bytes"] == d["total_bytes"] > 0
            ids.append(d["checkpoint"])
        ckpt = c.get(f"/api/checkpoints/{ids[1]}").json()
        assert ckpt["source"] == "hub" and ckpt["name"] == "org/tuned@v1"
        assert ckpt["path"].startswith(str(tmp_path / "data" / "checkpoints" / "hub"))
        assert set(fakehub.fetched()) <= WEIGHTS | {n for n in os.listdir(folders["v1"]) if "-of-" in n}

        r = c.post("/api/analyses", json={"kind": "pair", "checkpoints": ids, "taus": [1e-5]})
        assert r.status_code == 202, r.text
        assert wait_done(c, r.json()["id"])["status"] == "done"
        doc = c.get(f"/api/analyses/{r.json()['id']}/result").json()
        assert doc["summary"]["changed"][0]["count"] == reference_total(folders["base"], folders["v1"])

        missing = c.post("/api/checkpoints", json={"hub": "org/nope@main"})
        assert missing.status_code == 202
        d = wait_download(c, missing.json()["id"])
        assert d["state"] == "failed" and d["checkpoint"] is None
        assert (
            d["error"]["code"] == "repo_not_found"
            and "org/nope@main: not found on the hub" in d["error"]["message"]
        )
        empty = wait_download(c, c.post("/api/checkpoints", json={"hub": "org/empty"}).json()["id"])
        assert empty["error"]["code"] == "no_weights"
        gated = wait_download(c, c.post("/api/checkpoints", json={"hub": "org/gated"}).json()["id"])
        assert gated["error"]["code"] == "gated" and "HF_TOKEN" in gated["error"]["message"]

        fakehub.delay = 0.2  # the same repo@revision asked for while it downloads: the same record
        try:
            first, second = (c.post("/api/checkpoints", json={"hub": "org/tuned@main"}).json() for _ in "12")
            assert first["id"] == second["id"]
            assert wait_download(c, first["id"])["state"] == "done"
        finally:
            fakehub.delay = 0.0

        for body, status in (
            ({"hub": "org/bad--name"}, 422),
            ({"hub": "org/base", "path": "/x"}, 422),
            ({}, 422),
        ):
            r = c.post("/api/checkpoints", json=body)
            assert r.status_code == status and r.json()["code"] == "invalid_request", r.text
        assert c.get("/api/downloads/nosuchid").status_code == 404
        assert c.get("/api/downloads/nosuchid").json()["code"] == "not_found"
        anonymous = c.post("/api/checkpoints", json={"hub": "org/base"}, headers={"Authorization": ""})
        assert anonymous.status_code == 401


def test_new_page_downloads_from_the_hub_and_picks_the_checkpoint(fakehub, tmp_path):
    """The New page's hub field in Chromium: progress while it downloads, then the checkpoint chosen."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not (ROOT / "backend" / "dashboard" / "index.html").exists() or not os.path.exists(CHROMIUM):
        pytest.skip("needs the built dashboard and Chromium")
    (tmp_path / "results").mkdir()
    env = service_env(
        tmp_path / "data",
        "filesystem://",
        f"file://{tmp_path / 'results'}",
        "hubdash",
        [tmp_path],
        **{"HF_ENDPOINT": fakehub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"},
    )
    fakehub.delay = 0.1  # slow enough to see the progress bar
    try:
        with running(Api(env, tmp_path / "api.log")) as (api,), sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(api.url + "/new")
            page.fill("#hub-input", "org/tuned@v1")
            page.click("#hub-fetch")
            page.wait_for_selector("#hub-progress:not([hidden])", timeout=20_000)
            page.wait_for_selector("text=Downloaded and registered: org/tuned@v1", timeout=60_000)
            chip = page.locator("button[data-checkpoint][aria-pressed=true]")
            assert chip.count() == 1 and chip.inner_text().startswith("org/tuned@v1")
            (ROOT / "test-output" / "screenshots").mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ROOT / "test-output" / "screenshots" / "new-hub.png"), full_page=True)
            page.fill("#hub-input", "org/nope")
            page.click("#hub-fetch")
            page.wait_for_selector("[role=alert]:has-text('not found on the hub')", timeout=30_000)
            assert errors == []
            browser.close()
    finally:
        fakehub.delay = 0.0
