"""Issue 12's table on the real bundled model (SmolLM2-135M + the shipped MNTP adapter): the costly rows are
refused at admission or sliced, a cheap fill-mask answers meanwhile, bad text is a 400, the gauges read 0.

The probe program ``bench/adversarial_probe.py`` prints the latencies; this test asserts only generous bounds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import load_settings

pytestmark = pytest.mark.slow

CHEAP = {"inputs": "The [MASK] barked at the mailman."}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(load_settings(model="bundled", adapter="shipped"))) as c:
        yield c


def post(client: TestClient, url: str, body: dict[str, Any]) -> Any:
    return client.post(url, content=json.dumps(body), headers={"content-type": "application/json"})


def test_the_costly_rows_are_refused_at_admission(client: TestClient) -> None:
    rss = psutil.Process().memory_info().rss
    whole = {"whole_word": True, "top_k": 100}
    many = post(client, "/v1/fill-mask", {"inputs": ["The [MASK] " * 8] * 1000, "parameters": whole})
    assert (many.status_code, many.json()["error"]["param"]) == (400, "inputs")
    beams = post(client, "/v1/fill-mask", {"inputs": "The [MASK] " * 8, "parameters": whole})
    assert (beams.status_code, beams.json()["error"]["param"]) == (400, "parameters.top_k")
    props = {f"p{i}": {"type": "integer"} for i in range(3000)}
    big = post(client, "/v1/generate", {"prompt": "x", "json_schema": {"type": "object", "properties": props}})
    assert (big.status_code, big.json()["error"]["param"]) == (400, "json_schema")
    bad = post(client, "/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "\ud800"}]})
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "messages[0].content")
    assert psutil.Process().memory_info().rss - rss < 200 * 2**20


def test_a_cheap_fill_mask_answers_while_an_admitted_costly_one_runs(client: TestClient) -> None:
    costly = {"inputs": "The [MASK] " * 8, "parameters": {"whole_word": True, "top_k": 20}}
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(post, client, "/v1/fill-mask", costly)
        time.sleep(1.0)
        started = time.monotonic()
        assert post(client, "/v1/fill-mask", CHEAP).status_code == 200
        took = time.monotonic() - started
        assert job.result().status_code == 200
    assert took < 10
    metrics = client.get("/metrics").text
    assert 'maskserve_running_requests{worker="fill_mask"} 0.0' in metrics
    assert 'maskserve_queue_depth{worker="fill_mask"} 0.0' in metrics
