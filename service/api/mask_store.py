"""The most recent requests' mask reports, for ``GET /v1/masks/{request_id}``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import Request


class MaskStore:
    """The most recent requests' mask reports (built lazily: only what GET /v1/masks/{id} asks for is computed)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Callable[[bool], dict[str, Any]]] = OrderedDict()

    def put(self, request_id: str, build: Callable[[bool], dict[str, Any]]) -> None:
        if self.capacity <= 0:
            return
        self._items[request_id] = build
        self._items.move_to_end(request_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, request_id: str) -> Callable[[bool], dict[str, Any]] | None:
        return self._items.get(request_id)


def mask_store(request: Request) -> MaskStore:
    store: MaskStore = request.app.state.mask_store
    return store
