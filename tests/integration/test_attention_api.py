"""Per-request attention constraints and mask inspection over HTTP, on the tiny Llama and tiny BERT.

The proofs: an excluded span has no influence (replacing its text by other text of the same token length
leaves the output unchanged), an empty constraint is bit-identical to none, and isolated segments with
restarted positions make their order irrelevant.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.engine.loading import LoadedModel
from tests.integration.attention_texts import PREFIX, SPAN_A, SPAN_B, isolate_two

QUESTION = " the teacher visits"


@pytest.fixture(scope="module")
def client(llama_settings: Settings, tiny_llama: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(llama_settings, loaded=tiny_llama)) as c:
        yield c


def generate(client: TestClient, prompt: str, **extra: Any) -> dict[str, Any]:
    body = {"prompt": prompt, "max_new_tokens": 8, "top_logprobs": 0, **extra}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def n_tokens(model: LoadedModel, text: str) -> int:
    return len(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_excluded_span_has_no_influence(client: TestClient, tiny_llama: LoadedModel) -> None:
    assert n_tokens(tiny_llama, SPAN_A) == n_tokens(tiny_llama, SPAN_B)  # same token length: same positions
    start = len(PREFIX)
    outs = []
    for span in (SPAN_A, SPAN_B):
        prompt = PREFIX + span + QUESTION
        att = {"exclude": [{"start": start, "end": start + len(span)}]}
        outs.append(generate(client, prompt, attention=att))
    assert [t["id"] for t in outs[0]["tokens"]] == [t["id"] for t in outs[1]["tokens"]]
    assert [t["logprob"] for t in outs[0]["tokens"]] == pytest.approx(
        [t["logprob"] for t in outs[1]["tokens"]], abs=1e-5
    )
    # without the exclusion the span does matter (so the test above could fail)
    plain = [generate(client, PREFIX + span + QUESTION) for span in (SPAN_A, SPAN_B)]
    assert [t["logprob"] for t in plain[0]["tokens"]] != [t["logprob"] for t in plain[1]["tokens"]]


def test_empty_constraint_is_bit_identical_to_none(client: TestClient) -> None:
    prompt = PREFIX + SPAN_A + QUESTION
    none = generate(client, prompt)
    empty = generate(client, prompt, attention={})
    assert none["tokens"] == empty["tokens"]


def test_isolated_segments_with_restarts_make_order_irrelevant(client: TestClient) -> None:
    outs = []
    for first, second in ((SPAN_A, SPAN_B), (SPAN_B, SPAN_A)):
        prompt = PREFIX + first + second + QUESTION
        att = isolate_two(first, second)
        outs.append(generate(client, prompt, attention=att))
    assert [t["id"] for t in outs[0]["tokens"]] == [t["id"] for t in outs[1]["tokens"]]
    assert [t["logprob"] for t in outs[0]["tokens"]] == pytest.approx(
        [t["logprob"] for t in outs[1]["tokens"]], abs=1e-4
    )


def test_emphasis_changes_the_output_distribution(client: TestClient) -> None:
    prompt = PREFIX + SPAN_A + QUESTION
    plain = generate(client, prompt)
    steered = generate(
        client, prompt, attention={"emphasis": {"spans": [{"start": 0, "end": len(PREFIX)}], "factor": 20}}
    )
    assert plain["tokens"][0]["logprob"] != steered["tokens"][0]["logprob"]


@pytest.mark.parametrize(
    ("attention", "param"),
    [
        ({"exclude": [{"start": 0, "end": 10}, {"start": 5, "end": 20}]}, "attention.exclude[1]"),
        ({"exclude": [{"start": 0, "end": 500}]}, "attention.exclude[0]"),
        ({"exclude": [{"start": 30, "end": 45}]}, "attention.exclude[0]"),  # includes the last token
        (
            {"exclude": [{"start": 0, "end": 3}], "emphasis": {"spans": [{"start": 1, "end": 2}]}},
            "attention.emphasis.spans[0]",
        ),
        ({"exclude": [{"start": 0, "end": 3, "message": 0}]}, "attention.exclude[0]"),
    ],
)
def test_bad_spans_are_400_naming_the_span(client: TestClient, attention: dict[str, Any], param: str) -> None:
    prompt = PREFIX + QUESTION  # 45 characters
    r = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 2, "attention": attention})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_chat_spans_refer_to_message_content(client: TestClient) -> None:
    messages = [{"role": "system", "content": "the dog sees the red ball."}, {"role": "user", "content": "the cat"}]
    r = client.post(
        "/v1/masks",
        json={
            "endpoint": "generate",
            "request": {"messages": messages, "attention": {"exclude": [{"start": 4, "end": 7, "message": 0}]}},
        },
    )
    assert r.status_code == 200, r.text
    report = r.json()
    (span,) = report["attention"]["constraints"]["exclude"]
    covered = "".join(t["text"] for t in report["tokens"][span[0] : span[1]])
    assert covered.strip() == "dog"


def test_dry_run_reports_every_mask_exactly(client: TestClient) -> None:
    prompt = "the dog sees the red ball."
    r = client.post(
        "/v1/masks",
        json={
            "endpoint": "generate",
            "request": {"prompt": prompt, "attention": {"exclude": [{"start": 4, "end": 8}]}, "bad_words": ["cat"]},
            "dense": True,
        },
    )
    assert r.status_code == 200, r.text
    report = r.json()
    tokens = report["tokens"]
    assert "".join(t["text"] for t in tokens) == prompt
    assert all(prompt[t["start"] : t["end"]] == t["text"] for t in tokens)
    (span,) = report["attention"]["constraints"]["exclude"]
    s, e = span
    n = len(tokens)
    for q, ranges in enumerate(report["attention"]["rows"]):
        allowed = {k for a, b in ranges for k in range(a, b)}
        expected = set(range(q + 1)) if s <= q < e else {k for k in range(q + 1) if not s <= k < e}
        assert allowed == expected, q
    assert report["attention"]["dense"][n - 1] == [0 if s <= k < e else 1 for k in range(n)]
    assert report["attention"]["decode_keys"] == [[0, s], [e, n]]
    assert report["output"] == {"kinds": ["bad_words"], "steps": None}


def test_return_masks_records_output_steps_and_is_kept(client: TestClient) -> None:
    data = generate(client, PREFIX, return_masks=True, allowed_words=["the", " the", " dog"])
    steps = data["masks"]["output"]["steps"]
    assert len(steps) == len(data["tokens"])
    assert all(step["allowed"] >= 1 for step in steps)
    kept = client.get(f"/v1/masks/{data['id']}")
    assert kept.status_code == 200
    assert kept.json()["output"]["steps"] == steps
    png = client.get(f"/v1/masks/{data['id']}?format=png")
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    missing = client.get("/v1/masks/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "request_id"


def test_dry_run_rejects_a_bad_inner_request(client: TestClient) -> None:
    r = client.post("/v1/masks", json={"endpoint": "generate", "request": {"prompt": "x", "max_new_tokens": 0}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "request.max_new_tokens"


def test_fill_mask_masks(bert_settings: Settings, tiny_bert: LoadedModel) -> None:
    with TestClient(create_app(bert_settings, loaded=tiny_bert)) as c:
        r = c.post("/v1/masks", json={"endpoint": "fill-mask", "request": {"inputs": "the dog [MASK] the red ball."}})
        assert r.status_code == 200, r.text
        report = r.json()
        (masked,) = report["input"]["masked"]
        assert report["tokens"][masked["index"]]["text"] == "[MASK]"
        n = len(report["tokens"])
        assert report["attention"]["type"] == "bidirectional"
        assert report["attention"]["rows"] == [[[0, n]]] * n
        answered = c.post("/v1/fill-mask", json={"inputs": "the dog [MASK] the red ball.", "return_masks": True})
        assert answered.status_code == 200
        assert set(answered.json()) == {"id", "results", "masks"}
        assert answered.json()["id"] == answered.headers["x-masks-id"]
        assert answered.json()["masks"]["input"] == report["input"]
        png = c.post("/v1/masks?format=png", json={"endpoint": "fill-mask", "request": {"inputs": "a [MASK]."}})
        assert png.headers["content-type"] == "image/png"


def test_openai_routes_take_attention_as_an_extra_field(client: TestClient, tiny_llama: LoadedModel) -> None:
    start = len(PREFIX)
    outs = []
    for span in (SPAN_A, SPAN_B):
        body = {
            "model": tiny_llama.name,
            "prompt": PREFIX + span + QUESTION,
            "max_tokens": 6,
            "temperature": 0,
            "attention": {"exclude": [{"start": start, "end": start + len(span)}]},
        }
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        outs.append(r.json()["choices"][0]["text"])
    assert outs[0] == outs[1]
    chat = {
        "model": tiny_llama.name,
        "messages": [{"role": "user", "content": PREFIX + SPAN_A}],
        "max_tokens": 3,
        "attention": {"exclude": [{"start": 0, "end": 999, "message": 0}]},
    }
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "attention.exclude[0]"
    ids = client.post(
        "/v1/completions",
        json={"model": tiny_llama.name, "prompt": [5, 6, 7], "attention": {"exclude": [{"start": 0, "end": 1}]}},
    )
    assert ids.status_code == 400
    assert ids.json()["error"]["param"] == "attention"


def test_emphasis_layers_and_heads_are_validated_and_counted(client: TestClient, tiny_llama: LoadedModel) -> None:
    n_layers, n_heads = tiny_llama.attention_dims
    prompt = PREFIX + QUESTION
    span = [{"start": 0, "end": 10}]
    for emphasis, param in (
        ({"spans": span, "layers": [n_layers]}, "attention.emphasis.layers[0]"),
        ({"spans": span, "heads": [0, n_heads]}, "attention.emphasis.heads[1]"),
    ):
        r = client.post("/v1/generate", json={"prompt": prompt, "attention": {"emphasis": emphasis}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param

    def count(kind: str) -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith(f'maskserve_masks_applied_total{{kind="{kind}"}}'):
                return float(line.split()[-1])
        return 0.0

    before = count("attention_emphasis")
    one_layer = generate(client, prompt, attention={"emphasis": {"spans": span, "factor": 20, "layers": [1]}})
    assert count("attention_emphasis") == before + 1
    every = generate(client, prompt, attention={"emphasis": {"spans": span, "factor": 20}})
    assert one_layer["tokens"][0]["logprob"] != every["tokens"][0]["logprob"]


def test_dry_run_attention_weights_of_a_prompt(client: TestClient) -> None:
    prompt = PREFIX + SPAN_A + QUESTION
    start, end = len(PREFIX), len(PREFIX + SPAN_A)
    body = {
        "endpoint": "generate",
        "request": {"prompt": prompt, "attention": {"exclude": [{"start": start, "end": end}]}},
        "attention_weights": True,
        "attention_layer": 1,
    }
    r = client.post("/v1/masks", json=body)
    assert r.status_code == 200, r.text
    report = r.json()
    s, e = report["attention"]["constraints"]["exclude"][0]
    values = report["attention_weights"]["values"]
    for q, row in enumerate(values):
        assert sum(row) == pytest.approx(1.0, abs=1e-3)
        assert all(w == 0.0 for w in row[q + 1 :]), q  # causal: nothing from the future
        if q >= e:
            assert all(row[k] == 0.0 for k in range(s, e)), q
    png = client.post("/v1/masks?format=png&picture=weights", json=body)
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"


def test_metrics_and_reports_name_the_same_mask_kinds(client: TestClient) -> None:
    def count(kind: str) -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith(f'maskserve_masks_applied_total{{kind="{kind}"}}'):
                return float(line.split()[-1])
        return 0.0

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    kinds = ("json_schema", "bad_words", "attention_exclude")
    before = {k: count(k) for k in kinds}
    span = [{"start": 0, "end": len(PREFIX)}]
    data = generate(client, PREFIX + QUESTION, return_masks=True, json_schema=schema, bad_words=["zz"],
                    attention={"exclude": span}, max_new_tokens=4)  # fmt: skip
    assert set(data["masks"]["output"]["kinds"]) == {"json_schema", "bad_words"}
    assert data["masks"]["attention"]["constraints"]["exclude"] != []
    assert {k: count(k) - before[k] for k in kinds} == dict.fromkeys(kinds, 1.0)
