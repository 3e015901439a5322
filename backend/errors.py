"""Every API error is JSON {code, message} with a 4xx (or 5xx) status — and the OpenAPI schema says so."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltalens.backend.models import ErrorOut

log = logging.getLogger("deltalens.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message = status, code, message
        super().__init__(message)


# What each error status means here; routes declare the ones they can answer with `errors(...)`.
ERRORS: dict[int, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text}
    for status, text in {
        400: "The request body could not be parsed",
        401: "Hosted mode (DELTALENS_TOKEN set): this write needs 'Authorization: Bearer <token>'",
        403: "The path is outside DELTALENS_ALLOWED_ROOTS",
        404: "No such analysis, checkpoint, upload, file or tensor",
        408: "An upload chunk sent no data for DELTALENS_UPLOAD_READ_TIMEOUT seconds (dropped; resume)",
        409: "Not possible in the resource's current state (not ready, wrong kind, already finished, "
        "incomplete, offset gap, checkpoint gone, another request writing the same upload file)",
        413: "The request body is larger than this endpoint accepts (DELTALENS_MAX_BODY_BYTES), or an upload "
        "file larger than DELTALENS_MAX_UPLOAD_BYTES / DELTALENS_MAX_METADATA_BYTES or its declared size",
        415: "A pickled checkpoint (refused) or a file type that is not weights or JSON metadata",
        422: "Invalid parameters, body or checkpoint content",
        429: "Too many requests from this client (e.g. mask export jobs per minute); retry later",
        507: "The data volume is full (nothing was stored; free space and resume)",
    }.items()
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the error statuses it can answer with, each a JSON {code, message}.

    422 needs no mention (every operation with parameters or a body documents it, see `document_errors`)."""
    return {status: ERRORS[status] for status in statuses}


WRITE = errors(401)  # every route behind WriteAccess


def link(path: str, method: str, description: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link from a response to another operation (values are runtime expressions,
    e.g. `$response.body#/id`): clients and stateful fuzzers follow them to real ids."""
    pointer = path.replace("~", "~0").replace("/", "~1")
    return {
        "operationRef": f"#/paths/{pointer}/{method.lower()}",
        "description": description,
        "parameters": parameters,
    }


def not_found(what: str, key: str) -> ApiError:
    return ApiError(404, "not_found", f"no {what} {key!r}")


def found(value, what: str, key: str):
    """value, or a 404 {code, message} when it is None."""
    if value is None:
        raise not_found(what, key)
    return value


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return JSONResponse({"code": e.code, "message": e.message}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(
            {"code": "invalid_request", "message": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
            e.status_code, "http_error"
        )
        return JSONResponse({"code": code, "message": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        # a bug: still JSON {code, message} (Starlette logs the traceback and re-raises after this answer)
        log.error("unhandled %s on %s %s", type(e).__name__, request.method, request.url.path)
        return JSONResponse({"code": "internal_error", "message": "internal server error"}, status_code=500)

    document_errors(app)


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI schema describe the errors the handlers above produce: FastAPI documents its
    422 as {detail: [...]} (we answer {code, message}) and leaves out the 400 for an unparsable body."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("ErrorOut", ErrorOut.model_json_schema())

        def response(status: int) -> dict[str, Any]:
            return {
                "description": ERRORS[status]["description"],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
            }

        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if "HTTPValidationError" in str(responses.get("422", "")):
                    responses["422"] = response(422)
                if "requestBody" in operation:
                    responses.setdefault("400", response(400))
                    responses.setdefault("413", response(413))  # backend/limits.py, before the body is read
                if (operation.get("parameters") or "requestBody" in operation) and "422" not in responses:
                    responses["422"] = response(422)
        if "HTTPValidationError" not in str(schema.get("paths")):
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
