"""Prometheus metrics, defined once. Workers and middleware update them; ``GET /metrics`` exposes them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("maskserve_requests_total", "HTTP requests by route and status", ["route", "status"])
REQUEST_LATENCY = Histogram(
    "maskserve_request_seconds",
    "HTTP request latency by route",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
IN_FLIGHT = Gauge("maskserve_in_flight_requests", "HTTP requests being served now")
QUEUE_DEPTH = Gauge("maskserve_queue_depth", "Requests waiting for a worker", ["worker"])
RUNNING = Gauge("maskserve_running_requests", "Requests being computed", ["worker"])
BATCH_SIZE = Histogram(
    "maskserve_batch_size", "Requests per forward pass", ["worker"], buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
GENERATED_TOKENS = Counter("maskserve_generated_tokens_total", "Tokens generated")
PROMPT_TOKENS = Counter("maskserve_prompt_tokens_total", "Prompt tokens processed", ["worker"])
MASKS_APPLIED = Counter("maskserve_masks_applied_total", "Masks applied to requests, by kind", ["kind"])
REJECTED = Counter("maskserve_rejected_total", "Requests refused before any work, by reason", ["reason"])
