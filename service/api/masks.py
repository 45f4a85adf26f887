"""Inspection of applied masks: ``POST /v1/masks`` (dry run), ``GET /v1/masks/{request_id}``, PNG heatmaps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from torch import Tensor

from service.api.fill_mask_schemas import FillMaskRequest
from service.api.generate_schemas import GenerateRequest
from service.api.health import EngineDep
from service.api.inspect import DENSE_LIMIT, MaskStore, fill_mask_report, generate_report, token_decoder
from service.engine.core import Engine
from service.engine.fill_mask import fill_attention_weights
from service.engine.generate import prompt_attention_weights
from service.errors import ErrorResponse, InvalidRequest, NotFound
from service.masks.inspect import dense_rows, render_heatmap_png

router = APIRouter(tags=["masks"])
Format = Literal["json", "png"]
Picture = Literal["mask", "weights"]


class MasksRequest(BaseModel):
    endpoint: Literal["generate", "fill-mask"] = Field(description="Which endpoint the request is for.")
    request: dict[str, Any] = Field(description="The request body, exactly as that endpoint takes it.")
    dense: bool = Field(False, description="Also the dense 0/1 attention matrix (prompts of up to 512 tokens).")
    attention_weights: bool = Field(
        False,
        description="Also run the prompt through the model once and report its attention weights, averaged "
        "over heads (prompts of up to 512 tokens; fill-mask: the first input).",
    )
    attention_layer: int | None = Field(
        None, ge=0, description="The layer whose weights to report; default: the mean over all layers."
    )

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


class Plan(NamedTuple):
    build: Callable[[bool], dict[str, Any]]  # dense -> the report
    weights: Callable[[], dict[int, Tensor]]  # one forward of the prompt: per layer, weights averaged over heads


def plan(engine: Engine, endpoint: str, body: dict[str, Any], request_id: str) -> Plan:
    """The masks a request would get, as a lazy report builder; nothing is decoded."""
    loaded = engine.require()
    decode = token_decoder(loaded.tokenizer)
    lock = engine.compute_lock
    if endpoint == "generate":
        gen = engine.require_generation()
        req: GenerateRequest = _parse(GenerateRequest, body)
        encoded = req.encode(gen)
        job = req.to_job(gen, engine.settings, encoded)
        return Plan(
            lambda dense: generate_report(
                request_id, encoded.text, encoded.offsets, encoded.constraints, job, decode, dense=dense
            ),
            lambda: prompt_attention_weights(loaded.generation_model, job.prompt_ids, job.attention, lock),
        )
    worker = engine.fill_mask_worker()
    fill: FillMaskRequest = _parse(FillMaskRequest, body)
    fjob = fill.to_job(worker.codec, engine.settings)
    mask_token = loaded.mask_token or ""
    return Plan(
        lambda dense: fill_mask_report(
            request_id, fjob, mask_token, decode, loaded.mntp, dense=dense, dims=loaded.attention_dims
        ),
        lambda: fill_attention_weights(loaded, fjob.inputs[0], lock),
    )


async def weights_report(engine: Engine, report: dict[str, Any], planned: Plan, layer: int | None) -> dict[str, Any]:
    """The prompt's attention weights, averaged over heads (and over layers unless ``layer``).  (T, T)"""
    loaded = engine.require()
    if not loaded.steerable:
        raise InvalidRequest("attention weights need the model to run SDPA attention", param="attention_weights")
    n_layers = loaded.attention_dims[0]
    if layer is not None and layer >= n_layers:
        raise InvalidRequest(f"the model has {n_layers} layers (0..{n_layers - 1})", param="attention_layer")
    if len(report["tokens"]) > DENSE_LIMIT:
        raise InvalidRequest(f"attention weights are offered for up to {DENSE_LIMIT} tokens", param="attention_weights")
    per_layer = await engine.compute.run(planned.weights)
    if len(per_layer) != n_layers:  # an architecture whose attention modules bypass AttentionInterface
        raise InvalidRequest("this model's attention layers do not report their weights", param="attention_weights")
    values = per_layer[layer] if layer is not None else torch.stack(list(per_layer.values())).mean(dim=0)  # (T, T)
    return {"layer": layer, "heads": "mean", "values": values.round(decimals=5).tolist()}


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
    mask = dense_rows(att["rows"], att["key_length"])  # (T, S)
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
    body: MasksRequest,
    engine: EngineDep,
    request: Request,
    format: Format = Query("json"),
    picture: Picture = Query("mask", description="With format=png: the attention mask, or the weights."),
) -> Response:
    request_id = str(getattr(request.state, "request_id", "dry-run"))
    if body.attention_layer is not None and not body.attention_weights:
        raise InvalidRequest(
            "'attention_layer' picks a layer of the attention weights; add \"attention_weights\": true",
            param="attention_layer",
        )
    planned = plan(engine, body.endpoint, body.request, request_id)
    report = planned.build(body.dense)
    if body.attention_weights:
        report["attention_weights"] = await weights_report(engine, report, planned, body.attention_layer)
    return render(report, format, picture)


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
    return render(build(dense), format)  # attention weights only on the dry run: they cost a forward
