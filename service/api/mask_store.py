"""The most recent requests' mask reports, for ``GET /v1/masks/{request_id}``, each readable only by its owner.

A report holds the request's text (its prompt, its tokens), so it is served only to the client that made it:

- with API keys (MASKSERVE_API_KEYS), every request's report is kept, bound to the key that sent it
  (``ApiKeyAuth`` puts a digest of the key in ``request.state.client_key``); another key gets 404;
- without keys, only the reports of requests that asked for ``return_masks`` are kept: the id is then the
  capability, so it is always one the server made (``gen-``/``fm-`` + 128 random bits, answered in the body and
  in ``X-Masks-ID``), never the client's ``X-Request-ID`` (a correlation label, guessable and shared).

An id is stored once: a second ``put`` under it is refused, so no entry can be overwritten.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import Request

MASKS_ID_HEADER = "X-Masks-ID"

Report = Callable[[bool], dict[str, Any]]  # dense -> the report (built lazily: only what GET asks for)


class MaskStore:
    """The most recent requests' mask reports, each under its owner (None: whoever holds the id)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[str | None, Report]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, request_id: str, build: Report, owner: str | None = None) -> bool:
        """Keep ``build`` under ``request_id`` for ``owner``; False (and nothing kept) if the id is taken."""
        if self.capacity <= 0 or request_id in self._items:
            return False
        self._items[request_id] = (owner, build)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return True

    def get(self, request_id: str, owner: str | None = None) -> Report | None:
        """The report builder, if ``owner`` made the request (another owner sees nothing, as if it had expired)."""
        item = self._items.get(request_id)
        if item is None or item[0] != owner:
            return None
        return item[1]


def mask_store(request: Request) -> MaskStore:
    store: MaskStore = request.app.state.mask_store
    return store


def client_key(request: Request) -> str | None:
    """Who is asking: a digest of the request's API key (None without keys)."""
    key = getattr(request.state, "client_key", None)
    return str(key) if key is not None else None


def keep_report(request: Request, request_id: str, build: Report, *, asked: bool) -> bool:
    """Keep a request's report for its owner when it can be served privately (see the module docstring);
    True if kept (the route then names the id in ``X-Masks-ID``)."""
    owner = client_key(request)
    if owner is None and not asked:
        return False
    return mask_store(request).put(request_id, build, owner)
