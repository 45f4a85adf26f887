"""The masks of a fill-mask forward: pure functions, no model, no tokenizer.

- input mask: the placeholder at a masked position is widened to ``n`` mask tokens (multi-token targets,
  whole-word fills) and filled left to right (:func:`expand_mask`);
- attention mask: right padding + a bidirectional structure, as one additive 4D mask with explicit position
  ids (:func:`fill_attention`), so a row's scores do not depend on what it is batched with; a request's
  attention constraints (exclude, isolate, emphasis) shape its rows' structure, and follow a mask as it is
  widened (:func:`widen_constraints`, :func:`check_fill_constraints`);
- read positions: an encoder predicts position i from its own output; an MNTP decoder from the output at
  i-1 (:func:`read_position`);
- output mask: which vocabulary entries may fill a position (:func:`restrict_vocab`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from service.masks.attention import (
    AttentionConstraints,
    ScopedBias,
    SpanError,
    TokenSpan,
    bidirectional_mask,
    padding_mask,
    position_ids,
    request_attention,
    to_4d,
    to_additive,
)


class FillAttention(NamedTuple):
    key_mask: Tensor  # (B, S) bool, True = real token
    attention: Tensor  # (B, 1, S, S) additive float: 0 = attend, dtype min = padding (+ emphasis on all layers)
    position_ids: Tensor  # (B, S) long, 0.. over real tokens (restarting per segment with restart_positions)
    scoped_bias: ScopedBias | None = None  # emphasis on chosen layers/heads (service/engine/steering.py adds it)
    restarted: bool = False  # some row's positions restart per segment: encoders must be given position_ids


def fill_attention(
    lengths: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | None = None,
    constraints: Sequence[AttentionConstraints | None] | None = None,
    dims: tuple[int, int] = (0, 0),
) -> FillAttention:
    """Masks for a right-padded batch read bidirectionally (encoders, MNTP decoders).

    ``constraints`` (one per row, in that row's token positions) narrow a row's structure, bias its keys and
    restart its positions; ``dims`` (layers, heads) sizes the scope of emphasis on chosen layers/heads.
    Additive rather than bool: SDPA takes both, the eager attention path only adds a float mask.
    """
    key = padding_mask(lengths, side="right", device=device)  # (B, S)
    width = key.shape[1]
    rows = [
        request_attention(n, c, dtype, causal=False, n_layers=dims[0], n_heads=dims[1]) if c is not None else None
        for n, c in zip(lengths, constraints or [None] * len(lengths), strict=True)
    ]
    if all(r is None for r in rows):
        attention = to_additive(to_4d(key, bidirectional_mask(width, device=device)), dtype)  # (B, 1, S, S)
        return FillAttention(key, attention, position_ids(key))
    structure = bidirectional_mask(width, device=device).repeat(len(lengths), 1, 1)  # (B, S, S)
    positions = position_ids(key)  # (B, S)
    bias = torch.zeros(len(lengths), width, dtype=dtype, device=device)  # (B, S)
    scope: list[Tensor | None] = []
    for b, row in enumerate(rows):
        scope.append(row.bias_scope if row is not None else None)
        if row is None:
            continue
        n = row.length
        if row.structure is not None:
            structure[b, :n, :n] = row.structure.to(device)
        if row.positions is not None:
            positions[b, :n] = row.positions.to(device)
        if row.key_bias is not None:
            bias[b, :n] = row.key_bias.to(device=device, dtype=dtype)
    attention = to_additive(to_4d(key, structure), dtype)  # (B, 1, S, S)
    restarted = any(r is not None and r.positions is not None for r in rows)
    scoped = [s for s in scope if s is not None]
    if not scoped:
        return FillAttention(key, attention + bias[:, None, None, :], positions, None, restarted)
    every = torch.ones_like(scoped[0])  # (L, H): rows without a scope (or a bias: theirs is 0) apply it on all
    scopes = torch.stack([s if s is not None else every for s in scope]).to(device)  # (B, L, H)
    return FillAttention(key, attention, positions, ScopedBias(bias, scopes), restarted)


def widen_constraints(constraints: AttentionConstraints, index: int, extra: int) -> AttentionConstraints:
    """Follow :func:`expand_mask`: the one token at ``index`` becomes ``1 + extra`` tokens. Spans after it
    shift by ``extra``; a span that holds it grows by ``extra``."""
    if extra == 0 or constraints.empty:
        return constraints

    def move(spans: tuple[TokenSpan, ...]) -> tuple[TokenSpan, ...]:
        return tuple(
            TokenSpan(s.start + extra if s.start > index else s.start, s.end + extra if s.end > index else s.end)
            for s in spans
        )

    return replace(
        constraints,
        exclude=move(constraints.exclude),
        isolate=move(constraints.isolate),
        emphasis=move(constraints.emphasis),
    )


def check_fill_constraints(constraints: AttentionConstraints, mask_indices: Sequence[int], *, mntp: bool) -> None:
    """An excluded span must not hold a mask, nor (MNTP) the token before one, where its prediction is read:
    the prediction would then see only the span. Raises SpanError naming the span."""
    reads = {read_position(i, mntp=mntp) for i in mask_indices} | set(mask_indices)
    for k, span in enumerate(constraints.exclude):
        if any(span.start <= r < span.end for r in reads):
            where = "a mask" + (" or the token just before one (where this model reads it)" if mntp else "")
            raise SpanError(f"attention.exclude[{k}]", f"covers {where}; exclude only context around the masks")


def read_position(mask_index: int, *, mntp: bool) -> int:
    """Where the prediction for the token at ``mask_index`` is read.

    MNTP reads it one step earlier: the output at i-1 is what a causal LM's head already uses to predict
    token i, so the pretrained head keeps its meaning (LLM2Vec, BehnamGhader et al. 2024).
    """
    read = mask_index - 1 if mntp else mask_index
    if read < 0:
        raise ValueError("an MNTP mask needs a token before it (a prefix token)")
    return read


def expand_mask(ids: Sequence[int], index: int, filled: Sequence[int], n_masks: int, mask_id: int) -> list[int]:
    """Replace the one mask token at ``index`` by ``filled`` followed by ``n_masks`` mask tokens.

    ``expand_mask([a, M, b], 1, [x], 2, M) == [a, x, M, M, b]``: sub-token ``len(filled)`` of a word of
    ``len(filled) + n_masks`` sub-tokens is predicted next, at position ``index + len(filled)``.
    """
    if ids[index] != mask_id:
        raise ValueError(f"position {index} holds {ids[index]}, not the mask token {mask_id}")
    return [*ids[:index], *filled, *([mask_id] * n_masks), *ids[index + 1 :]]


def restrict_vocab(log_probs: Tensor, allowed: Tensor) -> Tensor:
    """Blocked vocabulary entries get -inf; probabilities are not renormalised.  (N, V), (V,) -> (N, V)"""
    return log_probs.masked_fill(~allowed, float("-inf"))
