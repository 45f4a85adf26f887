"""Pure ASGI middleware that applies to every route: request ids, access logs and metrics, CORS, API keys, body limit.

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``: each layer only wraps ``receive``/``send``, never
buffers a body and never runs the app in another task, so streamed responses (SSE) and client disconnects
pass through untouched.

The stack, outermost first (``wrap()``, called by ``service.app.ServiceApp``)::

    RequestContext → CORS (only when MASKSERVE_CORS_ORIGINS is set) → ApiKeyAuth → BodyLimit
        → Starlette's own stack (ServerErrorMiddleware → ExceptionMiddleware → router)

``RequestContext`` sits outside Starlette's ServerErrorMiddleware so that even a 500 carries ``X-Request-ID``
and is counted and logged; CORS sits outside the key check because a browser's preflight ``OPTIONS`` never
carries credentials; the key is checked before a single body byte is read.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi.routing import iter_route_contexts
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.errors import InvalidRequest, MaskserveError, PayloadTooLarge, Unauthorized, error_response
from service.logs import REQUEST_ID
from service.metrics import IN_FLIGHT, REQUEST_LATENCY, REQUESTS

log = logging.getLogger("maskserve.access")

# Probes must work without a key: the kubelet cannot send one.
# The playground is a static page: public; the API calls it makes need the key (it has a field for it).
PUBLIC_PATHS = frozenset({"/health", "/ready", "/playground"})
REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is echoed only if it is short and plain, so it cannot forge log fields or header lines.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")
# When MASKSERVE_LOG_REQUEST_TEXT is on, at most this much of each request body goes into its log line.
LOGGED_BODY_CHARS = 2000
UNMATCHED_ROUTE = "unmatched"  # one label for every 404, so scanners cannot blow up the metric's cardinality


def _route_template(scope: Scope) -> str:
    """The path template of the route that serves (or would serve) the request: a bounded metric label.

    Matched here, before the app runs, rather than read from ``scope["route"]`` afterwards: that is unset for a
    request refused before routing (401, 413) and, for a router included with a prefix, lacks the prefix.
    """
    partial = None
    for context in iter_route_contexts(scope["app"].routes if "app" in scope else []):
        match, _ = context.matches(scope)
        if match is Match.FULL:
            return context.path_format or UNMATCHED_ROUTE
        if match is Match.PARTIAL and partial is None:
            partial = context.path_format  # a 405: right path, wrong method
    return partial or UNMATCHED_ROUTE


async def _send_error(exc: MaskserveError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(exc)(scope, receive, send)


class RequestContext:
    """Request id (accepted from ``X-Request-ID`` or generated, echoed, in ``request.state.request_id``), one
    JSON access-log line per request, and the Prometheus request counter, latency histogram and in-flight gauge.
    """

    def __init__(self, app: ASGIApp, *, log_request_text: bool) -> None:
        self.app = app
        self.log_request_text = log_request_text

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = incoming if incoming and _CLIENT_ID.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_ID.set(request_id)
        template = _route_template(scope)
        started = time.perf_counter()
        status: int | None = None
        request_bytes = response_bytes = 0
        disconnected = False
        body_sample = bytearray()

        async def receive_counted() -> Message:
            nonlocal request_bytes, disconnected
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                request_bytes += len(chunk)
                if self.log_request_text and len(body_sample) < LOGGED_BODY_CHARS:
                    body_sample.extend(chunk[: LOGGED_BODY_CHARS - len(body_sample)])
            elif message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def send_tagged(message: Message) -> None:
            nonlocal status, response_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            elif message["type"] == "http.response.body":
                response_bytes += len(message.get("body", b""))
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive_counted, send_tagged)
        except Exception:
            # Starlette's ServerErrorMiddleware has already answered 500 through the project's handler (which
            # logged the traceback) and re-raises only so a server can log it again. Answer if nobody has, and
            # stop the exception here: the traceback is in the log once, with the request id.
            if status is None:
                await _send_error(MaskserveError("internal server error"), scope, receive, send_tagged)
        finally:
            IN_FLIGHT.dec()
            elapsed = time.perf_counter() - started
            # 499 (nginx's "client closed request"): the client left before any response began.
            final_status = status if status is not None else 499
            REQUESTS.labels(route=template, status=str(final_status)).inc()
            REQUEST_LATENCY.labels(route=template).observe(elapsed)
            fields: dict[str, Any] = {
                "method": scope["method"],
                "route": template,
                "path": scope["path"],
                "status": final_status,
                "latency_ms": round(elapsed * 1000, 2),
                "request_bytes": request_bytes,
                "response_bytes": response_bytes,
            }
            if disconnected:
                fields["client_disconnected"] = True
            if self.log_request_text:
                fields["request_text"] = body_sample.decode("utf-8", errors="replace")
            log.log(logging.WARNING if final_status >= 500 else logging.INFO, "request", extra={"fields": fields})
            REQUEST_ID.reset(token)


class ApiKeyAuth:
    """``Authorization: Bearer <key>`` on every route but the probes; 401 in the error shape otherwise."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [key.encode("utf-8") for key in keys]

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = (Headers(scope=scope).get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = token.strip().encode("latin-1", errors="replace")
        # Constant-time comparison against every key, without stopping at a match, so timing reveals neither
        # the key's bytes nor which key matched (only a length mismatch is visible, as hmac's docs note).
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(presented, key)
        if matched:
            # Who owns what this request leaves behind (its mask report): a digest, so the key itself is
            # kept nowhere but in the settings.
            scope.setdefault("state", {})["client_key"] = hashlib.sha256(presented).hexdigest()
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        message = "missing or invalid API key: send 'Authorization: Bearer <key>'"
        await _send_error(Unauthorized(message), scope, receive, send)


class BodyLimit:
    """413 for a body over ``max_bytes``: at once from ``Content-Length``, or while counting a chunked body.

    Not FastAPI's own ``max_body_size``: that one answers in FastAPI's ``{"detail": ...}`` shape and runs before
    the key check. Here an oversized chunked body makes ``receive`` raise; whatever the app then answers
    (FastAPI turns a failed body read into a 400) is dropped and replaced by the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body is larger than {self.max_bytes} bytes; send a smaller one")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_error(InvalidRequest("Content-Length must be a whole number"), scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await _send_error(self._too_large(), scope, receive, send)
                return

        received = 0
        exceeded = False
        response_started = False

        async def receive_limited() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise self._too_large()
            return message

        async def send_unless_exceeded(message: Message) -> None:
            nonlocal response_started
            if exceeded and not response_started:
                return  # the app's answer to the aborted read; the 413 goes out below instead
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive_limited, send_unless_exceeded)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not response_started:
            await _send_error(self._too_large(), scope, receive, send)


def wrap(app: ASGIApp, settings: Settings) -> ASGIApp:
    """Wrap the app in the middleware the settings ask for (see the module docstring for the order)."""
    app = BodyLimit(app, settings.max_body_bytes)
    if settings.api_keys:
        app = ApiKeyAuth(app, settings.api_keys)
    if settings.cors_origins:
        app = CORSMiddleware(
            app,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER, "Retry-After"],
        )
    return RequestContext(app, log_request_text=settings.log_request_text)
