"""The service under a real uvicorn, over real sockets: chunked uploads, JSON logs, graceful shutdown."""

from __future__ import annotations

import http.client
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from tests.integration.apps import LEAKY_MESSAGE
from tests.integration.live import LiveServer, live_server

TEST_APP = ["-m", "tests.integration.apps"]


def _env(model_dir: Path, **extra: str) -> dict[str, str]:
    return {"MASKSERVE_MODEL": str(model_dir), "MASKSERVE_ADAPTER": "none", **extra}


@pytest.fixture(scope="module")
def server(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("live") / "server.log"
    with live_server(
        TEST_APP, _env(tiny_bert_dir, MASKSERVE_MAX_BODY_BYTES="2048", MASKSERVE_SHUTDOWN_TIMEOUT_S="20"), log
    ) as running:
        yield running


def _in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "maskserve_in_flight_requests":
            return float(family.samples[0].value)
    raise AssertionError("maskserve_in_flight_requests missing")


def test_chunked_upload_over_the_limit_is_413(server: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b"c" * 512

    response = httpx.post(f"{server.url}/test/echo", content=chunks(), timeout=10)
    assert response.status_code == 413
    assert response.json()["error"]["message"] == "request body is larger than 2048 bytes; send a smaller one"
    within = httpx.post(f"{server.url}/test/echo", content=iter([b"c" * 1024, b"c" * 1024]), timeout=10)
    assert within.status_code == 200
    assert within.json()["bytes"] == 2048


def test_an_idle_keep_alive_connection_outlives_the_clients_own_expiry(server: LiveServer) -> None:
    # At uvicorn's default (5 s, the same as httpx's keepalive_expiry) the two sides raced to close an idle
    # connection, and a request sent on it at that instant failed with ReadError (seen in the load test).
    idle_s = httpx.Limits().keepalive_expiry or 5.0
    assert Settings().keep_alive_s > idle_s
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", "/health")
        assert connection.getresponse().read() == b'{"status":"ok"}'
        sock = connection.sock
        time.sleep(idle_s + 1)  # past where the server would have closed it at uvicorn's default
        connection.request("GET", "/health")  # on the same socket: a closed one raises RemoteDisconnected
        assert connection.getresponse().read() == b'{"status":"ok"}'
        assert connection.sock is sock
    finally:
        connection.close()


def test_logs_are_json_lines_with_request_ids(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/test/boom", headers={"X-Request-ID": "live-boom"}, timeout=10)
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "internal server error"
    assert LEAKY_MESSAGE not in response.text
    httpx.get(f"{server.url}/v1/models", headers={"X-Request-ID": "live-ok"}, timeout=10)
    time.sleep(0.2)  # let the server flush its last lines
    lines = server.log_lines()  # raises if any line is not JSON
    mine = [line for line in lines if line.get("request_id") in {"live-boom", "live-ok"}]
    assert [(x["logger"], x.get("status")) for x in mine] == [
        ("maskserve.errors", None),
        ("maskserve.access", 500),
        ("maskserve.access", 200),
    ]
    assert LEAKY_MESSAGE in mine[0]["exception"]  # the traceback is logged, once, with the request id
    assert server.log().count("Traceback") == 1
    assert any(x["logger"] == "uvicorn.error" and "Application startup complete" in x["message"] for x in lines)


def test_streaming_passes_through_unbuffered_and_disconnects_reach_the_app(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=20) as client:
        with client.stream("GET", "/test/stream", headers={"X-Request-ID": "stream-1"}) as response:
            chunks = response.iter_bytes()
            assert next(chunks) == b"first\n"  # arrived while the app still holds the second one
            assert client.post("/test/release").json() == {"released": True}
            assert b"".join(chunks) == b"second\n"
        # Now leave after the first chunk: the app sees the disconnect through the middleware's receive.
        with client.stream("GET", "/test/stream", headers={"X-Request-ID": "stream-2"}) as response:
            assert next(response.iter_bytes()) == b"first\n"
    deadline = time.monotonic() + 10
    while not (lines := [x for x in server.log_lines() if x.get("request_id") == "stream-2"]):
        assert time.monotonic() < deadline, "no access line for the abandoned stream"
        time.sleep(0.1)
    assert lines[0]["client_disconnected"] is True
    assert lines[0]["status"] == 200
    assert lines[0]["response_bytes"] == len(b"first\n")


# Last in this module: it stops the module's server (one server start saved; pytest keeps file order).
def test_sigterm_drains_in_flight_requests(server: LiveServer) -> None:
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.get, f"{server.url}/test/slow?seconds=2", timeout=30)
        deadline = time.monotonic() + 10
        while _in_flight(server.url) < 2:  # the slow request and this /metrics request
            assert time.monotonic() < deadline, "the slow request never started"
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections once draining began
            httpx.get(f"{server.url}/health", timeout=2)
        assert server.process.poll() is None  # still draining
        response = slow.result(timeout=30)
        assert response.status_code == 200
        assert response.json() == {"slept": 2.0}
        assert server.process.wait(30) == 0
        messages = [(x["logger"], x["message"], x.get("route")) for x in server.log_lines()]
        slow_done = messages.index(("maskserve.access", "request", "/test/slow"))
        shutdown_done = messages.index(("uvicorn.error", "Application shutdown complete.", None))
        assert slow_done < shutdown_done  # answered before the lifespan (Engine.stop) ran
