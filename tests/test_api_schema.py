"""The API's schema is typed: every JSON read names a response model, and routes never answer a bare dict."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from deltalens.backend.app import create_app

ROUTES = Path(__file__).resolve().parents[1] / "backend" / "routes"
BINARY = {"/api/analyses/{aid}/masks/{mid}/file"}  # safetensors bytes, not JSON


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from deltalens.worker.settings import Settings

    return create_app(Settings(data_dir=str(tmp_path_factory.mktemp("schema"))))


def _typed(schema: dict, components: dict) -> bool:
    """A $ref to a component with real content, or an array of such."""
    if schema.get("type") == "array":
        return _typed(schema.get("items", {}), components)
    ref = schema.get("$ref", "")
    if not ref.startswith("#/components/schemas/"):
        return False
    component = components.get(ref.rsplit("/", 1)[1], {})
    # a real model: named properties, or (a root model) a union of such components
    return bool(component.get("properties")) or bool(
        component.get("oneOf") and all(_typed(s, components) for s in component["oneOf"])
    )


def test_every_json_get_has_a_typed_200(app):
    schema = app.openapi()
    components = schema["components"]["schemas"]
    gets = [(path, ops["get"]) for path, ops in schema["paths"].items() if "get" in ops]
    assert len(gets) >= 15
    untyped = []
    for path, op in gets:
        if not path.startswith("/api/") or path in BINARY:
            continue
        content = op["responses"]["200"].get("content", {})
        body = content.get("application/json", {}).get("schema", {})
        if not _typed(body, components):
            untyped.append((path, body))
    assert not untyped, untyped


def test_result_document_is_a_union_on_kind(app):
    components = app.openapi()["components"]["schemas"]
    for name in ("ResultDocument", "ResultSummary"):
        union = components[name]
        assert union["discriminator"]["propertyName"] == "kind", name
        assert len(union["oneOf"]) == 3
    for name in ("PairResult", "SeriesResult", "OverlapResult", "PairTensor"):
        assert components[name].get("additionalProperties") is True, name  # extra fields are kept


def test_error_responses_are_error_out(app):
    schema = app.openapi()
    for path, ops in schema["paths"].items():
        for op in ops.values():
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorOut"), (path, status)


def test_route_handlers_declare_models(app):
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path.startswith("/api/") and route.path not in BINARY:
            if "GET" in route.methods or route.status_code != 204:
                assert route.response_model not in (None, dict, list), route.path


def _is_bare_dict(annotation: ast.expr | None) -> bool:
    text = ast.unparse(annotation) if annotation is not None else ""
    return text.startswith(("dict", "list[dict", "Dict", "Any"))


def test_routes_return_no_bare_dicts():
    found = []
    for file in sorted(ROUTES.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            is_route = any(
                isinstance(d, ast.Call)
                and isinstance(d.func, ast.Attribute)
                and ast.unparse(d.func.value) == "router"
                for d in node.decorator_list
            )
            if is_route and (node.returns is None or _is_bare_dict(node.returns)):
                found.append(f"{file.name}:{node.lineno} {node.name}")
            for d in node.decorator_list:
                for kw in getattr(d, "keywords", []):
                    if kw.arg == "response_model" and _is_bare_dict(kw.value):
                        found.append(f"{file.name}:{node.lineno} {node.name} response_model")
    assert not found, found
