"""The running batch's KV cache: rows right-aligned, appended in place, joined and split between steps.

transformers' ``DynamicLayer`` appends with ``torch.cat``, copying the whole cache every step (at 32 rows of a
few hundred tokens that is ~0.4 GB of copies a step for SmolLM2). ``BatchLayer`` keeps each layer's keys and
values in a buffer with spare columns, writes a step's new column in place and hands attention a view. Rows
are right-aligned like :class:`service.masks.attention.DecodeMask`: joining left-pads the narrower side with
zeros (finite, and masked), leaving drops rows, and leading columns no row attends any more are dropped.
The cache and the DecodeMask always change together; the engine calls both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

GROWTH = 64  # spare columns allocated at a time: one reallocation per 64 decode steps


class BatchLayer(DynamicLayer):
    """One layer's keys and values: buffers ``(B, H, capacity, D)``, the first ``length`` columns in use."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self._k = self._v = torch.empty(0)

    def _set(self, k: Tensor, v: Tensor, length: int) -> tuple[Tensor, Tensor]:
        self._k, self._v, self.length = k, v, length
        keys, values = k[:, :, :length], v[:, :, :length]  # views: (B, H, S, D)
        self.keys, self.values = keys, values
        self.device = k.device
        self.is_initialized = True
        return keys, values

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, t, d = key_states.shape
        k = key_states.new_zeros(b, h, t + GROWTH, d)
        self._set(k, torch.zeros_like(k), 0)

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[2]:  # out of spare columns: move to a bigger buffer
            capacity = end + GROWTH
            self._set(_widen(self._k, self.length, capacity), _widen(self._v, self.length, capacity), self.length)
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        return self._set(self._k, self._v, end)

    def get_seq_length(self) -> int:
        return self.length

    def select(self, index: Tensor) -> None:
        self._set(self._k[index], self._v[index], self.length)

    def drop_leading(self, n: int) -> None:
        self._set(self._k[:, :, n:], self._v[:, :, n:], self.length - n)


def _widen(buf: Tensor, used: int, capacity: int, left: int = 0) -> Tensor:
    """Copy the first ``used`` columns of ``buf`` into a zeroed buffer of ``capacity`` columns, at ``left``."""
    b, h, _, d = buf.shape
    out = buf.new_zeros(b, h, capacity, d)  # (B, H, capacity, D)
    out[:, :, left : left + used] = buf[:, :, :used]
    return out


class BatchKVCache(Cache):
    """A transformers ``Cache`` of :class:`BatchLayer` s, with the batch operations continuous batching needs."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[BatchLayer() for _ in range(num_layers)])

    @property
    def batch_layers(self) -> Sequence[BatchLayer]:
        return self.layers  # type: ignore[return-value]

    @property
    def width(self) -> int:
        return self.batch_layers[0].length

    def select(self, index: Tensor) -> None:
        """Keep only the rows in ``index`` (in that order)."""
        for layer in self.batch_layers:
            layer.select(index)

    def drop_leading(self, n: int) -> None:
        """Drop the first ``n`` columns (no row attends them any more)."""
        if n:
            for layer in self.batch_layers:
                layer.drop_leading(n)

    def join(self, other: BatchKVCache) -> None:
        """Append ``other``'s rows below ours; both sides right-aligned to the wider one."""
        width = max(self.width, other.width)
        for mine, theirs in zip(self.batch_layers, other.batch_layers, strict=True):
            capacity = width + GROWTH
            ks = [_widen(x._k, x.length, capacity, width - x.length) for x in (mine, theirs)]
            vs = [_widen(x._v, x.length, capacity, width - x.length) for x in (mine, theirs)]
            mine._set(torch.cat(ks, dim=0), torch.cat(vs, dim=0), width)
