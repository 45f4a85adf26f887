"""Issue 12's table, fired at a real server: what each hostile or careless request gets, and how long a cheap
fill-mask sent while it runs waits.

    python bench/adversarial_probe.py                  # bundled SmolLM2 + shipped MNTP adapter (`make serve`'s)
    python bench/adversarial_probe.py --model DIR --adapter none   # any other local model directory

It starts ``maskserve serve`` as a subprocess on a free loopback port, measures a cheap fill-mask on the idle
server (median of 5), then for each row sends the request, waits a moment, sends the cheap fill-mask and
times it, and waits for the row's answer. It prints a table (status, the row's time, the cheap request's
latency during it), the server's peak resident memory (sampled every 50 ms) and the running/queued gauges at
the end, which must read 0. Timing is of one run on whatever machine runs it: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fill_mask import free_port, start, stop  # noqa: E402

LONE = "\ud800"
CHEAP = {"inputs": "The [MASK] barked at the mailman."}
Send = Callable[[httpx.Client], httpx.Response]


def post(url: str, body: dict[str, Any], timeout: float = 600) -> Send:
    """POST as ASCII JSON (a lone surrogate travels as the escape, as a client would send it)."""

    def send(client: httpx.Client) -> httpx.Response:
        return client.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=timeout)

    return send


def schema(n: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}


def rows() -> list[tuple[str, Send]]:
    whole = {"whole_word": True, "top_k": 100}
    costly = {"inputs": "The [MASK] " * 8, "parameters": {"whole_word": True, "top_k": 20}}
    return [
        (
            "fill-mask: 1000 inputs x 8 masks, whole_word, top_k 100",
            post("/v1/fill-mask", {"inputs": ["The [MASK] " * 8] * 1000, "parameters": whole}),
        ),
        (
            "fill-mask: 8 masks, whole_word, top_k 100",
            post("/v1/fill-mask", {"inputs": "The [MASK] " * 8, "parameters": whole}),
        ),
        ("fill-mask: 8 masks, whole_word, top_k 20 (admitted: 992 rows)", post("/v1/fill-mask", costly)),
        ("the same, client leaves after 5 s", post("/v1/fill-mask", costly, timeout=5)),
        (
            "generate: JSON schema of 3000 properties",
            post("/v1/generate", {"prompt": "A person:", "max_new_tokens": 8, "json_schema": schema(3000)}),
        ),
        (
            "generate: JSON schema of 250 properties (admitted)",
            post("/v1/generate", {"prompt": "A person:", "max_new_tokens": 8, "json_schema": schema(250)}),
        ),
        ("generate: lone surrogate in prompt", post("/v1/generate", {"prompt": LONE, "max_new_tokens": 4})),
        ("generate (stream): lone surrogate in prompt", post("/v1/generate", {"prompt": LONE, "stream": True})),
        (
            "chat: lone surrogate in content",
            post("/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": LONE}]}),
        ),
        (
            "fill-mask: lone surrogate in inputs / targets",
            post("/v1/fill-mask", {"inputs": "The [MASK] barked.", "parameters": {"targets": ["dog", LONE]}}),
        ),
        ("masks dry run: lone surrogate", post("/v1/masks", {"endpoint": "generate", "request": {"prompt": LONE}})),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--adapter", default="shipped")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds between a row's request and the cheap one")
    args = parser.parse_args(argv)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MASKSERVE_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", args.model, "--adapter", args.adapter]
    proc = start([*cmd, "--port", str(port)], env, f"{base}/ready")
    peak = 0
    sampling = True

    def sample() -> None:
        nonlocal peak
        server = psutil.Process(proc.pid)
        while sampling:
            try:
                peak = max(peak, server.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    print(f"model {args.model} (adapter {args.adapter}); {os.cpu_count()} cpus; load average at start "
          f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    try:
        with httpx.Client(base_url=base, trust_env=False) as client, ThreadPoolExecutor(2) as pool:
            post("/v1/fill-mask", CHEAP)(client)  # warm-up
            idle = []
            for _ in range(5):
                t0 = time.perf_counter()
                post("/v1/fill-mask", CHEAP)(client)
                idle.append(time.perf_counter() - t0)
            print(f"cheap fill-mask on the idle server: {statistics.median(idle):.3f} s (median of 5)\n")
            print("| what was sent | status | its time s | cheap fill-mask during it s |")
            print("|---|---|---|---|")
            for name, send in rows():

                def timed(send: Send = send) -> tuple[httpx.Response, float]:
                    t0 = time.perf_counter()
                    return send(client), time.perf_counter() - t0

                job = pool.submit(timed)
                deadline = time.perf_counter() + args.delay
                while not job.done() and time.perf_counter() < deadline:
                    time.sleep(0.01)
                cheap_s: str = "(answered first)"
                if not job.done():
                    c0 = time.perf_counter()
                    cheap = post("/v1/fill-mask", CHEAP)(client)
                    cheap_s = f"{time.perf_counter() - c0:.3f}" + ("" if cheap.status_code == 200 else " (!)")
                try:
                    response, took = job.result()
                    status = str(response.status_code)
                except httpx.TimeoutException:
                    status, took = "client left", 5.0
                if status == "client left":  # the work must stop: a cheap request right after must not wait
                    c0 = time.perf_counter()
                    post("/v1/fill-mask", CHEAP)(client)
                    cheap_s += f"; right after leaving {time.perf_counter() - c0:.3f}"
                print(f"| {name} | {status} | {took:.2f} | {cheap_s} |", flush=True)
            with ThreadPoolExecutor(20) as many:
                codes = list(many.map(lambda _: post("/v1/fill-mask", CHEAP)(client).status_code, range(20)))
            print(f"| 20 concurrent cheap fill-masks | {sorted(set(codes))} | | |")
            gauges = [
                line for line in client.get("/metrics").text.splitlines()
                if line.startswith(("maskserve_running_requests{", "maskserve_queue_depth{"))
            ]  # fmt: skip
            print("\ngauges at rest: " + ", ".join(gauges))
    finally:
        sampling = False
        sampler.join(1)
        stop(proc)
    print(f"server peak RSS: {peak / 2**30:.2f} GiB; load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
