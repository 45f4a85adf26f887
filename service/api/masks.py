"""Inspection of applied masks: ``POST /v1/masks`` (dry run), ``GET /v1/masks/{request_id}``, PNG heatmaps."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError

from service.api.fill_mask_schemas import FillMaskRequest
from service.api.generate_schemas import GenerateRequest
from service.api.health import EngineDep
from service.api.inspect import MaskStore, fill_mask_report, generate_report, token_decoder
from service.engine.core import Engine
from service.errors import ErrorResponse, InvalidRequest, NotFound
from service.masks.inspect import dense_rows, render_heatmap_png

router = APIRouter(tags=["masks"])
Format = Literal["json", "png"]


class MasksRequest(BaseModel):
    endpoint: Literal["generate", "fill-mask"] = Field(description="Which endpoint the request is for.")
    request: dict[str, Any] = Field(description="The request body, exactly as that endpoint takes it.")
    dense: bool = Field(False, description="Also the dense 0/1 attention matrix (prompts of up to 512 tokens).")

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "endpoint": "generate",
                    "request": {
                        "prompt": "Old memo: Monday. New memo: Friday. The day is",
                        "attention": {"exclude": [{"start": 0, "end": 17}]},
                    },
                }
            ]
        }
    }


def mask_store(request: Request) -> MaskStore:
    store: MaskStore = request.app.state.mask_store
    return store


def _parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(["request", *(str(p) for p in err["loc"])])
        raise InvalidRequest(f"'{param}': {err['msg']}", param=param) from None


def plan(engine: Engine, endpoint: str, body: dict[str, Any], request_id: str) -> Any:
    """The masks a request would get, as a lazy report builder (``dense`` -> dict); nothing is decoded."""
    loaded = engine.require()
    decode = token_decoder(loaded.tokenizer)
    if endpoint == "generate":
        gen = engine.require_generation()
        req: GenerateRequest = _parse(GenerateRequest, body)
        encoded = req.encode(gen)
        job = req.to_job(gen, engine.settings, encoded)
        return lambda dense: generate_report(
            request_id, encoded.text, encoded.offsets, encoded.constraints, job, decode, dense=dense
        )
    worker = engine.fill_mask_worker()
    fill: FillMaskRequest = _parse(FillMaskRequest, body)
    fjob = fill.to_job(worker.codec, engine.settings)
    mask_token = loaded.mask_token or ""
    return lambda dense: fill_mask_report(request_id, fjob, mask_token, decode, loaded.mntp, dense=dense)


def render(report: dict[str, Any], fmt: Format) -> Response:
    if fmt == "json":
        return JSONResponse(report)
    att = report["attention"]
    mask = dense_rows(att["rows"], att["key_length"])  # (T, S)
    labels = [t["text"] for t in report["tokens"]]
    title = f"{report['endpoint']} attention mask ({att['type']})"
    png = render_heatmap_png(mask, query_labels=labels, key_labels=labels, title=title)
    return Response(png, media_type="image/png")


PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}}, "description": "the report as JSON, or a heatmap PNG with format=png"}
}


@router.post(
    "/v1/masks",
    summary="Every mask a fill-mask or generate request would get (dry run: nothing is decoded)",
    responses={**PNG, 400: {"model": ErrorResponse}},
)
async def masks_dry_run(
    body: MasksRequest, engine: EngineDep, request: Request, format: Format = Query("json")
) -> Response:
    request_id = str(getattr(request.state, "request_id", "dry-run"))
    build = plan(engine, body.endpoint, body.request, request_id)
    return render(build(body.dense), format)


@router.get(
    "/v1/masks/{request_id}",
    summary="The masks a recent request got (bounded buffer: MASKSERVE_MASKS_BUFFER_SIZE)",
    responses={**PNG, 404: {"model": ErrorResponse}},
)
async def masks_of_request(
    request_id: str, request: Request, format: Format = Query("json"), dense: bool = Query(False)
) -> Response:
    build = mask_store(request).get(request_id)
    if build is None:
        raise NotFound(f"no recent request has id {request_id!r} (only the last few are kept)", param="request_id")
    return render(build(dense), format)
