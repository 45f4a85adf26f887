"""``POST /v1/generate``: text generation with output masks, whole or streamed as server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.api.generate_schemas import GenerateRequest, GenerateResponse, GenerateStreamEvent
from service.api.health import EngineDep
from service.api.inspect import generate_report, token_decoder
from service.api.masks import mask_store
from service.api.sse import EventStream, result_or_cancel
from service.engine.generate import GenerationResult
from service.engine.scheduler import GenerationHandle
from service.errors import ErrorResponse

router = APIRouter(tags=["generation"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "a constraint that cannot work (names the param)"},
    422: {"model": ErrorResponse, "description": "a field of the wrong type or range"},
    429: {"model": ErrorResponse, "description": "queue full; see Retry-After"},
    503: {"model": ErrorResponse, "description": "model still loading"},
    504: {"model": ErrorResponse, "description": "not finished within MASKSERVE_REQUEST_TIMEOUT_S"},
}


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    response_model_exclude={"masks"},  # present only with return_masks (answered as a JSONResponse)
    summary="Generate text, with output masks",
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE if stream"}},
)
async def generate(body: GenerateRequest, engine: EngineDep, request: Request) -> Response | GenerateResponse:
    gen = engine.require_generation()
    encoded = body.encode(gen)
    job = body.to_job(gen, engine.settings, encoded)
    handle = await gen.submit(job)
    model = engine.info()["id"]
    decode = token_decoder(gen.vocab.tokenizer)
    outcome: dict[str, GenerationResult] = {}

    def report(dense: bool) -> dict[str, Any]:
        return generate_report(
            job.request_id, encoded.text, encoded.offsets, encoded.constraints, job, decode, dense=dense,
            result=outcome.get("result"),
        )  # fmt: skip

    mask_store(request).put(job.request_id, report)
    if body.stream:
        return EventStream(_stream(handle, body.top_logprobs > 0), handle)
    outcome["result"] = await result_or_cancel(handle, request)
    response = GenerateResponse.of(outcome["result"], model, body.top_logprobs > 0)
    if not body.return_masks:
        return response
    response.masks = report(False)
    return JSONResponse(response.model_dump())


async def _stream(handle: GenerationHandle, with_top: bool) -> AsyncIterator[dict[str, Any]]:
    async for event in handle.events():
        if isinstance(event, GenerationResult):
            yield GenerateStreamEvent.of_result(event).model_dump()
        else:
            yield GenerateStreamEvent.of_token(handle.request_id, event, with_top).model_dump()
