"""Liveness, readiness and model listing."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from service.engine.core import Engine

router = APIRouter(tags=["service"])


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]


@router.get("/health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Readiness: 200 once the model is loaded, 503 before",
    responses={503: {"description": "model still loading"}},
)
async def ready(engine: EngineDep) -> JSONResponse:
    if engine.ready:
        return JSONResponse({"status": "ready"})
    status = "failed" if engine.load_error else "loading"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})


@router.get("/v1/models", summary="The hosted model (OpenAI-style list)")
async def models(engine: EngineDep) -> dict[str, Any]:
    return {"object": "list", "data": [engine.info()]}
