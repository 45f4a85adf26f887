"""Structured logs: one JSON object per line, on stderr, with the request id of the request being served.

``configure_logging(level)`` installs the JSON formatter on the root logger and routes uvicorn's loggers through
it (``maskserve serve`` calls it and starts uvicorn with ``log_config=None, access_log=False``: the access line
comes from ``service.middleware.RequestContext`` instead). ``REQUEST_ID`` is a context variable set for the
duration of each request, so any log record emitted while serving it (a route, the 500 handler) carries the id.
Fields a caller passes as ``extra={"fields": {...}}`` become top-level keys of the JSON line.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str | None] = ContextVar("maskserve_request_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str) -> None:
    """Send every logger (ours, uvicorn's, libraries') through one JSON handler on stderr, and turn off the
    progress bars transformers draws while loading weights: a log collector would read them as garbage lines.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
