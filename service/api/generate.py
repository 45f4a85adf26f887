"""``POST /v1/generate``: text generation with output masks, whole or streamed as server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.api.health import EngineDep
from service.api.mask_store import MASKS_ID_HEADER, keep_report
from service.api.protocol.generate import GenerateRequest, GenerateResponse
from service.api.serving.generate import generate_job, generate_response, result_event, token_event
from service.api.serving.reports import generate_report, token_decoder
from service.api.sse import EventStream, result_or_cancel, sse_responses
from service.engine.generate import GenerationResult
from service.engine.scheduler import GenerationHandle

router = APIRouter(tags=["generation"])


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    response_model_exclude={"masks"},  # present only with return_masks (answered as a JSONResponse)
    summary="Generate text, with output masks",
    responses=sse_responses("JSON, or SSE if stream"),
)
async def generate(
    body: GenerateRequest, engine: EngineDep, request: Request, reply: Response
) -> Response | GenerateResponse:
    gen = engine.require_generation()
    job, encoded = generate_job(body, gen, engine.settings)
    handle = await gen.submit(job)
    model = engine.model_id
    decode = token_decoder(gen.vocab.tokenizer)
    outcome: dict[str, GenerationResult] = {}

    def report(dense: bool) -> dict[str, Any]:
        return generate_report(job, encoded, decode, dense=dense, result=outcome.get("result"))

    kept = (
        {MASKS_ID_HEADER: job.request_id}
        if keep_report(request, job.request_id, report, asked=body.return_masks)
        else {}
    )
    if body.stream:
        stream = EventStream(_stream(handle, body.top_logprobs > 0), handle)
        stream.headers.update(kept)
        return stream
    outcome["result"] = await result_or_cancel(handle, request)
    response = generate_response(outcome["result"], model, body.top_logprobs > 0)
    if not body.return_masks:
        reply.headers.update(kept)  # merged into the answer FastAPI renders from ``response``
        return response
    response.masks = report(False)
    return JSONResponse(response.model_dump(mode="json"), headers=kept)


async def _stream(handle: GenerationHandle, with_top: bool) -> AsyncIterator[dict[str, Any]]:
    async for event in handle.events():
        if isinstance(event, GenerationResult):
            yield result_event(event).model_dump(mode="json")
        else:
            yield token_event(handle.request_id, event, with_top).model_dump(mode="json")
