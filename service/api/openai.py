"""OpenAI-compatible ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming included)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.health import EngineDep
from service.api.protocol.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from service.api.serving.openai import (
    chat_chunks,
    chat_job,
    chat_max_param,
    chat_response,
    completion_chunks,
    completion_job,
    completion_response,
)
from service.api.sse import EventStream, results_or_cancel, sse_responses
from service.errors import ErrorResponse

router = APIRouter(tags=["openai"])

STREAM = {
    **sse_responses("JSON, or SSE chunks then [DONE] if stream"),
    404: {"model": ErrorResponse, "description": "`model` is not the served model (`code: model_not_found`)"},
}


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    summary="OpenAI-compatible text completion (with maskserve's output masks as extra fields)",
    responses=STREAM,
)
async def completions(body: CompletionRequest, engine: EngineDep, request: Request) -> Response | CompletionResponse:
    gen = engine.require_generation()
    model = engine.model_id
    handle = await gen.submit(completion_job(body, gen, engine.settings, model), max_new_tokens_param="max_tokens")
    with_lp = body.logprobs is not None
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(completion_chunks(handle, model, with_lp, usage), handle)
    return completion_response(await results_or_cancel(handle, request), model, with_lp)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    summary="OpenAI-compatible chat completion (with maskserve's output masks as extra fields)",
    responses=STREAM,
)
async def chat_completions(
    body: ChatCompletionRequest, engine: EngineDep, request: Request
) -> Response | ChatCompletionResponse:
    gen = engine.require_generation()
    model = engine.model_id
    job = chat_job(body, gen, engine.settings, model)
    handle = await gen.submit(job, max_new_tokens_param=chat_max_param(body))
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(chat_chunks(handle, model, body.logprobs, usage), handle)
    return chat_response(await results_or_cancel(handle, request), model, body.logprobs)
