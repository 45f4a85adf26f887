"""Inspection of applied masks: ``POST /v1/masks`` (dry run), ``GET /v1/masks/{request_id}``, PNG heatmaps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from service.api.health import EngineDep
from service.api.mask_store import client_key, mask_store
from service.api.protocol.fill_mask import FillMaskRequest
from service.api.protocol.generate import GenerateRequest
from service.api.protocol.masks import Format, MasksRequest, Picture
from service.api.serving.fill_mask import fill_mask_job
from service.api.serving.generate import generate_job
from service.api.serving.reports import DENSE_LIMIT, fill_mask_report, generate_report, token_decoder
from service.engine.core import Engine
from service.engine.fill.job import FillMaskJob
from service.engine.generate import GenerationJob
from service.errors import ErrorResponse, InvalidRequest, NotFound
from service.masks.inspect import dense_rows, render_heatmap_png, render_output_steps_png

router = APIRouter(tags=["masks"])


def _parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(["request", *(str(p) for p in err["loc"])])
        raise InvalidRequest(f"'{param}': {err['msg']}", param=param) from None


async def plan(
    engine: Engine, endpoint: str, body: dict[str, Any], request_id: str
) -> tuple[GenerationJob | FillMaskJob, Callable[[bool], dict[str, Any]]]:
    """The job a request would become, its masks compiled as for a real run, and its report builder
    (dense -> report); nothing is decoded."""
    loaded = engine.require()
    decode = token_decoder(loaded.tokenizer)
    if endpoint == "generate":
        gen = engine.require_generation()
        job, encoded = generate_job(_parse(GenerateRequest, body), gen, engine.settings)
        job.request_id = request_id
        await gen.prepare(job)  # a grammar compiles off the compute thread, within its time limit
        await engine.compute.run(gen.compile, job)
        return job, lambda dense: generate_report(job, encoded, decode, dense=dense)
    worker = engine.fill_mask_worker()
    fjob = fill_mask_job(_parse(FillMaskRequest, body), worker.codec, engine.settings)
    fjob.request_id = request_id
    worker.compile(fjob)
    return fjob, lambda dense: fill_mask_report(fjob, loaded.mask_token or "", decode, loaded.mntp, dense=dense)


def render(report: dict[str, Any], fmt: Format, picture: Picture = "mask") -> Response:
    if fmt == "json":
        return JSONResponse(report)
    labels = [t["text"] for t in report["tokens"]]
    att = report["attention"]
    if picture == "weights":
        weights = report.get("attention_weights")
        if weights is None:
            raise InvalidRequest('picture=weights needs "attention_weights": true in the body', param="picture")
        layer = "mean over layers" if weights["layer"] is None else f"layer {weights['layer']}"
        png = render_heatmap_png(
            torch.tensor(weights["values"]),  # (T, T)
            query_labels=labels,
            key_labels=labels,
            title=f"{report['endpoint']} attention weights\n({layer}, mean over heads)",
            colorbar_label="attention weight",
        )
        return Response(png, media_type="image/png")
    if picture == "output":
        steps = (report.get("output") or {}).get("steps")
        if not steps:
            raise InvalidRequest(
                "picture=output needs the output-mask steps of a finished generation: run /v1/generate with "
                '"return_masks": true, then GET /v1/masks/{id}?format=png&picture=output',
                param="picture",
            )
        kinds = ", ".join(report["output"]["kinds"]) or "none"
        png = render_output_steps_png(steps, title=f"output masks per decode step ({kinds})")
        return Response(png, media_type="image/png")
    mask = dense_rows(att["rows"], att["key_length"])  # (T, S)
    constraints = att.get("constraints") or {}
    marks = {kind: constraints.get(kind) or [] for kind in ("exclude", "isolate", "emphasis")}
    title = f"{report['endpoint']} attention mask ({att['type']})"
    png = render_heatmap_png(
        mask, query_labels=labels, key_labels=labels, title=title, key_bias=att.get("key_bias"), marks=marks
    )
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
    body: MasksRequest,
    engine: EngineDep,
    request: Request,
    format: Format = Query("json"),
    picture: Picture = Query(
        "mask", description="With format=png: the attention mask, or the weights (output: see GET /v1/masks/{id})."
    ),
) -> Response:
    request_id = str(getattr(request.state, "request_id", "dry-run"))
    if body.attention_layer is not None and not body.attention_weights:
        raise InvalidRequest(
            "'attention_layer' picks a layer of the attention weights; add \"attention_weights\": true",
            param="attention_layer",
        )
    job, build = await plan(engine, body.endpoint, body.request, request_id)
    report = build(body.dense)
    if body.attention_weights:
        values = await engine.attention_weights(job, body.attention_layer, max_tokens=DENSE_LIMIT)  # (T, T)
        report["attention_weights"] = {
            "layer": body.attention_layer, "heads": "mean", "values": values.round(decimals=5).tolist()
        }  # fmt: skip
    return render(report, format, picture)


@router.get(
    "/v1/masks/{request_id}",
    summary="The masks a recent request got (bounded buffer: MASKSERVE_MASKS_BUFFER_SIZE)",
    responses={**PNG, 404: {"model": ErrorResponse}},
)
async def masks_of_request(
    request_id: str,
    request: Request,
    format: Format = Query("json"),
    dense: bool = Query(False),
    picture: Picture = Query(
        "mask", description="With format=png: the attention mask, or the output masks per decode step (output)."
    ),
) -> Response:
    build = mask_store(request).get(request_id, client_key(request))
    if build is None:  # another client's request answers the same: its existence is not revealed
        raise NotFound(
            f"no recent request of yours has id {request_id!r} (only the last few are kept; without API keys, "
            "only those that asked for return_masks)",
            param="request_id",
        )
    if picture == "weights":
        raise InvalidRequest("attention weights are drawn on the dry run only (POST /v1/masks)", param="picture")
    return render(build(dense), format, picture)  # attention weights only on the dry run: they cost a forward
