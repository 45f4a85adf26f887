"""POST /v1/fill-mask: the Hugging Face Inference API's fill-mask, batched across concurrent requests."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response

from service.api.health import EngineDep
from service.api.mask_store import mask_store
from service.api.protocol.fill_mask import FILL_MASK_EXAMPLES, FillMaskRequest, FillMaskResponse, FillMaskWithMasks
from service.api.serving.fill_mask import fill_mask_job, render_response
from service.api.serving.reports import fill_mask_report, token_decoder
from service.api.sse import disconnected

router = APIRouter(tags=["fill-mask"])


@router.post(
    "/v1/fill-mask",
    summary="Fill masked words (Hugging Face Inference API shape)",
    response_model=FillMaskResponse | FillMaskWithMasks,
)
async def fill_mask(
    body: Annotated[FillMaskRequest, Body(openapi_examples=FILL_MASK_EXAMPLES)],
    engine: EngineDep,
    request: Request,
) -> Response:
    worker = engine.fill_mask_worker()
    job = fill_mask_job(body, worker.codec, engine.settings)
    job.request_id = str(getattr(request.state, "request_id", "")) or job.request_id
    worker.compile(job)
    loaded = engine.require()

    def report(dense: bool) -> dict[str, Any]:
        return fill_mask_report(job, loaded.mask_token or "", token_decoder(loaded.tokenizer), loaded.mntp, dense=dense)

    mask_store(request).put(job.request_id, report)
    result = await worker.submit(job, client_gone=lambda: disconnected(request))
    if body.return_masks:
        return JSONResponse({"results": render_response(job, result), "masks": report(False)})
    return JSONResponse(render_response(job, result))
