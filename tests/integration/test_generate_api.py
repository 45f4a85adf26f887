"""POST /v1/generate on the tiny Llama: response shape, streaming, seeds, every error path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings, load_settings
from service.engine.generate import GenerationJob
from service.engine.loading import LoadedModel
from service.engine.params import SamplingParams
from service.engine.scheduler import GenerationScheduler
from service.errors import Overloaded, RequestTimeout


@pytest.fixture(scope="module")
def client(llama_settings: Settings, tiny_llama: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(llama_settings, loaded=tiny_llama)) as c:
        yield c


def sse_events(client: TestClient, body: dict[str, object]) -> list[dict[str, Any]]:
    with client.stream("POST", "/v1/generate", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line.removeprefix("data: ")) for line in lines]


def test_generate_response_shape(client: TestClient, tiny_llama: LoadedModel) -> None:
    r = client.post("/v1/generate", json={"prompt": "the dog sees", "max_new_tokens": 4, "top_logprobs": 2})
    assert r.status_code == 200
    data = r.json()
    assert set(data) == {"id", "model", "generated_text", "finish_reason", "tokens", "usage", "seed"}
    assert data["model"] == tiny_llama.name
    assert data["finish_reason"] == "length"
    prompt_tokens = len(tiny_llama.tokenizer("the dog sees")["input_ids"])
    assert data["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 4, "total_tokens": prompt_tokens + 4}
    tokens = data["tokens"]
    assert len(tokens) == 4
    assert "".join(t["text"] for t in tokens) == data["generated_text"]
    for t in tokens:
        assert set(t) == {"id", "text", "logprob", "special", "top_logprobs"}
        assert t["logprob"] <= 0.0
        assert len(t["top_logprobs"]) == 2
        # greedy: the chosen token is the most probable one
        assert t["top_logprobs"][0] == {"id": t["id"], "text": t["text"], "logprob": t["logprob"]}
    without = client.post("/v1/generate", json={"prompt": "the dog sees", "max_new_tokens": 4}).json()
    assert without["generated_text"] == data["generated_text"]
    assert without["tokens"][0]["top_logprobs"] is None


def test_chat_messages_use_the_template(client: TestClient, tiny_llama: LoadedModel) -> None:
    messages = [{"role": "user", "content": "the cat"}]
    r = client.post("/v1/generate", json={"messages": messages, "max_new_tokens": 2})
    assert r.status_code == 200
    text = tiny_llama.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = len(tiny_llama.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert r.json()["usage"]["prompt_tokens"] == expected


def test_seed_reproduces_sampling(client: TestClient) -> None:
    body = {"prompt": "a bird", "max_new_tokens": 8, "temperature": 1.0, "top_p": 0.95, "top_k": 50}
    first = client.post("/v1/generate", json={**body, "seed": 11}).json()
    again = client.post("/v1/generate", json={**body, "seed": 11}).json()
    other = client.post("/v1/generate", json={**body, "seed": 12}).json()
    assert first["seed"] == 11
    assert [t["id"] for t in first["tokens"]] == [t["id"] for t in again["tokens"]]
    assert [t["id"] for t in first["tokens"]] != [t["id"] for t in other["tokens"]]
    unseeded = client.post("/v1/generate", json=body).json()
    replay = client.post("/v1/generate", json={**body, "seed": unseeded["seed"]}).json()
    assert replay["generated_text"] == unseeded["generated_text"]


def test_n_with_a_seed_gives_the_same_choices_twice(client: TestClient) -> None:
    body = {"prompt": "a bird", "max_new_tokens": 8, "temperature": 1.0, "n": 3, "seed": 21}
    first = client.post("/v1/generate", json=body)
    assert first.status_code == 200
    data = first.json()
    assert set(data) == {"id", "model", "choices", "usage"}
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert [c["seed"] for c in data["choices"]] == [21, 22, 23]
    assert client.post("/v1/generate", json=body).json()["choices"] == data["choices"]
    assert len({c["generated_text"] for c in data["choices"]}) > 1
    # sequence i is what a request for one sequence with seed + i says
    one = client.post("/v1/generate", json={**body, "n": 1, "seed": 22}).json()
    assert one["generated_text"] == data["choices"][1]["generated_text"]
    prompt_tokens = one["usage"]["prompt_tokens"]
    completion = sum(len(c["tokens"]) for c in data["choices"])
    assert data["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                             "total_tokens": prompt_tokens + completion}  # fmt: skip
    events = sse_events(client, {**body, "stream": True})
    assert all("choice" in e for e in events)
    finals = {e["choice"]: e for e in events if e["finish_reason"] is not None}
    assert sorted(finals) == [0, 1, 2]
    for c in data["choices"]:
        assert "".join(e["text"] for e in events if e["choice"] == c["index"]) == c["generated_text"]
        assert finals[c["index"]]["seed"] == c["seed"]
    assert "choice" not in sse_events(client, {**body, "n": 1, "stream": True})[0]  # n=1 events keep their shape


def test_penalties_and_no_repeat_ngram_are_accepted(client: TestClient) -> None:
    body = {"prompt": "the dog sees the dog", "max_new_tokens": 12, "return_masks": True}
    plain = client.post("/v1/generate", json=body).json()
    masked = client.post("/v1/generate", json={**body, "no_repeat_ngram_size": 2}).json()
    assert masked["masks"]["output"]["kinds"] == ["no_repeat_ngram"]
    assert len(masked["masks"]["output"]["steps"]) == len(masked["tokens"])
    ids = [t["id"] for t in masked["tokens"]]
    assert len(set(zip(ids, ids[1:], strict=False))) == len(ids) - 1  # no bigram of the output twice
    penalized = client.post("/v1/generate", json={**body, "frequency_penalty": 2.0, "presence_penalty": 2.0})
    assert penalized.status_code == 200
    assert plain["masks"]["output"]["kinds"] == []


def test_stream_events_add_up_to_the_result(client: TestClient) -> None:
    body = {"prompt": "the teacher", "max_new_tokens": 6, "temperature": 1.0, "seed": 3}
    whole = client.post("/v1/generate", json=body).json()
    events = sse_events(client, {**body, "stream": True})
    assert len(events) == 7  # six tokens, then the result
    for i, e in enumerate(events[:-1]):
        assert e["index"] == i
        assert e["token"]["id"] == whole["tokens"][i]["id"]
        assert e["generated_text"] is None
        assert e["finish_reason"] is None
    last = events[-1]
    assert last["token"] is None
    assert last["generated_text"] == whole["generated_text"]
    assert last["finish_reason"] == "length"
    assert last["usage"] == whole["usage"]
    assert "".join(str(e["text"]) for e in events) == whole["generated_text"]


def test_stream_holds_back_a_possible_stop_sequence(client: TestClient) -> None:
    body = {"prompt": "the teacher", "max_new_tokens": 12, "temperature": 1.0, "seed": 3}
    text = client.post("/v1/generate", json=body).json()["generated_text"]
    stop = text[4:7]
    events = sse_events(client, {**body, "stop": [stop], "stream": True})
    last = events[-1]
    assert last["finish_reason"] == "stop_sequence"
    assert last["generated_text"] == text[: text.index(stop)]
    assert "".join(str(e["text"]) for e in events) == last["generated_text"]


def test_stop_sequence_and_min_tokens(client: TestClient) -> None:
    body = {"prompt": "the teacher", "max_new_tokens": 12, "temperature": 1.0, "seed": 3}
    text = client.post("/v1/generate", json=body).json()["generated_text"]
    r = client.post("/v1/generate", json={**body, "stop": [text[2:4]]}).json()
    assert r["finish_reason"] == "stop_sequence"
    assert r["generated_text"] == text[:2]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({}, 400, "prompt"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "the " * 300}, 400, "prompt"),
        ({"messages": []}, 422, "messages"),
        ({"messages": [{"role": "robot", "content": "b"}]}, 422, "messages.0.role"),
        ({"prompt": "a", "max_new_tokens": 0}, 422, "max_new_tokens"),
        ({"prompt": "a", "max_new_tokens": 5000}, 400, "max_new_tokens"),
        ({"prompt": "a", "max_new_tokens": 256}, 400, "max_new_tokens"),  # past the tiny model's 256 positions
        ({"prompt": "a", "temperature": -1}, 422, "temperature"),
        ({"prompt": "a", "top_p": 0}, 422, "top_p"),
        ({"prompt": "a", "top_logprobs": 21}, 422, "top_logprobs"),
        ({"prompt": "a", "unknown": 1}, 422, "unknown"),
        ({"prompt": "a", "min_tokens": 9, "max_new_tokens": 4}, 400, "min_tokens"),
        ({"prompt": "a", "bad_words": [""]}, 422, "bad_words.0"),
        ({"prompt": "a", "allowed_token_ids": []}, 422, "allowed_token_ids"),
        ({"prompt": "a", "allowed_token_ids": [5, 100000]}, 400, "allowed_token_ids[1]"),
        ({"prompt": "a", "allowed_words": ["the"], "bad_words": ["t", "h", "e"]}, 400, "allowed_words"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias.x"),
        ({"prompt": "a", "logit_bias": {"5": 101}}, 400, "logit_bias.5"),
        ({"prompt": "a", "logit_bias": {"100000": 1}}, 400, "logit_bias.100000"),
        ({"prompt": "a", "regex": "(ab"}, 400, "regex"),
        ({"prompt": "a", "regex": ""}, 400, "regex"),
        ({"prompt": "a", "json_schema": {"type": "nope"}}, 400, "json_schema"),
        ({"prompt": "a", "choice": ["dog", "hotdog"], "bad_words": ["dog"]}, 400, "choice"),
        ({"prompt": "a", "choice": ["a"], "regex": "a"}, 400, "regex"),
        ({"prompt": "a", "stop": ["x"] * 9}, 422, "stop"),
        ({"prompt": "a", "n": 0}, 422, "n"),
        ({"prompt": "a", "n": 9}, 400, "n"),  # MASKSERVE_MAX_N is 8
        ({"prompt": "a", "frequency_penalty": 2.5}, 422, "frequency_penalty"),
        ({"prompt": "a", "repetition_penalty": 2.7e-90}, 422, "repetition_penalty"),  # once overflowed the logits
        ({"prompt": "a", "no_repeat_ngram_size": -1}, 422, "no_repeat_ngram_size"),
    ],
)
def test_invalid_requests_name_the_param(client: TestClient, body: dict[str, object], status: int, param: str) -> None:
    r = client.post("/v1/generate", json=body)
    assert r.status_code == status, r.json()
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_encoder_model_cannot_generate(bert_settings: Settings, tiny_bert: LoadedModel) -> None:
    with TestClient(create_app(bert_settings, loaded=tiny_bert)) as client:
        r = client.post("/v1/generate", json={"prompt": "a"})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "unsupported_for_model"


def test_timeout_is_504(tiny_llama_dir: object, tiny_llama: LoadedModel) -> None:
    settings = load_settings(model=str(tiny_llama_dir), adapter="none", request_timeout_s=0.01)
    with TestClient(create_app(settings, loaded=tiny_llama)) as client:
        r = client.post("/v1/generate", json={"prompt": "a", "max_new_tokens": 240})
        assert r.status_code == 504
        assert r.json()["error"]["type"] == "timeout_error"
        # the slot was freed: the scheduler is idle again
        assert client.app.state.engine.generation.stats() == {"running": 0, "waiting": 0, "active": 0}  # type: ignore[attr-defined]


def test_full_queue_is_429_with_retry_after(tiny_llama_dir: object, tiny_llama: LoadedModel) -> None:
    settings = load_settings(model=str(tiny_llama_dir), adapter="none", max_running_requests=1, max_queued_requests=1)

    async def run() -> None:
        import threading

        scheduler = GenerationScheduler(tiny_llama, settings, threading.Lock())
        job = GenerationJob([5, 6, 7], SamplingParams(max_new_tokens=3))
        # Not started: nothing runs, so two requests fill the one slot and the one queue place.
        first, second = await scheduler.submit(job), await scheduler.submit(job)
        with pytest.raises(Overloaded) as err:
            await scheduler.submit(job)
        # two requests ahead, one slot, ~1 s a request until measured: retry in 2 s
        assert err.value.headers() == {"Retry-After": "2"}
        scheduler.start()
        assert (await first.result()).completion_tokens == 3
        assert (await second.result()).completion_tokens == 3
        assert (await (await scheduler.submit(job)).result()).completion_tokens == 3
        await scheduler.stop()

    asyncio.run(run())


def test_waiting_request_times_out(tiny_llama_dir: object, tiny_llama: LoadedModel) -> None:
    settings = load_settings(model=str(tiny_llama_dir), adapter="none", request_timeout_s=0.05)

    async def run() -> None:
        import threading

        scheduler = GenerationScheduler(tiny_llama, settings, threading.Lock())
        handle = await scheduler.submit(GenerationJob([5, 6], SamplingParams(max_new_tokens=3)))
        await asyncio.sleep(0.1)  # expires before the scheduler ever runs
        scheduler.start()
        with pytest.raises(RequestTimeout):
            await handle.result()
        assert scheduler.stats()["active"] == 0
        await scheduler.stop()

    asyncio.run(run())


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(
    llama_settings: Settings, tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.engine.generate import DecodeBatch
    from service.errors import MaskserveError

    original = DecodeBatch.step
    calls = {"n": 0}

    def flaky_step(self: DecodeBatch) -> list[object]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(self)  # type: ignore[return-value]

    monkeypatch.setattr(DecodeBatch, "step", flaky_step)

    async def run() -> None:
        import threading

        scheduler = GenerationScheduler(tiny_llama, llama_settings, threading.Lock())
        # Both join in one prefill: max_new_tokens=1 is answered there, then the step for the other one fails.
        quick = await scheduler.submit(GenerationJob([5, 6], SamplingParams(max_new_tokens=1)))
        slow = await scheduler.submit(GenerationJob([5, 6], SamplingParams(max_new_tokens=5)))
        scheduler.start()
        assert (await quick.result()).completion_tokens == 1
        with pytest.raises(MaskserveError) as err:
            await slow.result()
        assert err.value.status_code == 500
        assert err.value.message == "generation failed"
        assert scheduler.stats() == {"running": 0, "waiting": 0, "active": 0}
        after = await scheduler.submit(GenerationJob([5, 6], SamplingParams(max_new_tokens=3)))
        assert (await after.result()).completion_tokens == 3
        await scheduler.stop()

    asyncio.run(run())
