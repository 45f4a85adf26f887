"""The masks of a fill-mask forward: pure functions, no model, no tokenizer.

- input mask: the placeholder at a masked position is widened to ``n`` mask tokens (multi-token targets,
  whole-word fills) and filled left to right (:func:`expand_mask`);
- attention mask: right padding + a bidirectional structure, as one additive 4D mask with explicit position
  ids (:func:`fill_attention`), so a row's scores do not depend on what it is batched with; a request's
  attention constraints (exclude, isolate, emphasis), compiled once per request for every width a search
  gives its masks (:func:`compile_fill_attention`), shape its rows (:func:`check_fill_constraints` first);
- read positions: an encoder predicts position i from its own output; an MNTP decoder from the output at
  i-1 (:func:`read_position`);
- output mask: which vocabulary entries may fill a position (:func:`restrict_vocab`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from service.masks.batch import ScopedBias, batch_attention
from service.masks.constraints import AttentionConstraints, RequestAttention, TokenSpan, request_attention
from service.masks.errors import MaskError


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
    rows: Sequence[RequestAttention | None] | None = None,
    *,
    causal: bool = False,
) -> FillAttention:
    """Masks for a right-padded batch read bidirectionally (encoders, MNTP decoders; ``causal``: the base
    decoder scoring whole sentences, the whole-word rerank): the batch assembly of ``service/masks/batch.py``
    over each row's compiled constraints (None: unconstrained).

    Additive rather than bool: SDPA takes both, the eager attention path only adds a float mask.
    """
    compiled = [r if r is not None else RequestAttention(n) for n, r in zip(lengths, rows or [None] * len(lengths),
                                                                             strict=True)]  # fmt: skip
    masks = batch_attention(compiled, dtype=dtype, side="right", causal=causal, additive=True, device=device)
    restarted = any(r.positions is not None for r in compiled)
    return FillAttention(masks.key_mask, masks.mask, masks.positions, masks.scoped_bias, restarted)


@dataclass(frozen=True)
class FillRowAttention:
    """One fill-mask input's attention constraints, compiled once per request: the input as written
    (``base``) and, for each mask a search widens to ``1 + extra`` tokens, the widened input."""

    base: RequestAttention
    widened: Mapping[tuple[int, int], RequestAttention]  # (mask index, extra) -> the widened input's

    def at(self, index: int, extra: int) -> RequestAttention:
        return self.base if extra == 0 else self.widened[(index, extra)]


def compile_fill_attention(
    constraints: AttentionConstraints,
    n: int,
    mask_indices: Sequence[int],
    extras: Sequence[int],
    dtype: torch.dtype,
    dims: tuple[int, int] = (0, 0),
) -> FillRowAttention | None:
    """Compile an input's constraints for every geometry its searches use (None when there are none).
    ``dims`` (layers, heads) sizes the scope of emphasis on chosen layers/heads."""

    def compile_one(c: AttentionConstraints, length: int) -> RequestAttention:
        row = request_attention(length, c, dtype, causal=False, n_layers=dims[0], n_heads=dims[1])
        assert row is not None  # widening keeps every span
        return row

    if constraints.empty:
        return None
    widened = {
        (i, extra): compile_one(widen_constraints(constraints, i, extra), n + extra)
        for i in mask_indices
        for extra in extras
        if extra > 0
    }
    return FillRowAttention(compile_one(constraints, n), widened)


def widen_constraints(constraints: AttentionConstraints, index: int, extra: int) -> AttentionConstraints:
    """Follow :func:`expand_mask`: the one token at ``index`` becomes ``1 + extra`` tokens. Spans after it
    shift by ``extra``; a span that holds it grows by ``extra``. Every span group moves (``map_spans``)."""
    if extra == 0 or constraints.empty:
        return constraints
    return constraints.map_spans(
        lambda s: TokenSpan(s.start + extra if s.start > index else s.start, s.end + extra if s.end > index else s.end)
    )


def check_fill_constraints(constraints: AttentionConstraints, mask_indices: Sequence[int], *, mntp: bool) -> None:
    """An excluded span must not hold a mask, nor (MNTP) the token before one, where its prediction is read:
    the prediction would then see only the span. Raises MaskError naming the span."""
    reads = {read_position(i, mntp=mntp) for i in mask_indices} | set(mask_indices)
    for k, span in enumerate(constraints.exclude):
        if any(span.start <= r < span.end for r in reads):
            where = "a mask" + (" or the token just before one (where this model reads it)" if mntp else "")
            raise MaskError(f"attention.exclude[{k}]", f"covers {where}; exclude only context around the masks")


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
