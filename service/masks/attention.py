"""Attention masks: which positions each position may attend to.

Conventions (the same everywhere in maskserve, and what transformers' SDPA path accepts):
- a *key mask* is 2D ``(B, S)`` bool, True = a real token that may be attended to (False = padding);
- a *structure* is ``(T, S)`` or ``(B, T, S)`` bool, True = query t may attend key s;
- a *4D mask* is ``(B, 1, T, S)``: bool (True = attend) or additive float (0 = attend, dtype min = blocked).
  ``S`` counts cached keys too: in a decode step ``T = 1`` and ``S`` = past + 1.

All functions are pure: tensors in, tensors out, no model. Per-request constraints (exclude, isolate, emphasis)
live in ``service/masks/constraints.py``, the masks of a batch of requests in ``service/masks/batch.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

PaddingSide = Literal["left", "right"]


def padding_mask(
    lengths: Sequence[int],
    max_len: int | None = None,
    *,
    side: PaddingSide = "right",
    device: torch.device | None = None,
) -> Tensor:
    """Key mask for a batch of sequences of the given lengths padded to ``max_len``.  # (B, S) bool"""
    lens = torch.as_tensor(list(lengths), dtype=torch.long, device=device)  # (B,)
    width = int(max_len if max_len is not None else (int(lens.max()) if len(lens) else 0))
    if len(lens) and int(lens.max()) > width:
        raise ValueError(f"a length exceeds max_len={width}")
    pos = torch.arange(width, device=device)  # (S,)
    if side == "right":
        return pos[None, :] < lens[:, None]  # (B, S)
    return pos[None, :] >= (width - lens)[:, None]  # (B, S)


def causal_mask(q_len: int, kv_len: int | None = None, *, device: torch.device | None = None) -> Tensor:
    """Query i sits at absolute position ``kv_len - q_len + i`` and sees keys up to it.  # (T, S) bool"""
    kv = q_len if kv_len is None else kv_len
    if kv < q_len:
        raise ValueError("kv_len must be >= q_len (keys include the queries)")
    q_pos = torch.arange(kv - q_len, kv, device=device)  # (T,)
    k_pos = torch.arange(kv, device=device)  # (S,)
    return k_pos[None, :] <= q_pos[:, None]  # (T, S)


def bidirectional_mask(q_len: int, kv_len: int | None = None, *, device: torch.device | None = None) -> Tensor:
    """Every query sees every key (encoders, MNTP fill-mask).  # (T, S) bool"""
    return torch.ones(q_len, q_len if kv_len is None else kv_len, dtype=torch.bool, device=device)


def block_diagonal_mask(segment_ids: Tensor) -> Tensor:
    """Queries see only keys of their own segment (packing, isolated passages).

    ``segment_ids`` is ``(B, T)`` int; combine with :func:`causal_mask` for decoders.  # -> (B, T, T) bool
    """
    return segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)


def to_4d(key_mask: Tensor, structure: Tensor) -> Tensor:
    """Combine a key (padding) mask with a structure into a 4D bool mask.

    ``key_mask`` (B, S) bool, ``structure`` (T, S) or (B, T, S) bool  ->  (B, 1, T, S) bool.

    A query row left with nothing to attend to (a padding query under left padding, say) would make softmax
    produce NaN; such rows are opened on the query's own key instead. Their outputs belong to padding and are
    never read, but a NaN does not stay put: in the next layer it is that position's value vector, and the
    zero attention weight real queries give it still yields 0 * NaN = NaN in their outputs.
    """
    if structure.dim() == 2:
        structure = structure.unsqueeze(0)  # (1, T, S)
    mask = structure & key_mask[:, None, :]  # (B, T, S)
    empty = ~mask.any(dim=-1)  # (B, T)
    if bool(empty.any()):
        t, s = mask.shape[-2:]
        own_key = torch.arange(s - t, s, device=mask.device)  # (T,) absolute position of each query
        fix = torch.zeros_like(mask)
        fix[:, torch.arange(t, device=mask.device), own_key] = True  # (B, T, S) diagonal
        mask = mask | (fix & empty[:, :, None])
    return mask[:, None, :, :]  # (B, 1, T, S)


def to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Bool mask (True = attend) -> additive float mask (0 = attend, dtype's min = blocked). Same shape."""
    blocked = torch.full(mask.shape, torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return blocked.masked_fill(mask, 0.0)


def position_ids(key_mask: Tensor) -> Tensor:
    """Positions counting only real tokens, so left padding does not shift them.  # (B, S) long

    Padding positions get 0 (their outputs are never read).
    """
    pos = key_mask.long().cumsum(dim=-1) - 1  # (B, S)
    return pos.clamp(min=0).masked_fill(~key_mask, 0)


def segment_position_ids(segment_ids: Tensor) -> Tensor:
    """Positions restarting at 0 at each new segment (packing, PCW segments).  # (B, T) long"""
    b, t = segment_ids.shape
    idx = torch.arange(t, device=segment_ids.device).expand(b, t)  # (B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # (B, T) True where a segment begins
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values  # (B, T)
    return idx - start_idx
