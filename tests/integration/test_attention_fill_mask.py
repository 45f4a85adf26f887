"""Attention constraints on fill-mask, emphasis on chosen layers/heads and attention-weight pictures over HTTP.

The proofs, on the tiny BERT (an encoder) and the tiny Llama with an MNTP adapter (a decoder read
bidirectionally): an excluded span has no influence on the scores; an empty constraint is bit-identical to
none; isolated segments with restarted positions make their order irrelevant — also when a mask is widened
to several sub-tokens (targets, whole words), which moves the spans after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.engine.loading import LoadedModel
from tests.integration.attention_texts import PREFIX, SPAN_A, SPAN_B, isolate_two

URL = "/v1/fill-mask"
MASKED = " the [MASK] visits the old house."

PARAMETERS: list[dict[str, Any]] = [
    {"top_k": 5},
    {"targets": ["teacher", "bark", "dog"]},  # "bark" is 3 sub-tokens: the mask is widened
    {"whole_word": True, "max_word_tokens": 3, "top_k": 4},
]


@pytest.fixture(scope="module", params=["bert", "mntp"])
def model_client(request: pytest.FixtureRequest) -> Iterator[tuple[TestClient, LoadedModel]]:
    settings: Settings = request.getfixturevalue(f"{request.param}_settings")
    loaded: LoadedModel = request.getfixturevalue(f"tiny_{request.param}")
    with TestClient(create_app(settings, loaded=loaded)) as c:
        yield c, loaded


def fill(client: TestClient, text: str, **extra: Any) -> Any:
    r = client.post(URL, json={"inputs": text, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def scores(answer: Any) -> list[tuple[str, float]]:
    return [(c["token_str"], c["score"]) for c in answer]


def n_tokens(model: LoadedModel, text: str) -> int:
    return len(model.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("parameters", PARAMETERS)
def test_excluded_span_has_no_influence(model_client: tuple[TestClient, LoadedModel], parameters: dict) -> None:
    client, model = model_client
    assert n_tokens(model, SPAN_A) == n_tokens(model, SPAN_B)
    outs, plain = [], []
    for span in (SPAN_A, SPAN_B):
        # the span both before and after the mask: widening the mask must move the second one
        text = PREFIX + span + MASKED + span
        first = len(PREFIX)
        second = len(PREFIX + span + MASKED)
        att = {"exclude": [{"start": first, "end": first + len(span)}, {"start": second, "end": len(text)}]}
        outs.append(fill(client, text, parameters=parameters, attention=att))
        plain.append(fill(client, text, parameters=parameters))
    assert [w for w, _ in scores(outs[0])] == [w for w, _ in scores(outs[1])]
    assert [s for _, s in scores(outs[0])] == pytest.approx([s for _, s in scores(outs[1])], abs=1e-6, rel=1e-4)
    assert [s for _, s in scores(plain[0])] != pytest.approx([s for _, s in scores(plain[1])], abs=1e-6, rel=1e-4)


def test_empty_constraint_is_bit_identical_to_none(model_client: tuple[TestClient, LoadedModel]) -> None:
    client, _ = model_client
    text = PREFIX + SPAN_A + MASKED
    for parameters in PARAMETERS:
        assert fill(client, text, parameters=parameters) == fill(client, text, parameters=parameters, attention={})


@pytest.mark.parametrize("parameters", PARAMETERS[:2])
def test_isolated_segments_with_restarts_make_order_irrelevant(
    model_client: tuple[TestClient, LoadedModel], parameters: dict
) -> None:
    check_isolated_segments_order_irrelevant(model_client, parameters, score_tolerance=1e-6)


def check_isolated_segments_order_irrelevant(
    model_client: tuple[TestClient, LoadedModel], parameters: dict, *, score_tolerance: float
) -> None:
    """``score_tolerance``: absolute, on scores (the int8 path states its own, test_precision.py)."""
    client, _ = model_client
    outs = []
    for first, second in ((SPAN_A, SPAN_B), (SPAN_B, SPAN_A)):
        att = isolate_two(first, second)
        outs.append(fill(client, PREFIX + first + second + MASKED, parameters=parameters, attention=att))
    assert [w for w, _ in scores(outs[0])] == [w for w, _ in scores(outs[1])]
    assert [s for _, s in scores(outs[0])] == pytest.approx(
        [s for _, s in scores(outs[1])], abs=score_tolerance, rel=1e-4
    )


def test_emphasis_on_every_layer_equals_emphasis_on_all(model_client: tuple[TestClient, LoadedModel]) -> None:
    """Naming every layer and head takes the steering path (a bias added inside each layer); it must equal
    the bias carried in the shared mask. One layer only is a different steer."""
    client, model = model_client
    n_layers, n_heads = model.attention_dims
    text = PREFIX + SPAN_A + MASKED
    span = [{"start": 0, "end": len(PREFIX)}]
    everywhere = fill(client, text, attention={"emphasis": {"spans": span, "factor": 20}})
    named = fill(
        client,
        text,
        attention={
            "emphasis": {"spans": span, "factor": 20, "layers": list(range(n_layers)), "heads": list(range(n_heads))}
        },  # fmt: skip
    )
    one = fill(client, text, attention={"emphasis": {"spans": span, "factor": 20, "layers": [n_layers - 1]}})
    plain = fill(client, text)
    assert [w for w, _ in scores(named)] == [w for w, _ in scores(everywhere)]
    assert [s for _, s in scores(named)] == pytest.approx([s for _, s in scores(everywhere)], abs=1e-6, rel=1e-4)
    assert scores(one)[0][1] != pytest.approx(scores(everywhere)[0][1], rel=1e-4)
    assert scores(one)[0][1] != pytest.approx(scores(plain)[0][1], rel=1e-4)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"inputs": PREFIX + MASKED, "attention": {"exclude": [{"start": 27, "end": 40}]}}, "attention.exclude[0]"),
        ({"inputs": [PREFIX + MASKED], "attention": {"exclude": [{"start": 0, "end": 5}]}}, "attention"),
        ({"inputs": PREFIX + MASKED, "attention": {"exclude": [{"start": 0, "end": 999}]}}, "attention.exclude[0]"),
        (
            {"inputs": PREFIX + MASKED, "attention": {"emphasis": {"spans": [{"start": 0, "end": 5}], "layers": [9]}}},
            "attention.emphasis.layers[0]",
        ),
        (
            {"inputs": PREFIX + MASKED, "attention": {"emphasis": {"spans": [{"start": 0, "end": 5}], "heads": [-1]}}},
            "attention.emphasis.heads[0]",
        ),
    ],
)
def test_bad_constraints_are_400_naming_the_span(
    model_client: tuple[TestClient, LoadedModel], body: dict[str, Any], param: str
) -> None:
    client, _ = model_client
    r = client.post(URL, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_report_shows_the_constrained_structure(model_client: tuple[TestClient, LoadedModel]) -> None:
    client, _ = model_client
    text = PREFIX + SPAN_A + MASKED
    start, end = len(PREFIX), len(PREFIX + SPAN_A)
    r = client.post(
        "/v1/masks",
        json={
            "endpoint": "fill-mask",
            "request": {"inputs": text, "attention": {"exclude": [{"start": start, "end": end}]}},
        },
    )
    assert r.status_code == 200, r.text
    report = r.json()
    tokens = report["tokens"]
    (masked,) = report["input"]["masked"]
    assert text[tokens[masked["index"]]["start"] : tokens[masked["index"]]["end"]] == "[MASK]"
    for t in tokens:  # every other real token's offsets point at its own text in the client's input
        if t["end"] > t["start"] and t["index"] != masked["index"]:
            assert text[t["start"] : t["end"]].lower().strip() == t["text"].replace("##", "").lower().strip()
    (span,) = report["attention"]["constraints"]["exclude"]
    s, e = span
    assert "".join(tokens[i]["text"] for i in range(s, e)).replace(" ", "") == SPAN_A.replace(" ", "")
    n = len(tokens)
    for q, ranges in enumerate(report["attention"]["rows"]):
        allowed = {k for a, b in ranges for k in range(a, b)}
        expected = set(range(n)) if s <= q < e else {k for k in range(n) if not s <= k < e}
        assert allowed == expected, q


def test_attention_weights_respect_the_mask(model_client: tuple[TestClient, LoadedModel]) -> None:
    client, model = model_client
    text = PREFIX + SPAN_A + MASKED
    start, end = len(PREFIX), len(PREFIX + SPAN_A)
    request = {"inputs": text, "attention": {"exclude": [{"start": start, "end": end}]}}
    r = client.post("/v1/masks", json={"endpoint": "fill-mask", "request": request, "attention_weights": True})
    assert r.status_code == 200, r.text
    report = r.json()
    weights = report["attention_weights"]
    assert weights["layer"] is None
    assert weights["heads"] == "mean"
    s, e = report["attention"]["constraints"]["exclude"][0]
    for q, row in enumerate(weights["values"]):
        assert sum(row) == pytest.approx(1.0, abs=1e-3)
        if not s <= q < e:
            assert all(row[k] == 0.0 for k in range(s, e)), q  # no weight on an excluded key
    last = client.post(
        "/v1/masks",
        json={"endpoint": "fill-mask", "request": request, "attention_weights": True, "attention_layer": 0},
    )
    assert last.json()["attention_weights"]["layer"] == 0
    assert last.json()["attention_weights"]["values"] != weights["values"]
    png = client.post(
        "/v1/masks?format=png&picture=weights",
        json={"endpoint": "fill-mask", "request": request, "attention_weights": True},
    )
    assert png.status_code == 200
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    no_weights = client.post("/v1/masks?format=png&picture=weights", json={"endpoint": "fill-mask", "request": request})
    assert no_weights.status_code == 400
    assert no_weights.json()["error"]["param"] == "picture"
    bad_layer = client.post(
        "/v1/masks",
        json={"endpoint": "fill-mask", "request": request, "attention_weights": True, "attention_layer": 99},
    )
    assert bad_layer.status_code == 400
    assert bad_layer.json()["error"]["param"] == "attention_layer"


def test_attention_kinds_are_counted(model_client: tuple[TestClient, LoadedModel]) -> None:
    client, _ = model_client

    def count() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith('maskserve_masks_applied_total{kind="attention_exclude"}'):
                return float(line.split()[-1])
        return 0.0

    before = count()
    fill(client, PREFIX + SPAN_A + MASKED, attention={"exclude": [{"start": 0, "end": 5}]})
    assert count() == before + 1


def test_reports_of_emphasis_on_chosen_layers(model_client: tuple[TestClient, LoadedModel]) -> None:
    """return_masks, the dry run, the buffer and the weights all take a scoped emphasis."""
    client, _ = model_client
    text = PREFIX + SPAN_A + MASKED
    request = {"inputs": text, "attention": {"emphasis": {"spans": [{"start": 0, "end": 10}], "layers": [1]}}}
    answered = client.post(URL, json={**request, "return_masks": True})
    assert answered.status_code == 200, answered.text
    masks = answered.json()["masks"]
    assert masks["attention"]["constraints"]["emphasis_layers"] == [1]
    (span,) = masks["attention"]["constraints"]["emphasis"]
    assert masks["attention"]["key_bias"][span[0]] == 0.0  # an emphasized key
    assert masks["attention"]["key_bias"][span[1]] == pytest.approx(-math.log(3.0))  # the default factor
    kept = client.get(f"/v1/masks/{answered.json()['id']}")
    assert kept.status_code == 200
    assert kept.json()["attention"] == masks["attention"]
    dry = client.post("/v1/masks", json={"endpoint": "fill-mask", "request": request, "attention_weights": True})
    assert dry.status_code == 200, dry.text
    lonely = client.post("/v1/masks", json={"endpoint": "fill-mask", "request": request, "attention_layer": 0})
    assert lonely.status_code == 400
    assert lonely.json()["error"]["param"] == "attention_layer"
