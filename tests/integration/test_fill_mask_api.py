"""POST /v1/fill-mask over HTTP on the tiny models: every response shape and every error, as exact JSON."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import PythonBackend, TokenizersBackend, pipeline

from service.app import create_app
from service.config import Settings
from service.engine.loading import LoadedModel
from tests.tiny import token_id, token_ids

URL = "/v1/fill-mask"


def assert_same(actual: Any, expected: Any, path: str = "") -> None:
    """Equal JSON, except that "score" values need only agree to 1e-6."""
    assert type(actual) is type(expected), path
    if isinstance(expected, dict):
        assert list(actual) == list(expected), path
        for key, value in expected.items():
            if key == "score":
                assert actual[key] == pytest.approx(value, abs=1e-6), f"{path}.score"
            else:
                assert_same(actual[key], value, f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, path


def error(message: str, param: str | None, code: str | None = None, kind: str = "invalid_request_error") -> Any:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@pytest.fixture(scope="module")
def bert(bert_settings: Settings, tiny_bert: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(bert_settings, loaded=tiny_bert)) as client:
        yield client


@pytest.fixture(scope="module")
def mntp(mntp_settings: Settings, tiny_mntp: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(mntp_settings, loaded=tiny_mntp)) as client:
        yield client


@pytest.fixture(scope="module")
def expected_one(tiny_bert: LoadedModel) -> list[dict[str, Any]]:
    """transformers' pipeline on the same model, without the special tokens we never propose."""
    assert tiny_bert.fill_mask_model is not None
    # LoadedModel holds the tokenizer as the common base class; pipeline() is annotated with its two subclasses
    tokenizer = cast(PythonBackend | TokenizersBackend, tiny_bert.tokenizer)
    pipe = pipeline("fill-mask", model=tiny_bert.fill_mask_model, tokenizer=tokenizer)
    specials = set(tiny_bert.tokenizer.all_special_ids)
    rows = [r for r in pipe("The [MASK] sees the red ball.", top_k=20) if r["token"] not in specials]
    return [
        {"sequence": r["sequence"], "score": r["score"], "token": r["token"], "token_str": r["token_str"]} for r in rows
    ]


# --- shapes ------------------------------------------------------------------------------------------------


def test_one_input_one_mask_is_the_pipeline_answer(bert: TestClient, expected_one: list[dict[str, Any]]) -> None:
    response = bert.post(URL, json={"inputs": "The [MASK] sees the red ball."})
    assert response.status_code == 200
    assert_same(response.json(), expected_one[:5])  # top_k defaults to 5
    response = bert.post(URL, json={"inputs": "The [MASK] sees the red ball.", "parameters": {"top_k": 2}})
    assert_same(response.json(), expected_one[:2])


def test_several_masks_give_one_list_per_mask(bert: TestClient, tiny_bert: LoadedModel) -> None:
    response = bert.post(URL, json={"inputs": "The [MASK] sees [MASK] red ball.", "parameters": {"top_k": 2}})
    assert response.status_code == 200
    body = response.json()
    with torch.inference_mode():
        ids = tiny_bert.tokenizer("The [MASK] sees [MASK] red ball.", return_tensors="pt")
        probs = tiny_bert.fill_mask_model(**ids).logits[0].softmax(-1)  # type: ignore[misc]
    tok = tiny_bert.tokenizer

    def cand(position: int, token: str, sequence: str) -> dict[str, Any]:
        found = token_id(tok, token)
        return {"sequence": sequence, "score": float(probs[position, found]), "token": found, "token_str": token}

    assert_same(
        body,
        [
            [cand(2, "##f", "thef sees [MASK] red ball."), cand(2, "##u", "theu sees [MASK] red ball.")],
            [cand(4, "##n", "the [MASK] seesn red ball."), cand(4, "c", "the [MASK] sees c red ball.")],
        ],
    )


def test_a_list_of_inputs_gives_one_entry_per_input(bert: TestClient) -> None:
    texts = ["The [MASK] sees the red ball.", "The [MASK] sees [MASK] red ball.", "paris is the [MASK] of france."]
    response = bert.post(URL, json={"inputs": texts, "parameters": {"top_k": 3}})
    assert response.status_code == 200
    body = response.json()
    singles = [bert.post(URL, json={"inputs": t, "parameters": {"top_k": 3}}).json() for t in texts]
    assert_same(body, singles)
    assert [len(entry) for entry in body] == [3, 2, 3]  # a list per single-mask input, a list of lists else
    one = bert.post(URL, json={"inputs": texts[:1], "parameters": {"top_k": 3}}).json()
    assert_same(one, singles[:1])  # a list of one stays a list of one


def test_targets_multi_token_scored_jointly(bert: TestClient, tiny_bert: LoadedModel) -> None:
    response = bert.post(
        URL, json={"inputs": "The [MASK] sees the red ball.", "parameters": {"targets": ["barked", "dog"]}}
    )
    assert response.status_code == 200
    body = response.json()
    tok = tiny_bert.tokenizer
    pieces = token_ids(tok, ["b", "##ar", "##k", "##ed"])
    base = tok("The [MASK] sees the red ball.")["input_ids"]
    logp = 0.0
    with torch.inference_mode():
        for j, piece in enumerate(pieces):  # the chain rule, left to right, over 4 masks
            row = base[:2] + pieces[:j] + [tok.mask_token_id] * (4 - j) + base[3:]
            logits = tiny_bert.fill_mask_model(input_ids=torch.tensor([row])).logits[0, 2 + j]  # type: ignore[misc]
            logp += float(logits.log_softmax(-1)[piece])
        dog_id = token_id(tok, "dog")
        p_dog = float(tiny_bert.fill_mask_model(input_ids=torch.tensor([base])).logits[0, 2].softmax(-1)[dog_id])  # type: ignore[misc]
    barked = {
        "sequence": "the barked sees the red ball.",
        "score": math.exp(logp),
        "token": pieces[0],
        "token_str": "barked",
        "tokens": pieces,
    }
    dog = {"sequence": "the dog sees the red ball.", "score": p_dog, "token": dog_id, "token_str": "dog"}
    assert_same(body, sorted([barked, dog], key=lambda c: -c["score"]))
    # a single string is one target (as the pipeline allows); top_k caps the answer
    one = bert.post(URL, json={"inputs": "The [MASK] sees the red ball.", "parameters": {"targets": "dog"}}).json()
    assert_same(one, [dog])
    capped = bert.post(
        URL,
        json={
            "inputs": "The [MASK] sees the red ball.",
            "parameters": {"targets": ["dog", "barked", "dog"], "top_k": 1},
        },
    ).json()
    assert len(capped) == 1


def test_whole_word(bert: TestClient) -> None:
    body = bert.post(
        URL,
        json={
            "inputs": "[MASK] is the largest planet.",
            "parameters": {"whole_word": True, "max_word_tokens": 3, "top_k": 4},
        },
    ).json()
    assert len(body) == 4
    assert [c["score"] for c in body] == sorted((c["score"] for c in body), reverse=True)
    for c in body:
        assert set(c) <= {"sequence", "score", "token", "token_str", "tokens"}
        assert c["sequence"] == f"{c['token_str']} is the largest planet."
        assert ("tokens" in c) == (len(c.get("tokens", [c["token"]])) > 1)
        if "tokens" in c:
            assert c["tokens"][0] == c["token"]
            assert 2 <= len(c["tokens"]) <= 3


def test_mntp_accepts_mask_and_its_own_token(mntp: TestClient) -> None:
    a = mntp.post(URL, json={"inputs": "The [MASK] barked."})
    b = mntp.post(URL, json={"inputs": "The <mask> barked."})
    assert a.status_code == b.status_code == 200
    assert a.json() == b.json()
    assert len(a.json()) == 5
    for c in a.json():
        assert c["sequence"] == f"The{c['token_str']} barked."  # the fill carries its own leading space
    ww = mntp.post(URL, json={"inputs": "[MASK] is the largest planet.", "parameters": {"whole_word": True}})
    assert ww.status_code == 200
    assert len(ww.json()) == 5


def test_parameters_null_and_options_are_accepted(bert: TestClient, expected_one: list[dict[str, Any]]) -> None:
    body = {"inputs": "The [MASK] sees the red ball.", "parameters": None, "options": {"wait_for_model": True}}
    response = bert.post(URL, json=body)
    assert response.status_code == 200
    assert_same(response.json(), expected_one[:5])


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (
            {"inputs": "no mask here"},
            400,
            error("'inputs' has no mask; write [MASK] where the word to predict goes", "inputs"),
        ),
        ({"inputs": ""}, 400, error("'inputs' is empty; write [MASK] where the word to predict goes", "inputs")),
        (
            {"inputs": ["the [MASK] sees.", "   "]},
            400,
            error("'inputs[1]' is empty; write [MASK] where the word to predict goes", "inputs[1]"),
        ),
        (
            {"inputs": "[MASK] " * 9},
            400,
            error("'inputs' has 9 masks; at most 8 are allowed (MASKSERVE_MAX_MASKS_PER_INPUT)", "inputs"),
        ),
        (
            {"inputs": "[MASK]" + " a" * 130},
            400,
            error("'inputs' is 133 tokens long; the model takes at most 128", "inputs"),
        ),
        (
            {"inputs": "[MASK]" + " a" * 124, "parameters": {"whole_word": True}},
            400,
            error("'inputs' is 127 tokens; widening a mask to 4 sub-tokens would exceed the model's 128", "inputs"),
        ),
        ({"inputs": 5}, 422, error("'inputs': must be a string or a list of strings", "inputs", "inputs_type")),
        (
            {"inputs": ["a [MASK]", 3]},
            422,
            error("'inputs': must be a string or a list of strings", "inputs", "inputs_type"),
        ),
        ({"inputs": []}, 422, error("'inputs': must not be an empty list", "inputs", "empty_list")),
        ({"parameters": {"top_k": 2}}, 422, error("'inputs' is required", "inputs", "missing")),
        (
            {"inputs": "[MASK]", "parameters": {"top_k": 0}},
            400,
            error("'parameters.top_k' must be between 1 and 100 (MASKSERVE_MAX_TOP_K); got 0", "parameters.top_k"),
        ),
        (
            {"inputs": "[MASK]", "parameters": {"top_k": 101}},
            400,
            error("'parameters.top_k' must be between 1 and 100 (MASKSERVE_MAX_TOP_K); got 101", "parameters.top_k"),
        ),
        (
            {"inputs": "[MASK]", "parameters": {"top_k": "many"}},
            422,
            error(
                "'parameters.top_k': Input should be a valid integer, unable to parse string as an integer",
                "parameters.top_k",
                "int_parsing",
            ),
        ),
        (
            {"inputs": "[MASK]", "parameters": {"targets": []}},
            400,
            error("'parameters.targets' is empty; give at least one word, or leave it out", "parameters.targets"),
        ),
        (
            {"inputs": "[MASK]", "parameters": {"targets": ["dog"] * 101}},
            400,
            error("'parameters.targets' has 101 words; at most 100 (MASKSERVE_MAX_TARGETS)", "parameters.targets"),
        ),
        (
            {"inputs": "[MASK]", "parameters": {"targets": ["dog", "new york"]}},
            400,
            error("'parameters.targets[1]': target 'new york' is not a single word", "parameters.targets[1]"),
        ),
        (
            {"inputs": "[MASK]", "parameters": {"targets": ["[SEP]"]}},
            400,
            error(
                "'parameters.targets[0]': target '[SEP]' cannot be written with the model's vocabulary",
                "parameters.targets[0]",
            ),
        ),
        (
            {"inputs": "[MASK]", "parameters": {"targets": ["unbelievablyunbelievably"]}},
            400,
            error(
                "'parameters.targets[0]': target 'unbelievablyunbelievably' is 12 sub-tokens; at most 4 "
                "(MASKSERVE_MAX_WORD_TOKENS)",
                "parameters.targets[0]",
            ),
        ),
        (
            {"inputs": "[MASK]", "parameters": {"targets": ["dog"], "whole_word": True}},
            400,
            error(
                "'parameters.whole_word' and 'parameters.targets' exclude each other: targets are already scored "
                "as whole words; drop one of them",
                "parameters.whole_word",
            ),
        ),
        (
            {"inputs": "[MASK]", "parameters": {"whole_word": True, "max_word_tokens": 9}},
            400,
            error(
                "'parameters.max_word_tokens' must be between 1 and 4 (MASKSERVE_MAX_WORD_TOKENS); got 9",
                "parameters.max_word_tokens",
            ),
        ),
        (
            {"inputs": "[MASK]", "parameters": {"top-k": 3}},
            422,
            error("'parameters.top-k': Extra inputs are not permitted", "parameters.top-k", "extra_forbidden"),
        ),
    ],
)
def test_errors(bert: TestClient, body: dict[str, Any], status: int, expected: Any) -> None:
    response = bert.post(URL, json=body)
    assert (response.status_code, response.json()) == (status, expected)


def test_malformed_json(bert: TestClient) -> None:
    response = bert.post(URL, content=b'{"inputs": "a [MASK]",', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == error(
        "malformed JSON body: Expecting property name enclosed in double quotes", None, "json_invalid"
    )


def test_decoder_without_mntp_adapter_cannot_fill(llama_settings: Settings, tiny_llama: LoadedModel) -> None:
    with TestClient(create_app(llama_settings, loaded=tiny_llama)) as client:
        response = client.post(URL, json={"inputs": "The [MASK] barked."})
    assert response.status_code == 400
    assert response.json() == error(
        "this model cannot fill masks: it is a decoder without an MNTP adapter; start the service with "
        "MASKSERVE_ADAPTER set to an adapter trained by `maskserve finetune --objective mntp`",
        None,
        "unsupported_for_model",
    )


def test_not_ready_is_503(bert_settings: Settings) -> None:
    client = TestClient(create_app(bert_settings))  # no lifespan: nothing loaded
    response = client.post(URL, json={"inputs": "a [MASK]"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json() == error(
        "the model is still loading; retry shortly (see GET /ready)", None, kind="unavailable_error"
    )


def test_queue_full_is_429_and_slow_is_504(bert_settings: Settings, tiny_bert: LoadedModel) -> None:
    settings = bert_settings.model_copy(
        update={"max_batch_size": 1, "max_queued_requests": 0, "request_timeout_s": 0.5}
    )
    app = create_app(settings, loaded=tiny_bert)
    with TestClient(app) as client:
        lock: threading.Lock = app.state.engine.compute_lock
        lock.acquire()  # the device is busy: the first request waits for it
        try:
            results: list[Any] = []
            first = threading.Thread(target=lambda: results.append(client.post(URL, json={"inputs": "a [MASK]"})))
            first.start()
            time.sleep(0.2)
            rejected = client.post(URL, json={"inputs": "the [MASK]"})
            first.join()
        finally:
            lock.release()
        assert rejected.status_code == 429
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json() == error(
            "fill-mask queue is full (1 requests running or waiting); retry shortly",
            None,
            "queue_full",
            "overloaded_error",
        )
        (timed_out,) = results
        assert timed_out.status_code == 504
        assert timed_out.json() == error(
            "fill-mask did not finish within 0.5 s (MASKSERVE_REQUEST_TIMEOUT_S)", None, kind="timeout_error"
        )
        # and it goes on, once the abandoned request's forward (already running when it timed out) is done
        deadline = time.monotonic() + 5
        while (status := client.post(URL, json={"inputs": "a [MASK]"}).status_code) == 429:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status == 200


def test_openapi_has_an_example_per_request_shape(bert: TestClient) -> None:
    spec = bert.get("/openapi.json").json()
    body = spec["paths"]["/v1/fill-mask"]["post"]["requestBody"]["content"]["application/json"]
    assert set(body["examples"]) == {
        "one mask",
        "top_k",
        "several masks",
        "batch",
        "targets",
        "whole word",
        "attention",
    }
    for example in body["examples"].values():  # each example is a valid request
        response = bert.post(URL, json=example["value"])
        assert response.status_code in (200, 400), example  # 400: a word the tiny vocabulary cannot write
