"""Batched prefill and decode masks for continuous batching: exact tensors."""

from __future__ import annotations

import pytest
import torch

from service.masks.batch import DecodeMask, batch_attention
from service.masks.constraints import RequestAttention

T, F = True, False
MIN = torch.finfo(torch.float32).min


def test_prefill_left_pads_causal_rows() -> None:
    mask, pos, _, _ = batch_attention([RequestAttention(3), RequestAttention(1)], dtype=torch.float32)
    assert mask.shape == (2, 1, 3, 3)
    assert torch.equal(
        mask[0, 0],
        torch.tensor([[T, F, F], [T, T, F], [T, T, T]]),
    )
    # Row 1 is two columns of padding then its one token; padding query rows see only themselves (no NaN).
    assert torch.equal(
        mask[1, 0],
        torch.tensor([[T, F, F], [F, T, F], [F, F, T]]),
    )
    assert torch.equal(pos, torch.tensor([[0, 1, 2], [0, 0, 0]]))


def test_prefill_places_structure_and_positions_bottom_right() -> None:
    isolated = torch.tensor([[T, F], [F, T]])  # two tokens that cannot see each other
    rows = [RequestAttention(2, structure=isolated, positions=torch.tensor([5, 5])), RequestAttention(3)]
    mask, pos, _, _ = batch_attention(rows, dtype=torch.float32)
    assert torch.equal(mask[0, 0], torch.tensor([[T, F, F], [F, T, F], [F, F, T]]))
    assert torch.equal(mask[1, 0], torch.tensor([[T, F, F], [T, T, F], [T, T, T]]))
    assert torch.equal(pos, torch.tensor([[0, 5, 5], [0, 1, 2]]))


def test_prefill_with_key_bias_is_additive() -> None:
    rows = [RequestAttention(2, key_bias=torch.tensor([-1.0, 0.0])), RequestAttention(1)]
    mask, _, _, _ = batch_attention(rows, dtype=torch.float32)
    assert mask.dtype == torch.float32
    assert torch.equal(mask[0, 0], torch.tensor([[-1.0, MIN], [-1.0, 0.0]]))
    assert torch.equal(mask[1, 0], torch.tensor([[0.0, MIN], [MIN, 0.0]]))


def test_prefill_rejects_wrong_structure_shape() -> None:
    with pytest.raises(ValueError, match="structure must be"):
        batch_attention([RequestAttention(2, structure=torch.ones(3, 3, dtype=torch.bool))], dtype=torch.float32)


def test_decode_mask_for_prompts_extend_and_4d() -> None:
    rows = [RequestAttention(3, decode_keys=torch.tensor([T, F, T])), RequestAttention(1)]
    m = DecodeMask.for_prompts(rows, dtype=torch.float32)
    assert torch.equal(m.keys, torch.tensor([[T, F, T], [F, F, T]]))
    assert m.bias is None
    m = m.extend()
    assert torch.equal(m.keys, torch.tensor([[T, F, T, T], [F, F, T, T]]))
    four = m.to_4d(torch.float32)
    assert four.shape == (2, 1, 1, 4)
    assert four.dtype == torch.bool
    assert torch.equal(four[:, 0, 0], m.keys)


def test_decode_mask_join_select_and_drop_leading() -> None:
    a = DecodeMask(torch.tensor([[T, T, T], [F, T, T]]))
    b = DecodeMask(torch.tensor([[T, T, T, T, T]]))
    joined = a.join(b)
    assert torch.equal(
        joined.keys,
        torch.tensor([[F, F, T, T, T], [F, F, F, T, T], [T, T, T, T, T]]),
    )
    kept = joined.select(torch.tensor([0, 1]))  # the long request left
    assert kept.unused_columns() == 2
    assert torch.equal(kept.drop_leading(2).keys, torch.tensor([[T, T, T], [F, T, T]]))
    # A column excluded for every remaining row is also never attended again.
    assert DecodeMask(torch.tensor([[F, F, T], [F, T, T]])).unused_columns() == 1
    assert DecodeMask(torch.zeros(1, 2, dtype=torch.bool)).unused_columns() == 2


def test_decode_mask_bias_follows_rows() -> None:
    rows = [RequestAttention(2, key_bias=torch.tensor([-2.0, 0.0]))]
    a = DecodeMask.for_prompts(rows, dtype=torch.float32)
    assert torch.equal(a.bias, torch.tensor([[-2.0, 0.0]]))  # type: ignore[arg-type]
    joined = a.join(DecodeMask(torch.tensor([[T, T, T]]))).extend()
    assert torch.equal(joined.keys, torch.tensor([[F, T, T, T], [T, T, T, T]]))
    assert torch.equal(joined.bias, torch.tensor([[0.0, -2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))  # type: ignore[arg-type]
    four = joined.to_4d(torch.float32)
    assert torch.equal(four[:, 0, 0], torch.tensor([[MIN, -2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(joined.select(torch.tensor([1])).bias, torch.zeros(1, 4))  # type: ignore[arg-type]
