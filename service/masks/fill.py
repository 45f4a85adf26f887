"""The masks of a fill-mask forward: pure functions, no model, no tokenizer.

- input mask: the placeholder at a masked position is widened to ``n`` mask tokens (multi-token targets,
  whole-word fills) and filled left to right (:func:`expand_mask`);
- attention mask: right padding + a bidirectional structure, as one additive 4D mask with explicit position
  ids (:func:`fill_attention`), so a row's scores do not depend on what it is batched with;
- read positions: an encoder predicts position i from its own output; an MNTP decoder from the output at
  i-1 (:func:`read_position`);
- output mask: which vocabulary entries may fill a position (:func:`restrict_vocab`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from service.masks.attention import bidirectional_mask, padding_mask, position_ids, to_4d, to_additive


class FillAttention(NamedTuple):
    key_mask: Tensor  # (B, S) bool, True = real token
    attention: Tensor  # (B, 1, S, S) additive float: 0 = attend, dtype min = padding
    position_ids: Tensor  # (B, S) long, 0.. over real tokens


def fill_attention(lengths: Sequence[int], dtype: torch.dtype, device: torch.device | None = None) -> FillAttention:
    """Masks for a right-padded batch read bidirectionally (encoders, MNTP decoders).

    Additive rather than bool: SDPA takes both, the eager attention path only adds a float mask.
    """
    key = padding_mask(lengths, side="right", device=device)  # (B, S)
    width = key.shape[1]
    attention = to_additive(to_4d(key, bidirectional_mask(width, device=device)), dtype)  # (B, 1, S, S)
    return FillAttention(key, attention, position_ids(key))


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
