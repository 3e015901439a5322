"""Models on the Hugging Face hub as inputs: `hf://org/name[@revision]` (or a plain `org/name` that is no
local path) becomes a snapshot folder of the huggingface_hub cache that holds only what the readers open
(config.json, the weights, their index; a LoRA adapter's config and weights), fetched file by file.

The folder is then an ordinary local checkpoint folder. huggingface_hub does the HTTP and the cache, so
its settings hold: the cache (HF_HOME / HF_HUB_CACHE, or `cache_dir`), HF_ENDPOINT (or `endpoint`),
HF_TOKEN, and HF_HUB_OFFLINE=1 (served from the cache only, with a clear error when it is not there).
Torch-free: the API imports this module.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deltalens.worker.errors import InputError

PREFIX = "hf://"
# the hub's rule for a user, organisation or model name: letters, digits, '-', '_', '.'; no '--' or
# '..'; neither starting nor ending with '-' or '.'; at most 96 characters
NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
COMMIT = re.compile(r"[0-9a-f]{40}")
# a branch or tag (git ref rules, kept to the characters the hub allows), e.g. main, v1.0, refs/pr/3
REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,199}")
BAD_REVISION = re.compile(r"\.\.|//|/$|\.$|\.lock$|/\.")

# the weight sets a repo may hold, in order of preference: (index, single file, suffix of any weight file)
WEIGHT_SETS = (
    ("model.safetensors.index.json", "model.safetensors", ".safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", ".bin"),
)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
NOT_WEIGHTS = ("training_args.bin",)  # a Trainer's pickled arguments, never a state dict
MAX_INDEX_BYTES = 64 << 20  # as checkpoint.MAX_JSON_BYTES


@dataclass(frozen=True)
class HubSpec:
    repo: str  # org/name
    revision: str = "main"  # branch, tag or 40-hex commit

    def __str__(self) -> str:
        return f"{PREFIX}{self.repo}@{self.revision}"


class HubError(InputError):
    """A hub input that cannot be had; `code` says why (repo_not_found, revision_not_found, gated,
    no_weights, not_cached, hub_unreachable, hub_error, revision_moved)."""

    def __init__(self, spec, code: str, problem: str):
        self.code = code
        super().__init__(spec, problem)


def _problem(text: str) -> str | None:
    """Why `text` (without hf://) is not org/name[@revision], or None when it is one."""
    repo, at, revision = text.partition("@")
    parts = repo.split("/")
    if len(parts) != 2:
        return "expected org/name[@revision]"
    for part in parts:
        if not NAME.fullmatch(part) or ".." in part or "--" in part:
            return f"{part!r} is not a valid hub name (letters, digits, '-', '_', '.'; at most 96)"
    ref = REVISION.fullmatch(revision) and not BAD_REVISION.search(revision)
    if at and not (COMMIT.fullmatch(revision) or ref):
        return f"{revision!r} is not a branch, tag or 40-hex commit"
    return None


def parse_spec(text: str) -> HubSpec:
    """`hf://org/name[@revision]` or `org/name[@revision]` -> HubSpec; InputError naming it otherwise."""
    bare = text.removeprefix(PREFIX)
    problem = _problem(bare)
    if problem:
        raise InputError(text, f"not a hub model id: {problem}")
    repo, _, revision = bare.partition("@")
    return HubSpec(repo, revision or "main")


def is_spec(text: str) -> bool:
    return _problem(text.removeprefix(PREFIX)) is None


# --- which files -------------------------------------------------------------------------------------
def wanted(names) -> list[str]:
    """The files of a repo (top level) the readers open, before any index is read: an adapter's config
    and weights; else config.json and the first weight set present (its index, else its single file,
    else every weight file of that kind). Empty: the repo holds no weights."""
    top = {n for n in names if "/" not in n}
    if ADAPTER_CONFIG in top:
        weights = [n for n in ADAPTER_WEIGHTS if n in top][:1]
        return [ADAPTER_CONFIG, *weights] if weights else []
    for index, single, suffix in WEIGHT_SETS:
        weights = (
            [index]
            if index in top
            else [single]
            if single in top
            else sorted(n for n in top if n.endswith(suffix) and n not in NOT_WEIGHTS)
        )
        if weights:
            return [n for n in ("config.json",) if n in top] + weights
    return []


def shards_of(index: Path, spec: HubSpec, listed) -> list[str]:
    """The shard files an index names, each one the repo holds at its top level."""
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise HubError(spec, "invalid_index", f"{index.name}: more than {MAX_INDEX_BYTES} bytes")
    try:
        shards = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise HubError(spec, "invalid_index", f"{index.name}: no weight_map ({type(e).__name__})") from None
    missing = [s for s in shards if not isinstance(s, str) or s not in listed or "/" in s]
    if missing:
        raise HubError(spec, "invalid_index", f"{index.name} names {missing[0]!r}: not in the repo")
    return shards


# --- errors ------------------------------------------------------------------------------------------
def _failures():
    """(exception type, code, problem) from huggingface_hub's errors, most specific first."""
    import httpx2
    from huggingface_hub import errors as e

    return (
        (e.GatedRepoError, "gated", "is gated: accept its terms on the hub and set HF_TOKEN"),
        (
            e.RepositoryNotFoundError,
            "repo_not_found",
            "not found on the hub (or private: set HF_TOKEN)",
        ),
        (e.RevisionNotFoundError, "revision_not_found", "no such revision in this repo"),
        (e.RemoteEntryNotFoundError, "file_not_found", "a file listed by the hub is not there"),
        (e.OfflineModeIsEnabled, "not_cached", "not in the hub cache, and HF_HUB_OFFLINE is set"),
        (e.HfHubHTTPError, "hub_error", "the hub refused the request"),
        (httpx2.HTTPError, "hub_unreachable", "cannot reach the hub"),
        (e.LocalEntryNotFoundError, "hub_unreachable", "cannot reach the hub, and the file is not cached"),
        (OSError, "cache_error", "cannot write the hub cache"),
    )


def _translate(spec: HubSpec, error: Exception, endpoint: str) -> HubError:
    for kind, code, problem in _failures():
        if isinstance(error, kind):
            status = getattr(getattr(error, "response", None), "status_code", None)
            detail = f" (HTTP {status})" if status and code in ("hub_error", "gated") else ""
            where = f" at {endpoint}" if code in ("hub_unreachable", "repo_not_found") else ""
            cause = error.__cause__ or error
            text = f": {cause}".splitlines()[0] if code in ("hub_unreachable", "cache_error") else ""
            return HubError(spec, code, f"{problem}{where}{detail}{text}")
    raise error


# --- progress ----------------------------------------------------------------------------------------
@dataclass
class Progress:
    done_bytes: int = 0
    total_bytes: int = 0
    files_done: int = 0
    files_total: int = 0
    file: str = ""


def _counting(report: Callable[[int], None]):
    """A tqdm class for huggingface_hub that shows nothing and hands every byte count to `report`."""
    from tqdm import tqdm

    class Counter(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n=1):
            report(n or 0)

    return Counter


# --- resolving ---------------------------------------------------------------------------------------
def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def cached(spec: HubSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    """The snapshot folder of `spec` in the cache, without the network (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    storage = cache / repo_folder_name(repo_id=spec.repo, repo_type="model")
    commit = spec.revision
    if not COMMIT.fullmatch(commit):
        try:
            commit = (storage / "refs" / spec.revision).read_text().strip()
        except OSError:
            commit = ""
    folder = storage / "snapshots" / commit
    if not commit or not folder.is_dir() or not wanted(p.name for p in folder.iterdir()):
        raise HubError(
            spec, "not_cached", f"not in the hub cache ({cache}) and HF_HUB_OFFLINE is set; fetch it online"
        )
    return folder


def resolve(
    spec: HubSpec,
    *,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    refuse: Callable[[HubSpec, list[str]], None] | None = None,
) -> Path:
    """Download what the readers need of `spec` (into the cache; files already there are not fetched
    again) and return its snapshot folder. HubError when the hub cannot give it. `refuse(spec, files)`
    may raise to stop before files are fetched (it sees each batch: the first files, then the shards)."""
    if offline():
        return cached(spec, cache_dir)
    from huggingface_hub import HfApi, constants, hf_hub_download

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            spec.repo, revision=spec.revision, files_metadata=True
        )
    except Exception as e:
        raise _translate(spec, e, endpoint) from None
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    queue = wanted(sizes)
    if not queue:
        raise HubError(
            spec, "no_weights", "holds no weights (safetensors, pytorch_model.bin or a LoRA adapter)"
        )
    check = refuse or (lambda *_: None)
    check(spec, queue)
    state = Progress(total_bytes=sum(sizes[n] for n in queue), files_total=len(queue))
    report = progress or (lambda _: None)
    finished: list[str] = []

    def count(n: int) -> None:  # bytes of the file being fetched, on top of the files finished
        state.done_bytes += n
        report(state)

    folder = None
    while queue:
        name = queue.pop(0)
        state.file, state.done_bytes = name, sum(sizes[n] for n in finished)
        report(state)
        try:
            path = Path(
                hf_hub_download(
                    spec.repo,
                    name,
                    revision=spec.revision,
                    cache_dir=cache_dir,
                    endpoint=endpoint,
                    token=token,
                    tqdm_class=_counting(count),
                )
            )
        except Exception as e:
            raise _translate(spec, e, endpoint) from None
        if folder is None:
            folder = path.parent
        if path.parent != folder or (info.sha and folder.name != info.sha):
            raise HubError(spec, "revision_moved", "the revision moved while downloading; run again")
        if name in (index for index, _, _ in WEIGHT_SETS):
            shards = shards_of(path, spec, sizes)
            check(spec, shards)
            queue += shards
            state.total_bytes += sum(sizes[s] for s in shards)
            state.files_total += len(shards)
        finished.append(name)
        state.files_done, state.done_bytes = len(finished), sum(sizes[n] for n in finished)
        report(state)
    return folder


def locate(
    text: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> str:
    """A CLI input as a local path: `hf://...` always from the hub; a plain `org/name[@rev]` from the hub
    only when no such local path exists; anything else unchanged (the readers judge it)."""
    hub = text.startswith(PREFIX)
    if not hub and (os.path.exists(text) or not is_spec(text)):
        return text
    spec = parse_spec(text)
    try:
        return str(resolve(spec, cache_dir=cache_dir, endpoint=endpoint, progress=progress))
    except HubError as e:
        if hub:
            raise
        raise HubError(text, e.code, f"no such file or directory, and {spec}: {e.problem}") from None
