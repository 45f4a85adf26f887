"""Middleware on every route: API keys, body limit, CORS, request ids, access logs, metrics, 500s, OpenAPI."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.engine.loading import LoadedModel
from service.logs import JsonFormatter
from tests.integration.apps import LEAKY_MESSAGE, create_test_app

KEY = "k-test-0123456789"
OTHER_KEY = "k-other-abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
UNAUTHORIZED = {
    "error": {
        "message": "missing or invalid API key: send 'Authorization: Bearer <key>'",
        "type": "authentication_error",
        "param": None,
        "code": None,
    }
}


def _client(settings: Settings, loaded: LoadedModel, **overrides: Any) -> TestClient:
    return TestClient(create_test_app(settings.model_copy(update=overrides), loaded=loaded))


@pytest.fixture
def json_log() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The JSON lines the service's loggers write while the test runs (through the production formatter)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("maskserve")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(previous)


@pytest.fixture
def keyed(bert_settings: Settings, tiny_bert: LoadedModel) -> Iterator[TestClient]:
    with _client(bert_settings, tiny_bert, api_keys=[KEY, OTHER_KEY]) as client:
        yield client


@pytest.fixture
def open_client(bert_settings: Settings, tiny_bert: LoadedModel) -> Iterator[TestClient]:
    with _client(bert_settings, tiny_bert, max_body_bytes=2048) as client:
        yield client


# --- API keys ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/openapi.json", "/docs", "/test/slow?seconds=0"])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer k\u00e9y".encode("latin-1")},
    ],
)
def test_protected_routes_refuse_without_a_valid_key(keyed: TestClient, path: str, headers: dict[str, str]) -> None:
    response = keyed.get(path, headers=headers)
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED
    assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_routes_are_protected_too(keyed: TestClient) -> None:
    # No key: 401 before routing, so an unauthenticated client cannot even map the routes.
    assert keyed.get("/nope").status_code == 401
    assert keyed.post("/v1/models").status_code == 401
    assert keyed.get("/nope", headers=AUTH).status_code == 404
    assert keyed.post("/v1/models", headers=AUTH).status_code == 405


@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
def test_every_configured_key_is_accepted(keyed: TestClient, key: str) -> None:
    for scheme in ("Bearer", "bearer"):
        response = keyed.get("/v1/models", headers={"Authorization": f"{scheme} {key}"})
        assert response.status_code == 200
        assert response.json()["data"][0]["kind"] == "encoder"


def test_probes_need_no_key(keyed: TestClient) -> None:
    assert keyed.get("/health").json() == {"status": "ok"}
    assert keyed.get("/ready").json() == {"status": "ready"}


def test_no_keys_configured_means_open(open_client: TestClient) -> None:
    assert open_client.get("/v1/models").status_code == 200
    assert open_client.get("/openapi.json").status_code == 200


# --- body limit ----------------------------------------------------------------------------------------------


def test_body_within_limit_passes(open_client: TestClient) -> None:
    response = open_client.post("/test/echo", content=b"x" * 2048)
    assert response.status_code == 200
    assert response.json()["bytes"] == 2048


def test_declared_content_length_over_limit_is_413(open_client: TestClient) -> None:
    response = open_client.post("/test/echo", content=b"x" * 2049)
    assert response.status_code == 413
    assert response.json() == {
        "error": {
            "message": "request body is larger than 2048 bytes; send a smaller one",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    assert "x-request-id" in response.headers


def test_chunked_body_over_limit_is_413(open_client: TestClient) -> None:
    # A generator body goes out without Content-Length: only counting the received bytes catches it.
    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            yield b"y" * 1000

    response = open_client.post("/test/echo", content=chunks())
    assert response.status_code == 413
    assert response.json()["error"]["message"] == "request body is larger than 2048 bytes; send a smaller one"


def test_chunked_body_over_limit_to_a_pydantic_route_is_413_not_400(open_client: TestClient) -> None:
    # FastAPI parses this body itself and turns the aborted read into a 400; the middleware answers 413 instead.
    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(3):
            yield b"w" * 1000
        yield b'"}'

    response = open_client.post("/test/json", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"
    small = open_client.post("/test/json", json={"text": "short"})
    assert small.status_code == 200
    assert small.json() == {"chars": 5}


def test_invalid_content_length_is_400(open_client: TestClient) -> None:
    response = open_client.post("/test/echo", content=b"abc", headers={"Content-Length": "3x"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Content-Length must be a whole number"


# --- CORS ----------------------------------------------------------------------------------------------------


def test_cors_is_off_by_default(open_client: TestClient) -> None:
    response = open_client.get("/health", headers={"Origin": "https://example.com"})
    assert "access-control-allow-origin" not in response.headers
    preflight = open_client.options(
        "/v1/models", headers={"Origin": "https://example.com", "Access-Control-Request-Method": "GET"}
    )
    assert preflight.status_code == 405


def test_cors_when_configured(bert_settings: Settings, tiny_bert: LoadedModel) -> None:
    origin = "https://app.example.com"
    with _client(bert_settings, tiny_bert, cors_origins=[origin], api_keys=[KEY]) as client:
        # The preflight carries no credentials and must still succeed.
        preflight = client.options(
            "/v1/models",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        response = client.get("/v1/models", headers={"Origin": origin, **AUTH})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == origin
        assert "X-Request-ID" in response.headers["access-control-expose-headers"]
        other = client.get("/v1/models", headers={"Origin": "https://evil.example", **AUTH})
        assert "access-control-allow-origin" not in other.headers


# --- request id ----------------------------------------------------------------------------------------------


def test_request_id_is_echoed_and_visible_to_routes(open_client: TestClient) -> None:
    response = open_client.post("/test/echo", content=b"hi", headers={"X-Request-ID": "client-id-42"})
    assert response.headers["x-request-id"] == "client-id-42"
    assert response.json() == {"bytes": 2, "request_id": "client-id-42"}


@pytest.mark.parametrize("incoming", [None, "", "has space", "x" * 129, 'quote"d', "k\u00e9y"])
def test_request_id_is_generated_when_missing_or_unsafe(open_client: TestClient, incoming: str | None) -> None:
    headers: dict[bytes, bytes] = {} if incoming is None else {b"X-Request-ID": incoming.encode("latin-1")}
    response = open_client.post("/test/echo", content=b"", headers=headers)
    generated = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert response.json()["request_id"] == generated


def test_request_ids_differ(open_client: TestClient) -> None:
    ids = {open_client.get("/health").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


# --- errors never leak ---------------------------------------------------------------------------------------


def test_unhandled_error_is_a_generic_500(
    bert_settings: Settings, tiny_bert: LoadedModel, json_log: Callable[[], list[dict[str, Any]]]
) -> None:
    with _client(bert_settings, tiny_bert, api_keys=[KEY]) as client:
        response = client.get("/test/boom", headers={**AUTH, "X-Request-ID": "boom-1"})
    assert response.status_code == 500
    assert response.json() == {
        "error": {"message": "internal server error", "type": "internal_error", "param": None, "code": None}
    }
    assert response.headers["x-request-id"] == "boom-1"
    for leak in ("/srv", "safetensors", "sk-live", KEY, str(bert_settings.model), "Traceback", "RuntimeError"):
        assert leak not in response.text
    # The traceback is in the log instead, tagged with the request id.
    error, access = json_log()
    assert (error["logger"], error["level"], error["message"]) == ("maskserve.errors", "error", "unhandled error")
    assert error["request_id"] == "boom-1"
    assert LEAKY_MESSAGE in error["exception"]
    assert (access["logger"], access["request_id"], access["status"]) == ("maskserve.access", "boom-1", 500)


def test_validation_errors_do_not_echo_settings(open_client: TestClient) -> None:
    response = open_client.get("/test/slow", params={"seconds": "soon"})
    assert response.status_code == 422
    assert response.json() == {
        "error": {
            "message": "'seconds': Input should be a valid number, unable to parse string as a number",
            "type": "invalid_request_error",
            "param": "seconds",
            "code": "float_parsing",
        }
    }


# --- access log ----------------------------------------------------------------------------------------------


def test_one_json_access_line_per_request_without_text(
    open_client: TestClient, json_log: Callable[[], list[dict[str, Any]]]
) -> None:
    open_client.post("/test/echo", content=b"secret prompt", headers={"X-Request-ID": "log-1"})
    open_client.get("/nope", headers={"X-Request-ID": "log-2"})
    first, second = json_log()
    assert set(first) == {
        "ts", "level", "logger", "message", "request_id", "method", "route", "path", "status", "latency_ms",
        "request_bytes", "response_bytes",
    }  # fmt: skip
    assert first["request_id"] == "log-1"
    assert (first["method"], first["route"], first["path"], first["status"]) == (
        "POST",
        "/test/echo",
        "/test/echo",
        200,
    )
    assert first["request_bytes"] == len(b"secret prompt")
    assert first["response_bytes"] == len(b'{"bytes":13,"request_id":"log-1"}')
    assert first["latency_ms"] >= 0
    assert "secret prompt" not in json.dumps(first)
    assert (second["request_id"], second["route"], second["status"]) == ("log-2", "unmatched", 404)


def test_request_text_is_logged_only_when_enabled(
    bert_settings: Settings, tiny_bert: LoadedModel, json_log: Callable[[], list[dict[str, Any]]]
) -> None:
    with _client(bert_settings, tiny_bert, log_request_text=True) as client:
        client.post("/test/echo", content="a prompt ✓".encode())
        client.post("/test/echo", content=b"z" * 5000)
    short, long = json_log()
    assert short["request_text"] == "a prompt ✓"
    assert long["request_text"] == "z" * 2000  # truncated


# --- metrics -------------------------------------------------------------------------------------------------


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent, like an untouched counter)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_metrics_count_requests_by_route_template_and_status(keyed: TestClient) -> None:
    before = keyed.get("/metrics", headers=AUTH).text
    for _ in range(3):
        keyed.get("/v1/models", headers=AUTH)
    keyed.get("/v1/models")  # 401
    keyed.get("/nope/1", headers=AUTH)
    keyed.get("/nope/2", headers=AUTH)
    after = keyed.get("/metrics", headers=AUTH)
    assert after.status_code == 200
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text

    def delta(name: str, **labels: str) -> float:
        return _sample(text, name, **labels) - _sample(before, name, **labels)

    assert delta("maskserve_requests_total", route="/v1/models", status="200") == 3
    assert delta("maskserve_requests_total", route="/v1/models", status="401") == 1  # refused before routing
    assert delta("maskserve_requests_total", route="unmatched", status="404") == 2
    assert delta("maskserve_request_seconds_count", route="/v1/models") == 4
    assert delta("maskserve_request_seconds_bucket", route="/v1/models", le="+Inf") == 4
    assert _sample(text, "maskserve_in_flight_requests") == 1  # this very /metrics request
    for name in (
        "maskserve_queue_depth", "maskserve_running_requests", "maskserve_batch_size",
        "maskserve_generated_tokens_total", "maskserve_prompt_tokens_total", "maskserve_masks_applied_total",
        "maskserve_rejected_total",
    ):  # fmt: skip
        assert f"# TYPE {name} " in text


def test_refused_requests_are_counted_under_their_route(keyed: TestClient) -> None:
    def count(text: str, route: str, status: str) -> float:
        return _sample(text, "maskserve_requests_total", route=route, status=status)

    before = keyed.get("/metrics", headers=AUTH).text
    keyed.get("/metrics")
    keyed.get("/nope")
    keyed.post("/test/echo", content=b"x" * 2_000_000, headers=AUTH)
    after = keyed.get("/metrics", headers=AUTH).text
    assert count(after, "/metrics", "401") - count(before, "/metrics", "401") == 1
    assert count(after, "unmatched", "401") - count(before, "unmatched", "401") == 1
    assert count(after, "/test/echo", "413") - count(before, "/test/echo", "413") == 1
