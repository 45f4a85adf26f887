"""The FastAPI application: ``create_app(settings)``; the lifespan starts and stops the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from starlette.types import ASGIApp

from service import docs_pages
from service.api import fill_mask, generate, health, masks, metrics, openai, playground
from service.api.mask_store import MaskStore
from service.api.openapi import document_errors
from service.api.text import reject_unencodable_text
from service.config import Settings, load_settings
from service.engine.core import Engine
from service.engine.loading import LoadedModel
from service.errors import add_exception_handlers
from service.middleware import wrap

DESCRIPTION = """
Mask-aware transformer inference: fill-mask (Hugging Face Inference API shape), generation with attention
and output masks (native and OpenAI-compatible), and inspection of every mask a request caused.
"""


class ServiceApp(FastAPI):
    """FastAPI with the service's middleware (``service.middleware``) wrapped around Starlette's whole stack, so
    even a 500 carries X-Request-ID and is logged and counted; and an OpenAPI document whose error responses are
    the ones really sent (``service.api.openapi``). Reads ``self.state.settings``, set by ``create_app``.
    """

    def build_middleware_stack(self) -> ASGIApp:
        return wrap(super().build_middleware_stack(), self.state.settings)

    def openapi(self) -> dict[str, Any]:
        return document_errors(super().openapi(), self.routes, api_keys=bool(self.state.settings.api_keys))


def create_app(settings: Settings | None = None, *, loaded: LoadedModel | None = None) -> FastAPI:
    """Build the app. ``loaded`` injects an already-loaded model (tests); otherwise the lifespan loads it."""
    settings = settings or load_settings()
    engine = Engine(settings, loaded)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = ServiceApp(
        title="maskserve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(reject_unencodable_text)],  # text the tokenizer cannot take: 400, for every route
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.mask_store = MaskStore(settings.masks_buffer_size)
    add_exception_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(fill_mask.router)
    app.include_router(generate.router)
    app.include_router(openai.router)
    app.include_router(masks.router)
    app.include_router(playground.router)
    app.include_router(docs_pages.router)  # /docs and /redoc without a CDN
    return app
