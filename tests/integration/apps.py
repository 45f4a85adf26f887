"""Test-only routes, added to the production app by tests (never part of ``service``).

``python -m tests.integration.apps`` serves the production app (settings from MASKSERVE_* variables) plus
these routes through ``service.cli.run_server``, exactly as ``maskserve serve`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from service.app import create_app
from service.cli import run_server
from service.config import Settings, load_settings
from service.engine.loading import LoadedModel

# What a careless error path could leak: a file path and a secret setting. Tests assert neither shows up.
LEAKY_MESSAGE = "cannot open /srv/models/secret-adapter/adapter_model.safetensors with key sk-live-123"


class Item(BaseModel):
    text: str


def add_test_routes(app: FastAPI) -> FastAPI:
    released = asyncio.Event()

    @app.get("/test/boom")
    async def boom() -> None:
        raise RuntimeError(LEAKY_MESSAGE)

    @app.get("/test/slow")
    async def slow(seconds: float = 1.0) -> dict[str, float]:
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    @app.post("/test/echo")
    async def echo(request: Request) -> dict[str, object]:
        body = await request.body()
        return {"bytes": len(body), "request_id": request.state.request_id}

    @app.get("/test/stream")
    async def stream() -> StreamingResponse:
        # The second chunk waits for POST /test/release: a client can only ask for that after it has received
        # the first one, so a middleware that buffered the stream would deadlock this exchange.
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first\n"
            await asyncio.wait_for(released.wait(), timeout=20)
            released.clear()
            yield b"second\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.post("/test/release")
    async def release() -> dict[str, bool]:
        released.set()
        return {"released": True}

    @app.post("/test/json")
    async def parsed(item: Item) -> dict[str, int]:
        return {"chars": len(item.text)}

    return app


def create_test_app(settings: Settings, loaded: LoadedModel | None = None) -> FastAPI:
    return add_test_routes(create_app(settings, loaded=loaded))


if __name__ == "__main__":
    settings = load_settings()
    run_server(create_test_app(settings), settings)
