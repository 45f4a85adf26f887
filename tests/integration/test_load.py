"""Bounded load/soak test on loopback against a live ``maskserve serve`` (uvicorn, production app, API keys on).

2,000 mixed requests at concurrency 64, a quarter of them malformed: zero 5xx, every malformed request a clear
4xx in the error shape, every valid request answered as expected, server RSS growth under 10 % (measured after
a warm-up), and the server still ready afterwards.

To extend it when a route lands, add ``Kind`` entries to ``VALID_KINDS`` / ``MALFORMED_KINDS`` below (the
traffic mix is drawn round-robin from the lists, so the counts stay the same), and add a tiny model to
``MODELS_UNDER_LOAD`` when its task has kinds of its own (e.g. "llama" for /v1/generate):

    Kind("fill-mask", "POST", "/v1/fill-mask", json={"inputs": "the dog [MASK] the red ball."}, models={"bert"})
    Kind("bad top_k", "POST", "/v1/fill-mask", json={"inputs": "a [MASK].", "parameters": {"top_k": 0}},
         expect=400, param="parameters.top_k", models={"bert"})
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.live import live_server

KEY = "k-load-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY_BYTES = 4096
TOTAL_REQUESTS = 2000
MALFORMED_SHARE = 0.25
CONCURRENCY = 64
WARMUP_REQUESTS = 200
MAX_RSS_GROWTH = 0.10
MODELS_UNDER_LOAD = ["bert", "llama"]  # fill-mask work on the encoder, generation on the decoder
ALL_MODELS = frozenset({"bert", "llama"})


@dataclass(frozen=True)
class Kind:
    """One kind of request and what a correct server answers to it."""

    name: str
    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: dict(AUTH))
    expect: int = 200
    param: str | None = None  # for a 4xx: the field the error must name
    check: Callable[[httpx.Response], bool] | None = None  # for a 2xx: is the body right?
    models: frozenset[str] | set[str] = ALL_MODELS


def _is_model_list(response: httpx.Response) -> bool:
    body = response.json()
    return body["object"] == "list" and len(body["data"]) == 1


VALID_KINDS: list[Kind] = [
    Kind("models", "GET", "/v1/models", check=_is_model_list),
    Kind("health", "GET", "/health", headers={}, check=lambda r: r.json() == {"status": "ok"}),
    Kind("ready", "GET", "/ready", headers={}, check=lambda r: r.json() == {"status": "ready"}),
    Kind("metrics", "GET", "/metrics", check=lambda r: "maskserve_requests_total" in r.text),
    Kind(
        "fill-mask",
        "POST",
        "/v1/fill-mask",
        json={"inputs": "the dog [MASK] the red ball.", "parameters": {"top_k": 3}},
        check=lambda r: len(r.json()) == 3,
        models={"bert"},
    ),
    Kind(
        "generate",
        "POST",
        "/v1/generate",
        json={"prompt": "the dog sees", "max_new_tokens": 4, "attention": {"exclude": [{"start": 4, "end": 7}]}},
        check=lambda r: r.json()["usage"]["completion_tokens"] >= 1,
        models={"llama"},
    ),
]

MALFORMED_KINDS: list[Kind] = [
    Kind("no key", "GET", "/v1/models", headers={}, expect=401),
    Kind("wrong key", "GET", "/v1/models", headers={"Authorization": "Bearer nope"}, expect=401),
    Kind("not bearer", "GET", "/metrics", headers={"Authorization": KEY}, expect=401),
    Kind("unknown route", "GET", "/v1/nope", expect=404),
    Kind("wrong method", "POST", "/v1/models", json={"model": "x"}, expect=405),
    Kind("malformed JSON to a GET route", "PUT", "/health", content=b"{not json", headers={}, expect=405),
    Kind("oversized body", "POST", "/v1/models", content=b"x" * (MAX_BODY_BYTES + 1), expect=413),
    Kind(
        "fill-mask top_k 0",
        "POST",
        "/v1/fill-mask",
        json={"inputs": "a [MASK].", "parameters": {"top_k": 0}},
        expect=400,  # in range for the schema, out of range for MASKSERVE_MAX_TOP_K
        param="parameters.top_k",
        models={"bert"},
    ),
    Kind(
        "fill-mask wrong type", "POST", "/v1/fill-mask", json={"inputs": 5}, expect=422, param="inputs", models={"bert"}
    ),
    Kind(
        "generate bad span",
        "POST",
        "/v1/generate",
        json={"prompt": "the dog", "attention": {"exclude": [{"start": 0, "end": 99}]}},
        expect=400,
        param="attention.exclude[0]",
        models={"llama"},
    ),
    Kind(
        "generate max_new_tokens 0",
        "POST",
        "/v1/generate",
        json={"prompt": "a", "max_new_tokens": 0},
        expect=422,
        param="max_new_tokens",
        models={"llama"},
    ),
]


def _traffic(model: str, seed: int = 0) -> list[Kind]:
    valid = [k for k in VALID_KINDS if model in k.models]
    malformed = [k for k in MALFORMED_KINDS if model in k.models]
    n_bad = int(TOTAL_REQUESTS * MALFORMED_SHARE)
    mix = [malformed[i % len(malformed)] for i in range(n_bad)]
    mix += [valid[i % len(valid)] for i in range(TOTAL_REQUESTS - n_bad)]
    random.Random(seed).shuffle(mix)
    return mix


def _problem(kind: Kind, response: httpx.Response) -> str | None:
    """What is wrong with this answer, or None."""
    if response.status_code != kind.expect:
        return f"{kind.name}: status {response.status_code}, expected {kind.expect}: {response.text[:200]}"
    if kind.expect >= 400:
        error = response.json().get("error", {})
        if not isinstance(error.get("message"), str) or not error["message"] or not error.get("type"):
            return f"{kind.name}: unclear error body {response.text[:200]}"
        if kind.param is not None and error.get("param") != kind.param:
            return f"{kind.name}: error names {error.get('param')!r}, expected {kind.param!r}"
    elif kind.check is not None and not kind.check(response):
        return f"{kind.name}: unexpected body {response.text[:200]}"
    return None


async def _run(url: str, traffic: list[Kind]) -> tuple[list[tuple[Kind, int | None, str | None, float]], float]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    semaphore = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one(kind: Kind) -> tuple[Kind, int | None, str | None, float]:
            async with semaphore:
                started = time.perf_counter()
                try:
                    response = await client.request(
                        kind.method, kind.path, json=kind.json, content=kind.content, headers=kind.headers
                    )
                except httpx.HTTPError as exc:  # an unanswered request: reported, never retried
                    return kind, None, f"{kind.name}: {type(exc).__name__}: {exc}", time.perf_counter() - started
                return kind, response.status_code, _problem(kind, response), time.perf_counter() - started

        started = time.perf_counter()
        results = await asyncio.gather(*(one(kind) for kind in traffic))
        return list(results), time.perf_counter() - started


@pytest.mark.parametrize("model", MODELS_UNDER_LOAD)
def test_load_and_soak(model: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model_dir: Path = request.getfixturevalue(f"tiny_{model}_dir")
    env = {
        "MASKSERVE_MODEL": str(model_dir),
        "MASKSERVE_ADAPTER": "none",
        "MASKSERVE_API_KEYS": KEY,
        "MASKSERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "MASKSERVE_LOG_LEVEL": "warning",  # 2,000 access lines are not what this test is about
    }
    with live_server(["-m", "service.cli", "serve"], env, tmp_path / "server.log") as server:
        process = psutil.Process(server.process.pid)
        warmup, _ = asyncio.run(_run(server.url, _traffic(model, seed=1)[:WARMUP_REQUESTS]))
        assert [p for _, _, p, _ in warmup if p] == []
        rss_before = process.memory_info().rss

        results, elapsed = asyncio.run(_run(server.url, _traffic(model)))
        rss_after = process.memory_info().rss

        statuses = Counter(status for _, status, _, _ in results)
        problems = [p for _, _, p, _ in results if p]
        assert len(results) == TOTAL_REQUESTS
        assert not [s for s in statuses if s is not None and s >= 500], statuses
        assert problems == [], f"{len(problems)} wrong answers, first ones: {problems[:5]}"
        malformed = [s for kind, s, _, _ in results if kind.expect >= 400]
        assert len(malformed) == int(TOTAL_REQUESTS * MALFORMED_SHARE)
        assert all(s is not None and 400 <= s < 500 for s in malformed)
        growth = (rss_after - rss_before) / rss_before
        assert growth < MAX_RSS_GROWTH, f"RSS grew {growth:.1%} ({rss_before >> 20} -> {rss_after >> 20} MiB)"

        assert httpx.get(f"{server.url}/ready", timeout=5).status_code == 200
        assert httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=5).status_code == 200
        assert server.stop() == 0

    latencies = sorted(latency for *_, latency in results)
    print(
        "\n"
        + json.dumps(
            {
                "model": model,
                "requests": TOTAL_REQUESTS,
                "concurrency": CONCURRENCY,
                "seconds": round(elapsed, 2),
                "requests_per_s": round(TOTAL_REQUESTS / elapsed, 1),
                "latency_ms_p50": round(statistics.median(latencies) * 1000, 1),
                "latency_ms_p99": round(latencies[int(0.99 * len(latencies)) - 1] * 1000, 1),
                "rss_mib_before": rss_before >> 20,
                "rss_mib_after": rss_after >> 20,
                "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
            }
        )
    )
