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


FILL_BEFORE = "Paris is the capital of France."
FILL_SPANS = (" My neighbour owns a small brown dog.", " My neighbour owns a small black cat.")
FILL_AFTER = " The [MASK] barked at the mailman all morning."


def test_fill_mask_constraints_on_the_bundled_model_with_the_shipped_adapter() -> None:
    """Exclusion and isolation invariance through the MNTP adapter (bidirectional reading); and emphasis
    named on every layer and head (the steering attention function) equals emphasis carried in the mask."""
    # float32: the isolation invariance below is exact there (1e-4); on the bfloat16/int8 fast path the two
    # orders round differently by up to ~5e-3 in a score (tests/integration/test_precision.py states those).
    with TestClient(create_app(load_settings(adapter="shipped", precision="float32"))) as client:
        model = client.app.state.engine.model  # type: ignore[attr-defined]
        tok = model.tokenizer
        assert len(tok(FILL_SPANS[0])["input_ids"]) == len(tok(FILL_SPANS[1])["input_ids"])

        def fill(text: str, **extra: object) -> list[tuple[str, float]]:
            r = client.post("/v1/fill-mask", json={"inputs": text, **extra})
            assert r.status_code == 200, r.text
            return [(c["token_str"], c["score"]) for c in r.json()]

        start = len(FILL_BEFORE)
        excluded, plain = [], []
        for span in FILL_SPANS:
            text = FILL_BEFORE + span + FILL_AFTER
            excluded.append(fill(text, attention={"exclude": [{"start": start, "end": start + len(span)}]}))
            plain.append(fill(text))
        assert [w for w, _ in excluded[0]] == [w for w, _ in excluded[1]]
        assert [s for _, s in excluded[0]] == pytest.approx([s for _, s in excluded[1]], abs=1e-5)
        assert [s for _, s in plain[0]] != pytest.approx([s for _, s in plain[1]], abs=1e-5)

        isolated = []
        for first, second in (FILL_SPANS, FILL_SPANS[::-1]):
            b0 = start + len(first)
            segments = [{"start": start, "end": b0}, {"start": b0, "end": b0 + len(second)}]
            att = {"isolate": {"segments": segments, "restart_positions": True}}
            isolated.append(fill(FILL_BEFORE + first + second + FILL_AFTER, attention=att))
        assert [w for w, _ in isolated[0]] == [w for w, _ in isolated[1]]
        assert [s for _, s in isolated[0]] == pytest.approx([s for _, s in isolated[1]], abs=1e-4)

        n_layers, n_heads = model.attention_dims
        text = FILL_BEFORE + FILL_SPANS[0] + FILL_AFTER
        spans = [{"start": start, "end": start + len(FILL_SPANS[0])}]
        everywhere = fill(text, attention={"emphasis": {"spans": spans, "factor": 5}})
        named = fill(
            text,
            attention={
                "emphasis": {
                    "spans": spans,
                    "factor": 5,
                    "layers": list(range(n_layers)),
                    "heads": list(range(n_heads)),
                }
            },  # fmt: skip
        )
        assert [w for w, _ in named] == [w for w, _ in everywhere]
        assert [s for _, s in named] == pytest.approx([s for _, s in everywhere], abs=1e-4)


def test_generate_emphasis_on_every_named_layer_equals_emphasis_in_the_mask() -> None:
    """SmolLM2 has grouped-query attention (9 query heads, 3 key/value heads): a decode step's per-head bias
    goes through transformers' packed-GQA SDPA path; naming every layer and head must equal the mask path."""
    with TestClient(create_app(load_settings(adapter="none"))) as client:
        model = client.app.state.engine.model  # type: ignore[attr-defined]
        n_layers, n_heads = model.attention_dims
        prompt = BEFORE + SPANS[0] + AFTER
        spans = [{"start": 0, "end": len(BEFORE)}]
        outs = []
        for extra in ({}, {"layers": list(range(n_layers)), "heads": list(range(n_heads))}):
            body = {
                "prompt": prompt,
                "max_new_tokens": 6,
                "attention": {"emphasis": {"spans": spans, "factor": 5, **extra}},
            }
            r = client.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            outs.append(r.json()["tokens"])
        assert [t["id"] for t in outs[0]] == [t["id"] for t in outs[1]]
        assert [t["logprob"] for t in outs[0]] == pytest.approx([t["logprob"] for t in outs[1]], abs=1e-4)
