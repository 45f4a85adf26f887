"""Attention masks of a batch of requests, assembled from each request's :class:`RequestAttention`.

- :func:`batch_attention`: one forward over several prompts, left-padded (the decode loop's prefill, causal)
  or right-padded (fill-mask rows, bidirectional);
- :class:`DecodeMask`: a running batch's keys as requests join, leave and grow by one column per decode step;
- :class:`ScopedBias`: a key bias on chosen layers/heads only, added inside attention
  (``service/engine/steering.py``) since one 4D mask is shared by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor

from service.masks.attention import PaddingSide, bidirectional_mask, causal_mask, padding_mask, to_4d, to_additive
from service.masks.constraints import RequestAttention

# A running batch keeps every row right-aligned: row b's cached keys are the last L_b columns of the batch's
# S columns, and the columns before them are left padding that the row never attends. Requests join (left-pad
# the narrower side), leave (drop their rows, then the leading columns no row attends any more) and grow by one
# column per decode step. These functions are the only place that builds those masks; the engine moves the KV
# cache in step with them.


def _pad_rows(
    values: Sequence[Tensor], width: int, fill: float | bool | int, like: Tensor, side: PaddingSide = "left"
) -> Tensor:
    """Stack 1D rows in ``width`` columns, padded on ``side`` (left: right-aligned).  # -> (B, width)"""
    out = torch.full((len(values), width), fill, dtype=like.dtype, device=like.device)  # (B, S)
    for b, row in enumerate(values):
        if len(row):
            start = width - len(row) if side == "left" else 0
            out[b, start : start + len(row)] = row
    return out


def _pad_left(x: Tensor, width: int, fill: float | bool) -> Tensor:
    """(B, S) -> (B, width), new columns on the left filled with ``fill``."""
    if x.shape[1] == width:
        return x
    pad = torch.full((x.shape[0], width - x.shape[1]), fill, dtype=x.dtype, device=x.device)  # (B, width - S)
    return torch.cat([pad, x], dim=1)  # (B, width)


def _as_mask(keys: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Bool mask as it is, or, with a bias, additive: the bias where attended, dtype's min where blocked."""
    if bias is None:
        return keys
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=keys.device)
    return torch.where(keys, bias.to(dtype), blocked)


@dataclass(frozen=True)
class ScopedBias:
    """A key bias that applies only on some layers and heads (emphasis on chosen layers/heads).

    One 4D mask is shared by every layer, so such a bias cannot ride in it: the engine's attention function
    (service/engine/steering.py) adds :meth:`for_layer` to the mask inside each layer.
    ``bias`` (B, S) float: additive per key; ``scope`` (B, L, H) bool: row b's bias applies on layer l, head h.
    """

    bias: Tensor
    scope: Tensor

    @cached_property
    def layers(self) -> frozenset[int]:
        """The layers where some row has the bias (read once per forward: one device sync, not one a layer)."""
        return frozenset(int(i) for i in self.scope.any(dim=2).any(dim=0).nonzero().flatten().tolist())

    def for_layer(self, layer: int) -> Tensor | None:
        """The bias one layer adds to its attention scores, None where no row has it.  # -> (B, H, 1, S)"""
        if layer not in self.layers:
            return None
        on = self.scope[:, layer, :]  # (B, H)
        return self.bias[:, None, None, :] * on[:, :, None, None].to(self.bias.dtype)  # (B, H, 1, S)


def _row_scopes(rows: Sequence[RequestAttention]) -> Tensor | None:
    """Per row, where its key bias applies: (B, L, H) bool, or None when every row's applies everywhere.
    Rows without a scope (or without a bias: theirs is 0) get all True."""
    scoped = [r.bias_scope for r in rows if r.bias_scope is not None]
    if not scoped:
        return None
    every = torch.ones_like(scoped[0])  # (L, H)
    return torch.stack([r.bias_scope if r.bias_scope is not None else every for r in rows])  # (B, L, H)


def _row_biases(
    rows: Sequence[RequestAttention],
    width: int,
    dtype: torch.dtype,
    device: torch.device | None,
    side: PaddingSide = "left",
) -> Tensor:
    """Every row's key bias in ``width`` columns, 0 where a row has none (and on padding).  # -> (B, width)"""
    zeros = torch.zeros(width, dtype=dtype, device=device)
    values = [r.key_bias.to(device=device, dtype=dtype) if r.key_bias is not None else zeros[: r.length] for r in rows]
    return _pad_rows(values, width, 0.0, zeros, side)


class BatchMasks(NamedTuple):
    mask: Tensor  # (B, 1, T, T) bool, or additive float (with ``additive``, or when a row has a key bias)
    positions: Tensor  # (B, T) long, 0 on padding
    scoped_bias: ScopedBias | None  # a key bias on chosen layers/heads only (not in ``mask``)
    key_mask: Tensor  # (B, T) bool, True = a real token


def batch_attention(
    rows: Sequence[RequestAttention],
    *,
    dtype: torch.dtype,
    side: PaddingSide = "left",
    causal: bool = True,
    additive: bool = False,
    device: torch.device | None = None,
) -> BatchMasks:
    """Masks for one forward over several requests' prompts, ``T`` being the longest; every row's own
    structure, positions and key bias (compiled once per request) are placed where its tokens sit.

    Left padding with a causal base is the decode loop's prefill (the cache stays right-aligned); right padding
    with a bidirectional base is fill-mask's rows (an encoder's own position ids then do not depend on the
    batch). A key bias on all layers is added to the mask; once any row scopes its bias to chosen layers/heads,
    every row's bias moves to ``scoped_bias`` and the mask stays free of it. ``additive``: a float mask even
    without a bias (the eager attention path only adds a float mask).
    """
    if not rows:
        raise ValueError("no rows to assemble")
    width = max(r.length for r in rows)
    key_mask = padding_mask([r.length for r in rows], width, side=side, device=device)  # (B, T)
    base = causal_mask(width, device=device) if causal else bidirectional_mask(width, device=device)  # (T, T)
    structure = base.repeat(len(rows), 1, 1)  # (B, T, T)
    positions = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # (B, T)
    for b, row in enumerate(rows):
        start = width - row.length if side == "left" else 0
        end = start + row.length
        if row.structure is not None:
            if tuple(row.structure.shape) != (row.length, row.length):
                raise ValueError(f"row {b}: structure must be ({row.length}, {row.length})")
            structure[b, start:end, start:end] = row.structure
        own = row.positions if row.positions is not None else torch.arange(row.length, device=device)
        positions[b, start:end] = own
    mask = to_4d(key_mask, structure)  # (B, 1, T, T)
    if all(r.key_bias is None for r in rows):
        return BatchMasks(to_additive(mask, dtype) if additive else mask, positions, None, key_mask)
    bias = _row_biases(rows, width, dtype, device, side)  # (B, T)
    scope = _row_scopes(rows)
    if scope is None:
        return BatchMasks(_as_mask(mask, bias[:, None, None, :], dtype), positions, None, key_mask)  # (B, 1, T, T)
    return BatchMasks(to_additive(mask, dtype), positions, ScopedBias(bias, scope.to(device)), key_mask)


@dataclass(frozen=True)
class DecodeMask:
    """Which cached keys each row of a running batch may attend, as the batch changes step by step.

    ``keys`` (B, S) bool: row b may attend column s (left padding and excluded keys are False);
    ``bias`` (B, S) float or None: additive bias per key (None when no row has one);
    ``scope`` (B, L, H) bool or None: the layers x heads each row's bias applies on (None: all of them).
    Every method returns a new DecodeMask; nothing is changed in place.
    """

    keys: Tensor
    bias: Tensor | None = None
    scope: Tensor | None = None

    @classmethod
    def for_prompts(
        cls, rows: Sequence[RequestAttention], *, dtype: torch.dtype, device: torch.device | None = None
    ) -> DecodeMask:
        """After a prefill of ``rows`` (left-padded to the longest): what generated tokens may attend."""
        width = max(r.length for r in rows)
        like = torch.ones(0, dtype=torch.bool, device=device)
        keys = _pad_rows(
            [r.decode_keys if r.decode_keys is not None else like.new_ones(r.length) for r in rows], width, False, like
        )  # (B, S)
        if all(r.key_bias is None for r in rows):
            return cls(keys)
        scope = _row_scopes(rows)
        return cls(keys, _row_biases(rows, width, dtype, device), None if scope is None else scope.to(device))

    @property
    def width(self) -> int:
        return int(self.keys.shape[1])

    def extend(self) -> DecodeMask:
        """One more column: the token fed this step, which every row attends (its own new key).  # (B, S + 1)"""
        col = self.keys.new_ones(self.keys.shape[0], 1)  # (B, 1)
        bias = None if self.bias is None else torch.cat([self.bias, self.bias.new_zeros(self.bias.shape[0], 1)], 1)
        return DecodeMask(torch.cat([self.keys, col], dim=1), bias, self.scope)  # (B, S + 1)

    def select(self, index: Tensor) -> DecodeMask:
        """Keep the rows in ``index`` (requests that leave are dropped).  # (B', S)"""
        scope = None if self.scope is None else self.scope[index]
        if scope is not None and bool(scope.all()):  # the scoped rows left: the bias can ride in the mask again
            scope = None
        return DecodeMask(self.keys[index], None if self.bias is None else self.bias[index], scope)

    def join(self, other: DecodeMask) -> DecodeMask:
        """Stack another batch below this one, left-padding the narrower side.  # (B + B', max(S, S'))"""
        width = max(self.width, other.width)
        keys = torch.cat([_pad_left(self.keys, width, False), _pad_left(other.keys, width, False)], dim=0)
        if self.bias is None and other.bias is None:
            return DecodeMask(keys)
        dtype = (self.bias if self.bias is not None else other.bias).dtype  # type: ignore[union-attr]
        biases = [m.bias if m.bias is not None else torch.zeros(m.keys.shape, dtype=dtype, device=m.keys.device)
                  for m in (self, other)]  # fmt: skip
        bias = torch.cat([_pad_left(b, width, 0.0) for b in biases], dim=0)  # (B + B', S)
        if self.scope is None and other.scope is None:
            return DecodeMask(keys, bias)
        shape = (self.scope if self.scope is not None else other.scope).shape[1:]  # type: ignore[union-attr]
        scopes = [m.scope if m.scope is not None else m.keys.new_ones(m.keys.shape[0], *shape) for m in (self, other)]
        return DecodeMask(keys, bias, torch.cat(scopes, dim=0))  # scope (B + B', L, H)

    def unused_columns(self) -> int:
        """How many leading columns no row attends (and never will: rows only ever gain columns on the right)."""
        used = self.keys.any(dim=0)  # (S,)
        return int(used.long().argmax()) if bool(used.any()) else self.width

    def drop_leading(self, n: int) -> DecodeMask:
        """Drop the first ``n`` columns.  # (B, S - n)"""
        return DecodeMask(self.keys[:, n:], None if self.bias is None else self.bias[:, n:], self.scope)

    def to_4d(self, dtype: torch.dtype) -> Tensor:
        """The mask for a one-token decode step; a scoped bias is left to :meth:`scoped_bias`.
        # -> (B, 1, 1, S), bool or additive ``dtype``"""
        keys = self.keys[:, None, None, :]  # (B, 1, 1, S)
        if self.bias is not None and self.scope is not None:
            return _as_mask(keys, torch.zeros_like(keys, dtype=dtype), dtype)
        return _as_mask(keys, None if self.bias is None else self.bias[:, None, None, :], dtype)

    def scoped_bias(self) -> ScopedBias | None:
        """The key bias to add inside chosen layers/heads, or None when it rides in :meth:`to_4d`."""
        if self.bias is None or self.scope is None:
            return None
        return ScopedBias(self.bias, self.scope)
