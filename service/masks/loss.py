"""Loss masks: which positions count in the loss, and how much.

Conventions (shared by every fine-tuning objective):
- ``targets`` is ``(B, T)`` long: the token the output at position t must predict, IGNORE_INDEX where nothing;
- ``weights`` is ``(B, T)`` float: the weight of position t's loss term, 0 where the target is ignored.

Decoders predict from the previous position (causal LM: t+1 from t; MNTP: masked token i from i-1, LLM2Vec,
BehnamGhader et al. 2024), so their targets are the labels shifted left by one; with packing, a shift that
would cross into the next packed example is cut. Pure functions: tensors in, tensors out, no model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from service.masks.input import IGNORE_INDEX


def shift_left(x: Tensor, fill: int | float | bool) -> Tensor:
    """``out[:, t] = x[:, t + 1]``, the last column set to ``fill``.  (B, T) -> (B, T)"""
    out = torch.full_like(x, fill)
    out[:, :-1] = x[:, 1:]
    return out


def next_token_targets(labels: Tensor, segment_ids: Tensor | None = None) -> Tensor:
    """Targets read one position early: position t predicts ``labels[t + 1]``.  (B, T) -> (B, T) long

    With ``segment_ids`` (B, T) (packing), position t gets IGNORE_INDEX when t + 1 starts another segment:
    the last token of a packed example never predicts the first token of the next.
    """
    targets = shift_left(labels, IGNORE_INDEX)  # (B, T)
    if segment_ids is not None:
        same = shift_left(segment_ids, -1) == segment_ids  # (B, T) False at each segment's last token
        targets = targets.masked_fill(~same, IGNORE_INDEX)
    return targets


def prompt_loss_weights(targets: Tensor, target_is_prompt: Tensor, prompt_weight: float) -> Tensor:
    """Per-position loss weights: 1 for response targets, ``prompt_weight`` for prompt targets, 0 if ignored.

    ``targets`` (B, T) long, ``target_is_prompt`` (B, T) bool (whether the *target* token belongs to the
    prompt)  ->  (B, T) float. ``prompt_weight`` 0 masks the prompt out of the loss; 1 trains on everything.
    """
    if not 0.0 <= prompt_weight <= 1.0:
        raise ValueError("prompt_weight must be in [0, 1]")
    weights = torch.where(target_is_prompt, prompt_weight, 1.0).to(torch.float32)  # (B, T)
    return weights.masked_fill(targets == IGNORE_INDEX, 0.0)


def target_weights(targets: Tensor) -> Tensor:
    """Weight 1 for every position with a target, 0 elsewhere.  (B, T) long -> (B, T) float"""
    return (targets != IGNORE_INDEX).to(torch.float32)
