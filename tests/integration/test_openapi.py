"""The OpenAPI document tells the truth about errors, and no request can name a file on the server."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pydantic import BaseModel

from service.api.health import EngineDep
from service.app import create_app
from service.config import Settings
from service.engine.loading import LoadedModel
from service.middleware import PUBLIC_PATHS

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
# A request field with one of these in its name could point the server at a file: models and adapters come only
# from settings (MASKSERVE_MODEL, MASKSERVE_ADAPTER). OpenAI's `model` (a name, checked against the served
# one) is allowed; a path-like name is not. "attention_weights" / "attention_layer" ask for the model's
# attention probabilities (an output), not for weights to load.
PATH_LIKE = re.compile(r"path|dir|file|adapter|cache|checkpoint|(?<!attention_)weights|lora", re.IGNORECASE)


def _schema(settings: Settings, loaded: LoadedModel, **overrides: Any) -> dict[str, Any]:
    app = create_app(settings.model_copy(update=overrides), loaded=loaded)
    with TestClient(app) as client:
        headers = {"Authorization": "Bearer k"} if overrides.get("api_keys") else {}
        response = client.get("/openapi.json", headers=headers)
        assert response.status_code == 200
        return dict(response.json())


def _operations(schema: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(path, method): op for path, item in schema["paths"].items() for method, op in item.items()}


def test_no_fastapi_validation_schema_is_left(bert_settings: Settings, tiny_bert: LoadedModel) -> None:
    schema = _schema(bert_settings, tiny_bert)
    assert "HTTPValidationError" not in str(schema)
    assert "ValidationError" not in schema["components"]["schemas"]
    assert schema["components"]["schemas"]["ErrorResponse"] == {
        "properties": {"error": {"$ref": "#/components/schemas/ErrorDetail"}},
        "required": ["error"],
        "title": "ErrorResponse",
        "type": "object",
    }
    for (path, method), op in _operations(schema).items():
        for code, response in op["responses"].items():
            if code.startswith(("4", "5")) and "content" in response:
                assert response["content"]["application/json"]["schema"] == ERROR_REF, (path, method, code)


def test_documented_errors_per_route(bert_settings: Settings, tiny_bert: LoadedModel) -> None:
    ops = _operations(_schema(bert_settings, tiny_bert))
    assert {("/health", "get"), ("/metrics", "get"), ("/ready", "get"), ("/v1/models", "get")} <= set(ops)
    assert sorted(ops[("/health", "get")]["responses"]) == ["200"]
    assert sorted(ops[("/metrics", "get")]["responses"]) == ["200"]
    # /ready documents its own 503 ({"status": "loading"}, not the error shape): kept as it is.
    assert ops[("/ready", "get")]["responses"]["503"] == {"description": "model still loading"}
    assert sorted(ops[("/v1/models", "get")]["responses"]) == ["200", "503"]
    assert "security" not in ops[("/v1/models", "get")]


def test_keys_add_401_and_the_bearer_scheme(bert_settings: Settings, tiny_bert: LoadedModel) -> None:
    schema = _schema(bert_settings, tiny_bert, api_keys=["k"])
    assert schema["components"]["securitySchemes"] == {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    for (path, _), op in _operations(schema).items():
        if path in PUBLIC_PATHS:  # /health, /ready and the static /playground page
            assert "401" not in op["responses"]
            assert "security" not in op
        else:
            assert op["responses"]["401"]["content"]["application/json"]["schema"] == ERROR_REF
            assert op["security"] == [{"bearerAuth": []}]


class _Inner(BaseModel):
    adapter_path: str


class _Outer(BaseModel):
    inner: list[_Inner] | None = None


class _Job(BaseModel):
    text: str
    top_k: int = 5


def test_rules_for_work_routes_in_prefixed_routers(bert_settings: Settings, tiny_bert: LoadedModel) -> None:
    # What A's and B's routes look like: a POST with a body that uses the engine, in a router with a prefix.
    router = APIRouter(prefix="/v1/demo")

    @router.post("/run")
    async def run(job: _Job, engine: EngineDep) -> dict[str, str]:
        return {"text": job.text}

    @router.get("/items/{item_id}", responses={404: {"description": "no such item"}})
    async def item(item_id: int, engine: EngineDep) -> dict[str, int]:
        return {"id": item_id}

    app = create_app(bert_settings, loaded=tiny_bert)
    app.include_router(router)
    ops = _operations(app.openapi())
    assert sorted(ops[("/v1/demo/run", "post")]["responses"]) == ["200", "400", "413", "422", "429", "503", "504"]
    assert ops[("/v1/demo/run", "post")]["responses"]["429"]["content"]["application/json"]["schema"] == ERROR_REF
    assert sorted(ops[("/v1/demo/items/{item_id}", "get")]["responses"]) == ["200", "404", "422", "503"]
    assert ops[("/v1/demo/items/{item_id}", "get")]["responses"]["404"] == {"description": "no such item"}
    assert app.openapi() == app.openapi()  # idempotent


def _walk_request_schemas(schema: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (where, field name) a client can send: parameters and body properties, following $refs."""
    components = schema.get("components", {}).get("schemas", {})
    found: list[tuple[str, str]] = []
    seen: set[str] = set()

    def visit(node: Any, where: str) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                name = ref.rsplit("/", 1)[-1]
                if name not in seen:
                    seen.add(name)
                    visit(components[name], f"{where}->{name}")
                return
            for prop, sub in node.get("properties", {}).items():
                found.append((where, prop))
                visit(sub, f"{where}.{prop}")
            for key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems"):
                if key in node:
                    visit(node[key], where)
        elif isinstance(node, list):
            for sub in node:
                visit(sub, where)

    for (path, method), op in _operations(schema).items():
        for parameter in op.get("parameters", []):
            found.append((f"{method} {path}", parameter["name"]))
            visit(parameter.get("schema"), f"{method} {path}?{parameter['name']}")
        for media in op.get("requestBody", {}).get("content", {}).values():
            visit(media.get("schema"), f"{method} {path} body")
    return found


def test_the_walk_finds_nested_fields(bert_settings: Settings, tiny_bert: LoadedModel) -> None:
    app = create_app(bert_settings, loaded=tiny_bert)

    @app.post("/probe")
    async def probe(body: _Outer, cache_dir: str = "") -> None:
        return None

    names = [name for _, name in _walk_request_schemas(app.openapi())]
    assert {"inner", "adapter_path", "cache_dir"} <= set(names)
    assert [n for n in names if PATH_LIKE.search(n)] == ["cache_dir", "adapter_path"]


@pytest.mark.parametrize("keys", [[], ["k"]])
def test_no_request_field_names_a_model_or_adapter_path(
    bert_settings: Settings, tiny_bert: LoadedModel, keys: list[str]
) -> None:
    fields = _walk_request_schemas(_schema(bert_settings, tiny_bert, api_keys=keys))
    assert [f for f in fields if PATH_LIKE.search(f[1])] == []
