"""Make the OpenAPI document's error responses match what the service really sends.

FastAPI documents every 422 as its own ``HTTPValidationError`` (``{"detail": [...]}``), but the service answers
every error in one shape, ``ErrorResponse`` (``service.errors``). ``document_errors`` rewrites the generated
document so that a schema-driven client (or schemathesis' conformance checks) sees the truth. The rules, applied
to every operation (a response an operation documents itself is kept as it is):

- 422 (a field fails validation): ``ErrorResponse`` instead of ``HTTPValidationError``;
- 400 (malformed JSON, impossible request) and 413 (body over MASKSERVE_MAX_BODY_BYTES): operations with a body;
- 401 and the bearer security scheme: every operation but the probes, when MASKSERVE_API_KEYS is set;
- 503 (model still loading): operations that use the engine (``EngineDep``);
- 429 (queue full) and 504 (timed out): operations that submit work, i.e. POSTs that use the engine.

The document is regenerated whenever routes change; the rewrite is idempotent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from starlette.routing import BaseRoute

from service.api.health import get_engine
from service.errors import ErrorResponse
from service.middleware import PUBLIC_PATHS

SECURITY_SCHEME = "bearerAuth"
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_FASTAPI_ERROR_SCHEMAS = ("HTTPValidationError", "ValidationError")

ERROR_DESCRIPTIONS = {
    "400": "Malformed JSON, or a request the service cannot do; `param` names the field to change",
    "401": "API keys are configured and the request has no valid `Authorization: Bearer <key>`",
    "413": "The request body is larger than MASKSERVE_MAX_BODY_BYTES",
    "422": "A field fails validation; `param` names it",
    "429": "The queue is full; retry after the `Retry-After` seconds",
    "503": "The model is still loading (see GET /ready); retry after the `Retry-After` seconds",
    "504": "The request did not finish within MASKSERVE_REQUEST_TIMEOUT_S; its work was cancelled",
}


def _uses_engine(dependant: Dependant) -> bool:
    return dependant.call is get_engine or any(_uses_engine(d) for d in dependant.dependencies)


def _error_codes(route: RouteContext, method: str, operation: dict[str, Any], api_keys: bool) -> list[str]:
    codes = ["422"] if "422" in operation["responses"] else []
    if "requestBody" in operation:
        codes += ["400", "413", "422"]
    if api_keys and route.path_format not in PUBLIC_PATHS:
        codes.append("401")
    if _uses_engine(route.dependant):
        codes.append("503")
        if method == "post":
            codes += ["429", "504"]
    return sorted(set(codes))


def _is_fastapi_validation_error(response: dict[str, Any]) -> bool:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref", "").endswith("/HTTPValidationError"))


def document_errors(schema: dict[str, Any], routes: Iterable[BaseRoute], *, api_keys: bool) -> dict[str, Any]:
    """Rewrite ``schema`` (an OpenAPI document FastAPI generated from ``routes``) in place; return it."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs"))
    schemas["ErrorResponse"] = error_schema
    if api_keys:
        components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {"type": "http", "scheme": "bearer"}

    # Route contexts, not ``routes`` themselves: FastAPI keeps an included router as one entry whose routes
    # carry their path without the router's prefix.
    for route in iter_route_contexts(list(routes)):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        for method in sorted(route.methods or ()):
            operation = schema.get("paths", {}).get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            for code in _error_codes(route, method.lower(), operation, api_keys):
                existing = responses.get(code)
                if existing is None or _is_fastapi_validation_error(existing):
                    responses[code] = {
                        "description": ERROR_DESCRIPTIONS[code],
                        "content": {"application/json": {"schema": dict(_ERROR_REF)}},
                    }
            if api_keys and route.path_format not in PUBLIC_PATHS:
                operation["security"] = [{SECURITY_SCHEME: []}]

    for name in _FASTAPI_ERROR_SCHEMAS:
        schemas.pop(name, None)
    return schema
