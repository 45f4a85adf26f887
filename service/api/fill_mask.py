"""POST /v1/fill-mask: the Hugging Face Inference API's fill-mask, batched across concurrent requests."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response

from service.api.health import EngineDep
from service.api.mask_store import MASKS_ID_HEADER, keep_report
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
    worker.compile(job)
    loaded = engine.require()

    def report(dense: bool) -> dict[str, Any]:
        return fill_mask_report(job, loaded.mask_token or "", token_decoder(loaded.tokenizer), loaded.mntp, dense=dense)

    # The report is kept under the job's own server-made id, never the client's X-Request-ID (a guessable label).
    kept = (
        {MASKS_ID_HEADER: job.request_id}
        if keep_report(request, job.request_id, report, asked=body.return_masks)
        else {}
    )
    result = await worker.submit(job, client_gone=lambda: disconnected(request))
    if body.return_masks:
        answer = {"id": job.request_id, "results": render_response(job, result), "masks": report(False)}
        return JSONResponse(answer, headers=kept)
    return JSONResponse(render_response(job, result), headers=kept)
