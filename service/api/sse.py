"""Server-sent events for generation, and noticing a client that went away (to cancel its work).

Starlette's ``StreamingResponse`` notices a closed connection only on its next write under ASGI 2.4 (uvicorn),
so :class:`EventStream` listens for ``http.disconnect`` itself and cancels the generation at once: the slot
frees at the next decode step. :func:`results_or_cancel` does the same for a request waiting on a full answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.engine.generate import GenerationResult
from service.engine.scheduler import GenerationHandle
from service.errors import MaskserveError, error_body


def sse_responses(description: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI entry of a route that answers JSON, or server-sent events with ``"stream": true``."""
    return {200: {"content": {"text/event-stream": {}}, "description": description}}


def sse(data: Any) -> str:
    """One event: a ``data:`` line holding JSON (or the literal ``[DONE]``), then a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """``text/event-stream`` that cancels the generation as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[Any], handle: GenerationHandle) -> None:
        self.handle = handle
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of tokens
        super().__init__(self._frames(events), headers=headers)

    async def _frames(self, events: AsyncIterator[Any]) -> AsyncIterator[str]:
        try:
            async for data in events:
                yield sse(data)
        except MaskserveError as exc:  # e.g. a timeout mid-stream: the error shape as the last event
            yield sse(error_body(exc.message, exc.error_type, exc.param, exc.code))
        finally:
            self.handle.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                await self.listen_for_disconnect(receive)
                self.handle.cancel()
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await self.stream_response(send)
            except OSError:  # the client is gone
                self.handle.cancel()
            group.cancel_scope.cancel()


async def disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def results_or_cancel(handle: GenerationHandle, request: Request) -> list[GenerationResult]:
    """Wait for the whole answer (every sequence's result, by index); cancel the generation if the client
    disconnects meanwhile."""

    async def watch() -> None:
        await disconnected(request)
        handle.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await handle.results()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
