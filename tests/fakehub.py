"""A tiny Hugging Face hub on 127.0.0.1 for tests: the endpoints huggingface_hub calls to list a repo
and to download its files, serving repos made of local folders, with a log of every request.

    GET  /api/models/{org}/{name}[/revision/{rev}]   model info (`siblings` with sizes, `sha`)
    HEAD /{org}/{name}/resolve/{rev}/{file}           X-Repo-Commit, ETag, Content-Length
    GET  /{org}/{name}/resolve/{rev}/{file}           the bytes

Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which
is how huggingface_hub tells them apart. No xet headers are ever sent, so downloads are plain HTTP.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {file: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    token: str | None = None  # gated: files need `Authorization: Bearer <token>`


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str]] = []  # (method, path) of every request
        self.delay = 0.0  # seconds each answer waits (a slow hub)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def add(self, repo: str, folder: Path, refs=("main",), extra: dict[str, bytes] | None = None) -> str:
        """Publish the files of `folder` (plus `extra`) as a new commit of `repo`, pointed to by `refs`;
        returns the commit id."""
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        files.update(extra or {})
        digest = hashlib.sha1()
        for name, data in sorted(files.items()):
            digest.update(name.encode() + hashlib.sha256(data).digest())
        commit = digest.hexdigest()
        r = self.repos.setdefault(repo, Repo())
        r.commits[commit] = files
        r.refs.update({ref: commit for ref in refs})
        return commit

    def fetched(self) -> list[str]:
        """The files asked for (HEAD or GET on /resolve/), by name."""
        with self._lock:
            return [p.split("/resolve/", 1)[1].split("/", 1)[1] for _, p in self.log if "/resolve/" in p]

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.log.append((method, path))


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, headers: dict, body: bytes = b"", head: bool = False) -> None:
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head: bool, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, headers, json.dumps({"error": message}).encode(), head)

        def _repo_commit(self, repo_id: str, rev: str, head: bool):
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", head)
                return None, None
            commit = rev if rev in repo.commits else repo.refs.get(rev)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                return None, None
            return repo, commit

        def _info(self, parts: list[str], head: bool) -> None:
            repo_id = "/".join(parts[:2])
            rev = unquote(parts[3]) if len(parts) > 3 and parts[2] == "revision" else "main"
            repo, commit = self._repo_commit(repo_id, rev, head)
            if repo is None:
                return
            siblings = [
                {"rfilename": n, "size": len(d), "blobId": hashlib.sha1(d).hexdigest()}
                for n, d in sorted(repo.commits[commit].items())
            ]
            body = {"id": repo_id, "sha": commit, "gated": bool(repo.token), "siblings": siblings}
            self._send(200, {"Content-Type": "application/json"}, json.dumps(body).encode(), head)

        def _resolve(self, repo_id: str, rev: str, name: str, head: bool) -> None:
            repo, commit = self._repo_commit(repo_id, rev, head)
            if repo is None:
                return
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._error(401, "GatedRepo", "Access to this model is restricted", head)
                return
            data = repo.commits[commit].get(name)
            if data is None:
                self._error(404, "EntryNotFound", f"{name} does not exist", head, commit)
                return
            headers = {
                "X-Repo-Commit": commit,
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Content-Type": "application/octet-stream",
            }
            self._send(200, headers, data, head)

        def _route(self, head: bool) -> None:
            path = urlsplit(self.path).path
            hub.record(self.command, path)
            time.sleep(hub.delay)
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                return self._info(parts[2:], head)
            if len(parts) >= 5 and parts[2] == "resolve":
                name = unquote("/".join(parts[4:]))
                return self._resolve("/".join(parts[:2]), unquote(parts[3]), name, head)
            self._error(404, "NotFound", f"no route {path}", head)

        def do_GET(self):
            self._route(head=False)

        def do_HEAD(self):
            self._route(head=True)

    return Handler
