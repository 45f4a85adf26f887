"""OpenAI-compatible ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming included)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.generate import ERRORS
from service.api.health import EngineDep
from service.api.openai_schemas import (
    OPENAI_FINISH,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    chat_logprobs,
    completion_logprobs,
)
from service.api.sse import EventStream, result_or_cancel
from service.engine.generate import GenerationResult
from service.engine.scheduler import GenerationHandle

router = APIRouter(tags=["openai"])

STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks then [DONE] if stream"}
}


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    summary="OpenAI-compatible text completion (with maskserve's output masks as extra fields)",
    responses={**ERRORS, **STREAM},
)
async def completions(body: CompletionRequest, engine: EngineDep, request: Request) -> Response | CompletionResponse:
    gen = engine.require_generation()
    model = engine.info()["id"]
    handle = await gen.submit(body.to_job(gen, engine.settings, model), max_new_tokens_param="max_tokens")
    with_lp = body.logprobs is not None
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(_completion_chunks(handle, model, with_lp, usage), handle)
    r = await result_or_cancel(handle, request)
    choice = CompletionChoice(
        text=r.text, logprobs=completion_logprobs(list(r.tokens), with_lp), finish_reason=OPENAI_FINISH[r.finish_reason]
    )
    return CompletionResponse(id=_id("cmpl", r), model=model, choices=[choice], usage=Usage.of(r))


async def _completion_chunks(
    handle: GenerationHandle, model: str, with_lp: bool, usage: bool
) -> AsyncIterator[dict[str, Any] | str]:
    chunk_id, created, offset = f"cmpl-{handle.request_id}", int(time.time()), 0
    async for event in handle.events():
        if isinstance(event, GenerationResult):
            last = CompletionChoice(text=event.rest, finish_reason=OPENAI_FINISH[event.finish_reason])
            yield CompletionResponse(id=chunk_id, created=created, model=model, choices=[last]).model_dump()
            if usage:
                done = CompletionResponse(id=chunk_id, created=created, model=model, choices=[])
                done.usage = Usage.of(event)
                yield done.model_dump()
            yield "[DONE]"
            return
        logprobs = completion_logprobs([event.token], with_lp, offset)
        if event.text or (logprobs is not None and logprobs.tokens):
            offset += sum(len(t) for t in logprobs.tokens) if logprobs else 0
            choice = CompletionChoice(text=event.text, logprobs=logprobs)
            yield CompletionResponse(id=chunk_id, created=created, model=model, choices=[choice]).model_dump()


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    summary="OpenAI-compatible chat completion (with maskserve's output masks as extra fields)",
    responses={**ERRORS, **STREAM},
)
async def chat_completions(
    body: ChatCompletionRequest, engine: EngineDep, request: Request
) -> Response | ChatCompletionResponse:
    gen = engine.require_generation()
    model = engine.info()["id"]
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    handle = await gen.submit(body.to_job(gen, engine.settings, model), max_new_tokens_param=max_param)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(_chat_chunks(handle, model, body.logprobs, usage), handle)
    r = await result_or_cancel(handle, request)
    choice = ChatChoice(
        message=AssistantMessage(content=r.text),
        logprobs=chat_logprobs(list(r.tokens), body.logprobs),
        finish_reason=OPENAI_FINISH[r.finish_reason],
    )
    return ChatCompletionResponse(id=_id("chatcmpl", r), model=model, choices=[choice], usage=Usage.of(r))


async def _chat_chunks(
    handle: GenerationHandle, model: str, with_lp: bool, usage: bool
) -> AsyncIterator[dict[str, Any] | str]:
    chunk_id, created = f"chatcmpl-{handle.request_id}", int(time.time())

    def chunk(choices: list[ChatChunkChoice], **kw: Any) -> dict[str, Any]:
        return ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=choices, **kw).model_dump()

    yield chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
    async for event in handle.events():
        if isinstance(event, GenerationResult):
            yield chunk([ChatChunkChoice(delta=ChatDelta(content=event.rest or None),
                                         finish_reason=OPENAI_FINISH[event.finish_reason])])  # fmt: skip
            if usage:
                yield chunk([], usage=Usage.of(event))
            yield "[DONE]"
            return
        logprobs = chat_logprobs([event.token], with_lp)
        if event.text or (logprobs is not None and logprobs.content):
            yield chunk([ChatChunkChoice(delta=ChatDelta(content=event.text), logprobs=logprobs)])


def _id(prefix: str, r: GenerationResult) -> str:
    return f"{prefix}-{r.request_id}"
