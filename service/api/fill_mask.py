"""POST /v1/fill-mask: the Hugging Face Inference API's fill-mask, batched across concurrent requests."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import uuid4

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response

from service.api.fill_mask_schemas import (
    FILL_MASK_EXAMPLES,
    FillMaskRequest,
    FillMaskResponse,
    FillMaskWithMasks,
    render_response,
)
from service.api.health import EngineDep
from service.api.inspect import fill_mask_report, token_decoder
from service.api.masks import mask_store
from service.engine.fill_mask import ClientGone
from service.errors import ErrorResponse

router = APIRouter(tags=["fill-mask"])

CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, but logs show what happened


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(
    "/v1/fill-mask",
    summary="Fill masked words (Hugging Face Inference API shape)",
    response_model=FillMaskResponse | FillMaskWithMasks,
    responses={
        400: {"model": ErrorResponse, "description": "a value that cannot be served (names `param`)"},
        422: {"model": ErrorResponse, "description": "a value of the wrong type or shape"},
        429: {"model": ErrorResponse, "description": "queue full; retry after Retry-After seconds"},
        503: {"model": ErrorResponse, "description": "model still loading"},
        504: {"model": ErrorResponse, "description": "not finished within MASKSERVE_REQUEST_TIMEOUT_S"},
    },
)
async def fill_mask(
    body: Annotated[FillMaskRequest, Body(openapi_examples=FILL_MASK_EXAMPLES)],
    engine: EngineDep,
    request: Request,
) -> Response:
    worker = engine.fill_mask_worker()
    job = body.to_job(worker.codec, engine.settings)
    loaded = engine.require()
    request_id = str(getattr(request.state, "request_id", "")) or f"fm-{uuid4().hex}"

    def report(dense: bool) -> dict[str, Any]:
        decode = token_decoder(loaded.tokenizer)
        return fill_mask_report(
            request_id, job, loaded.mask_token or "", decode, loaded.mntp, dense=dense, dims=loaded.attention_dims
        )

    mask_store(request).put(request_id, report)
    try:
        result = await worker.submit(job, client_gone=lambda: _disconnected(request))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    if body.return_masks:
        return JSONResponse({"results": render_response(job, result), "masks": report(False)})
    return JSONResponse(render_response(job, result))
