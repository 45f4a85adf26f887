"""The FastAPI application: ``create_app(settings)``; the lifespan starts and stops the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import fill_mask, health
from service.config import Settings, load_settings
from service.engine.core import Engine
from service.engine.loading import LoadedModel
from service.errors import add_exception_handlers

DESCRIPTION = """
Mask-aware transformer inference: fill-mask (Hugging Face Inference API shape), generation with attention
and output masks (native and OpenAI-compatible), and inspection of every mask a request caused.
"""


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

    app = FastAPI(title="maskserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    add_exception_handlers(app)
    app.include_router(health.router)
    app.include_router(fill_mask.router)
    return app
