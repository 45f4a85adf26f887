"""``POST /v1/generate``: text generation with output masks, whole or streamed as server-sent events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.api.health import EngineDep
from service.api.mask_store import MASKS_ID_HEADER, keep_report
from service.api.protocol.generate import GenerateChoicesResponse, GenerateRequest, GenerateResponse
from service.api.serving.generate import (
    generate_choices_response,
    generate_job,
    generate_response,
    result_event,
    stream_event,
    token_event,
)
from service.api.serving.reports import generate_report, token_decoder
from service.api.sse import EventStream, results_or_cancel, sse_responses
from service.engine.generate import GenerationResult
from service.engine.scheduler import GenerationHandle

router = APIRouter(tags=["generation"])


@router.post(
    "/v1/generate",
    response_model=GenerateResponse | GenerateChoicesResponse,
    response_model_exclude={"masks"},  # present only with return_masks (answered as a JSONResponse)
    summary="Generate text, with output masks",
    description="With n = 1 a GenerateResponse; with n > 1 a GenerateChoicesResponse (one choice per sequence).",
    responses=sse_responses("JSON, or SSE if stream"),
)
async def generate(
    body: GenerateRequest, engine: EngineDep, request: Request, reply: Response
) -> Response | GenerateResponse | GenerateChoicesResponse:
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
    results = await results_or_cancel(handle, request)
    outcome["result"] = results[0]  # the report's output steps: sequence 0's
    with_top = body.top_logprobs > 0
    response: GenerateResponse | GenerateChoicesResponse = (
        generate_response(results[0], model, with_top)
        if body.n == 1
        else generate_choices_response(results, model, with_top)
    )
    if not body.return_masks:
        reply.headers.update(kept)  # merged into the answer FastAPI renders from ``response``
        return response
    response.masks = report(False)
    return JSONResponse(response.model_dump(mode="json"), headers=kept)


async def _stream(handle: GenerationHandle, with_top: bool) -> AsyncIterator[dict[str, Any]]:
    """Token events, then each sequence's result event (with n > 1 interleaved, each naming its ``choice``)."""
    async for event in handle.events():
        if isinstance(event, GenerationResult):
            yield stream_event(result_event(event), handle.n)
        else:
            yield stream_event(token_event(handle.request_id, event, with_top), handle.n)
