"""Request limits enforced before a route reads anything (a pure ASGI middleware).

FastAPI reads and parses a JSON body *before* it resolves a route's dependencies, so without this a
client without a token could make the API parse a 200 MB body (seconds of a blocked event loop,
hundreds of MB of memory) only to be told 401 afterwards. Here, before the application sees the
request:

* hosted mode (DELTALENS_TOKEN set): a write (POST, PUT, PATCH, DELETE) without the right
  `Authorization: Bearer <token>` is answered 401 at once; its body is never read;
* a body whose Content-Length is over the route's limit is answered 413 at once;
* a body without a Content-Length (chunked) is counted while it streams in: past the limit the
  client gets 413 and the route sees a disconnect, so it stops reading (an upload chunk is rolled
  back by `Uploads.write`).

Limits per route: an upload chunk (`PUT /api/uploads/{id}/files/{name}`) may be as large as a file
may be (DELTALENS_MAX_UPLOAD_BYTES; the route also stops at the file's declared size); creating an
upload session may list up to 10 000 files (4 MiB); every other body is small JSON
(DELTALENS_MAX_BODY_BYTES, 1 MiB by default).
"""

from __future__ import annotations

import hmac
import json
import re

from deltalens.worker.settings import Settings

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
UPLOAD_CHUNK = re.compile(r"^/api/uploads/[^/]+/files/[^/]+$")
UPLOAD_SESSION_BYTES = 4 << 20  # 10 000 files x a 200-character name, with room to spare


def body_limit(method: str, path: str, settings: Settings) -> int:
    """The most bytes a request body to this route may hold."""
    if method == "PUT" and UPLOAD_CHUNK.match(path):
        return settings.max_upload_bytes
    if method == "POST" and path.rstrip("/") == "/api/uploads":
        return max(settings.max_body_bytes, UPLOAD_SESSION_BYTES)
    return settings.max_body_bytes


def authorized(scope, token: str) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(given, token.encode())
    return False


class BodyLimits:
    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if self.settings.token and method not in SAFE_METHODS and not authorized(scope, self.settings.token):
            return await answer(
                send, 401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>'"
            )
        limit = body_limit(method, path, self.settings)
        declared = content_length(scope)
        if declared is not None and declared > limit:
            return await answer(send, 413, "too_large", too_large(declared, limit, declared=True))
        state = {"received": 0, "refused": False, "started": False}

        async def counted_receive():
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["refused"] = True
                    if not state["started"]:
                        state["started"] = True
                        await answer(send, 413, "too_large", too_large(state["received"], limit))
                    return {"type": "http.disconnect"}  # the route stops reading; the rest is discarded
            return message

        async def guarded_send(message):
            if state["refused"]:
                return  # the 413 went out already; whatever the route answers to the disconnect is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["refused"]:
                raise  # a real error: the outer handler answers 500 {code, message}
            # the route failed on the disconnect we gave it: the client has its 413 already


def content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def too_large(size: int, limit: int, declared: bool = False) -> str:
    what = f"{size} bytes" if declared else f"more than {limit} bytes"
    return f"the request body is {what}; this endpoint accepts at most {limit}"


async def answer(send, status: int, code: str, message: str) -> None:
    body = json.dumps({"code": code, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
