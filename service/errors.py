"""Domain exceptions and the one place that maps them to HTTP.

Every error the service returns has one shape (after OpenAI's and vLLM's ``ErrorResponse``)::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "parameters.top_k", "code": null}}

``message`` says what to change; ``param`` names the offending field when there is one. A 500 carries only a
generic message: the traceback goes to the log, never into the body.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.masks.errors import MaskError

log = logging.getLogger("maskserve.errors")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class MaskserveError(Exception):
    """Base class; status 500."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def headers(self) -> dict[str, str] | None:
        return None


class InvalidRequest(MaskserveError):
    """400: the request is well-formed JSON but asks for something impossible (names the param)."""

    status_code = 400
    error_type = "invalid_request_error"


class UnsupportedForModel(InvalidRequest):
    """400: the loaded model cannot do this (e.g. fill-mask on a decoder without an MNTP adapter)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param, code="unsupported_for_model")


class Unauthorized(MaskserveError):
    """401: API keys are configured and the request has no valid bearer key."""

    status_code = 401
    error_type = "authentication_error"

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(MaskserveError):
    """404: no such route or resource (e.g. an expired request id)."""

    status_code = 404
    error_type = "not_found_error"


class ModelNotFound(NotFound):
    """404 ``model_not_found``: a request names a model this server does not serve (as OpenAI and vLLM answer)."""

    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="model", code="model_not_found")


class PayloadTooLarge(MaskserveError):
    """413: the request body exceeds MASKSERVE_MAX_BODY_BYTES."""

    status_code = 413
    error_type = "invalid_request_error"


class Overloaded(MaskserveError):
    """429: the queue is full; retry after ``retry_after`` seconds (as TGI does)."""

    status_code = 429
    error_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message, code="queue_full")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)}


class NotReady(MaskserveError):
    """503: the model is still loading (or the server is shutting down)."""

    status_code = 503
    error_type = "unavailable_error"

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "5"}


class ClientGone(MaskserveError):
    """499 (nginx's "client closed request"): the client went away and its work was stopped; nobody reads this."""

    status_code = 499
    error_type = "client_closed"


class RequestTimeout(MaskserveError):
    """504: the request did not finish within MASKSERVE_REQUEST_TIMEOUT_S; its work was cancelled."""

    status_code = 504
    error_type = "timeout_error"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=error_type, param=param, code=code)).model_dump()


def error_response(exc: MaskserveError) -> JSONResponse:
    """The HTTP answer for a domain error (used by the handlers below and by the middleware)."""
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.param, exc.code), status_code=exc.status_code, headers=exc.headers()
    )


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """Summarise pydantic's error list in one sentence that names the field; returns (message, param, code)."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None, "invalid"
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"malformed JSON body: {ctx.get('error', 'could not parse')}", None, "json_invalid"
    param = _loc_to_param(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        message = f"'{param}' is required" if param else "request body is required"
    else:
        message = f"'{param}': {msg}" if param else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message, param, str(first.get("type", "invalid"))


def add_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(MaskserveError)
    async def _domain(_: Request, exc: MaskserveError) -> JSONResponse:
        if exc.status_code >= 500 and not isinstance(exc, NotReady | RequestTimeout):
            log.error("internal error: %s", exc.message)
        return error_response(exc)

    @app.exception_handler(MaskError)
    async def _mask(_: Request, exc: MaskError) -> JSONResponse:
        return error_response(InvalidRequest(str(exc), param=exc.param))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = validation_message(exc)
        status = 400 if code == "json_invalid" else 422
        return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)
