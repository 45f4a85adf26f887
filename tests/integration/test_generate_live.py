"""Against a live uvicorn server on loopback: client disconnects free slots; the official openai client works."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from service.app import create_app
from service.config import Settings, load_settings
from service.engine.generate import DecodeBatch
from service.engine.loading import LoadedModel
from tests.live import live_server

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def wait_until(condition: Callable[[], bool], failure: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server(llama_settings: Settings, tiny_llama: LoadedModel) -> Iterator[tuple[str, Any]]:
    app = create_app(llama_settings, loaded=tiny_llama)
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server: tuple[str, Any]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_disconnect_cancels_and_frees_the_slot(
    tiny_llama_dir: object, tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(model=str(tiny_llama_dir), adapter="none", max_running_requests=1, max_queued_requests=0)
    original = DecodeBatch._forward

    def slow_forward(self: DecodeBatch, *args: Any) -> Any:
        time.sleep(0.02)  # 240 tokens would take ~5 s: a cancelled request visibly stops early
        return original(self, *args)

    monkeypatch.setattr(DecodeBatch, "_forward", slow_forward)
    app = create_app(settings, loaded=tiny_llama)
    with live_server(app) as url:
        scheduler = app.state.engine.generation
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"prompt": "the dog", "max_new_tokens": 240, "stream": True}).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(
            b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while b"data: " not in received:  # wait for the first token event
            received += sock.recv(4096)
        wait_until(lambda: scheduler.stats()["running"] == 1, "the request never ran")
        # The one slot is taken and there is no queue: another request is refused.
        busy = httpx.post(url + "/v1/generate", json={"prompt": "a", "max_new_tokens": 1})
        assert busy.status_code == 429
        assert busy.headers["retry-after"].isdigit()
        sock.close()  # the client goes away mid-stream
        wait_until(lambda: scheduler.stats()["active"] == 0, "the cancelled request kept its slot", within=2.0)
        ok = httpx.post(url + "/v1/generate", json={"prompt": "a", "max_new_tokens": 2}, timeout=30)
        assert ok.status_code == 200


def test_openai_completions(client: openai.OpenAI, tiny_llama: LoadedModel) -> None:
    r = client.completions.create(model=tiny_llama.name, prompt="the dog sees", max_tokens=5, logprobs=2, temperature=0)
    choice = r.choices[0]
    assert r.object == "text_completion"
    assert choice.finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 5
    assert choice.logprobs is not None
    assert "".join(choice.logprobs.tokens or []) == choice.text
    assert len(choice.logprobs.top_logprobs or []) == 5
    offsets = choice.logprobs.text_offset or []
    assert offsets[0] == 0
    assert offsets == sorted(offsets)


def test_openai_chat_stream_equals_whole(client: openai.OpenAI, tiny_llama: LoadedModel) -> None:
    kw: dict[str, Any] = {
        "model": tiny_llama.name,
        "messages": [{"role": "user", "content": "the cat"}],
        "max_completion_tokens": 6,
        "seed": 4,
    }
    whole = client.chat.completions.create(**kw)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason == "length"
    assert usage == whole.usage


def test_openai_chat_logprobs(client: openai.OpenAI, tiny_llama: LoadedModel) -> None:
    r = client.chat.completions.create(
        model=tiny_llama.name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert bytes(entry.bytes or []).decode(errors="replace") == entry.token


def test_openai_json_schema_response_format(client: openai.OpenAI, tiny_llama: LoadedModel) -> None:
    r = client.chat.completions.create(
        model=tiny_llama.name,
        messages=[{"role": "user", "content": "a person"}],
        max_completion_tokens=60,
        temperature=1.0,
        seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    assert r.choices[0].finish_reason == "stop"
    value = json.loads(r.choices[0].message.content or "")
    assert set(value) == {"name", "age"}
    assert isinstance(value["age"], int)
    assert len(value["name"]) <= 6


def test_openai_extra_body_masks(client: openai.OpenAI, tiny_llama: LoadedModel) -> None:
    r = client.chat.completions.create(
        model=tiny_llama.name,
        messages=[{"role": "user", "content": "yes or no?"}],
        max_completion_tokens=10,
        seed=1,
        extra_body={"choice": ["yes", "no"]},
    )
    assert r.choices[0].message.content in {"yes", "no"}
    completion = client.completions.create(
        model=tiny_llama.name, prompt="the", max_tokens=12, seed=5, extra_body={"bad_words": ["e", "a"]}
    )
    assert "e" not in completion.choices[0].text
    assert "a" not in completion.choices[0].text


def test_openai_penalties_and_no_repeat_ngram(client: openai.OpenAI, tiny_llama: LoadedModel) -> None:
    kw: dict[str, Any] = {"model": tiny_llama.name, "prompt": "the dog sees the dog", "max_tokens": 12,
                          "temperature": 0}  # fmt: skip
    plain = client.completions.create(**kw)
    extras: list[dict[str, Any]] = [
        {"frequency_penalty": 1.5}, {"presence_penalty": 1.5}, {"frequency_penalty": -0.5, "presence_penalty": 0.5}
    ]  # fmt: skip
    for extra in extras:
        r = client.completions.create(**kw, **extra)
        assert r.choices[0].finish_reason in {"length", "stop"}
        assert r.usage is not None
    chat = client.chat.completions.create(
        model=tiny_llama.name, messages=[{"role": "user", "content": "the cat"}], max_completion_tokens=8,
        frequency_penalty=1.0, presence_penalty=1.0, extra_body={"no_repeat_ngram_size": 2},
    )  # fmt: skip
    assert chat.choices[0].message.content is not None
    assert plain.choices[0].text


def test_openai_n_plain_and_streamed(client: openai.OpenAI, tiny_llama: LoadedModel) -> None:
    kw: dict[str, Any] = {"model": tiny_llama.name, "messages": [{"role": "user", "content": "the cat"}],
                          "max_completion_tokens": 6, "seed": 9, "n": 2, "temperature": 1.0}  # fmt: skip
    whole = client.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 12
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in whole.choices]
    parts: dict[int, list[str]] = {0: [], 1: []}
    finish: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            parts[choice.index].append(choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert {i: "".join(p) for i, p in parts.items()} == {c.index: c.message.content for c in whole.choices}
    assert finish == {0: "length", 1: "length"}
    completions = client.completions.create(model=tiny_llama.name, prompt="the", max_tokens=5, n=2, seed=3)
    assert [c.index for c in completions.choices] == [0, 1]
    streamed: dict[int, str] = {0: "", 1: ""}
    for chunk in client.completions.create(model=tiny_llama.name, prompt="the", max_tokens=5, n=2, seed=3,
                                           stream=True):  # fmt: skip
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == {c.index: c.text for c in completions.choices}


@pytest.mark.parametrize(
    ("kw", "status", "param"),
    [
        ({"n": 9}, 400, "n"),  # MASKSERVE_MAX_N is 8
        ({"model": "gpt-4"}, 404, "model"),
        ({"presence_penalty": 2.5}, 422, "presence_penalty"),
        ({"extra_body": {"regex": "("}}, 400, "regex"),
        ({"extra_body": {"bad_word": ["x"]}}, 422, "bad_word"),
        ({"max_completion_tokens": 5000}, 400, "max_completion_tokens"),
        ({"logit_bias": {"1": 200}}, 400, "logit_bias.1"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            400,
            "response_format.json_schema.schema",
        ),
        ({"top_logprobs": 2}, 400, "top_logprobs"),
    ],
)
def test_openai_errors_name_the_param(
    client: openai.OpenAI, tiny_llama: LoadedModel, kw: dict[str, Any], status: int, param: str
) -> None:
    args: dict[str, Any] = {"model": tiny_llama.name, "messages": [{"role": "user", "content": "hi"}], **kw}
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**args)
    assert err.value.status_code == status
    assert isinstance(err.value.body, dict)
    assert err.value.body["param"] == param


def test_openai_conventions(client: openai.OpenAI, tiny_llama: LoadedModel) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert isinstance(err.value.body, dict)
    assert err.value.body["code"] == "model_not_found"
    # fields OpenAI clients send are accepted (and change nothing here)
    kw: dict[str, Any] = {"model": tiny_llama.name, "messages": [{"role": "user", "content": "hi"}],
                          "max_completion_tokens": 3, "temperature": 0}  # fmt: skip
    plain = client.chat.completions.create(**kw)
    sent = client.chat.completions.create(
        **kw, metadata={"team": "a"}, store=False, service_tier="auto", parallel_tool_calls=False
    )
    assert sent.choices[0].message.content == plain.choices[0].message.content


def test_openai_completion_stream_with_usage(client: openai.OpenAI, tiny_llama: LoadedModel) -> None:
    kw: dict[str, Any] = {"model": tiny_llama.name, "prompt": "the dog", "max_tokens": 5, "temperature": 0}
    whole = client.completions.create(**kw)
    parts, usage = [], None
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        parts += [c.text for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == whole.choices[0].text
    assert usage == whole.usage
