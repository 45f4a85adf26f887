"""Attention constraints on the bundled SmolLM2: an excluded span has no influence on the greedy output."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import load_settings

pytestmark = pytest.mark.slow

BEFORE = "Facts: the sky is blue."
SPANS = (" An old note says the meeting is on Monday.", " An old note says the meeting is on Sunday.")
AFTER = " Question: what colour is the sky? Answer:"


def test_excluded_span_has_no_influence_on_the_bundled_model() -> None:
    with TestClient(create_app(load_settings(adapter="none"))) as client:
        tok = client.app.state.engine.model.tokenizer  # type: ignore[attr-defined]
        assert len(tok(SPANS[0])["input_ids"]) == len(tok(SPANS[1])["input_ids"])
        outs, plain = [], []
        for span in SPANS:
            prompt = BEFORE + span + AFTER
            att = {"exclude": [{"start": len(BEFORE), "end": len(BEFORE) + len(span)}]}
            body = {"prompt": prompt, "max_new_tokens": 6}
            outs.append(client.post("/v1/generate", json={**body, "attention": att}).json())
            plain.append(client.post("/v1/generate", json=body).json())
        assert [t["id"] for t in outs[0]["tokens"]] == [t["id"] for t in outs[1]["tokens"]]
        assert [t["logprob"] for t in outs[0]["tokens"]] == pytest.approx(
            [t["logprob"] for t in outs[1]["tokens"]], abs=1e-4
        )
        # without the exclusion, the span's text does reach the model
        assert [t["logprob"] for t in plain[0]["tokens"]] != [t["logprob"] for t in plain[1]["tokens"]]
