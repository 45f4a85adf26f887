"""service/masks/attention.py, batch.py and fill.py: exact expected tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf

from service.masks.attention import (
    bidirectional_mask,
    block_diagonal_mask,
    causal_mask,
    padding_mask,
    position_ids,
    segment_position_ids,
    to_4d,
    to_additive,
)
from service.masks.fill import expand_mask, fill_attention, read_position, restrict_vocab

T, F = True, False
MIN32 = torch.finfo(torch.float32).min


def test_padding_mask_right() -> None:
    expected = torch.tensor([[T, T, T, F], [T, F, F, F], [T, T, T, T]])
    assert torch.equal(padding_mask([3, 1, 4]), expected)
    assert padding_mask([3, 1, 4]).dtype == torch.bool


def test_padding_mask_left() -> None:
    expected = torch.tensor([[F, T, T, T], [F, F, F, T], [T, T, T, T]])
    assert torch.equal(padding_mask([3, 1, 4], side="left"), expected)


def test_padding_mask_explicit_width_and_too_long() -> None:
    assert torch.equal(padding_mask([2], 4), torch.tensor([[T, T, F, F]]))
    assert torch.equal(padding_mask([2], 4, side="left"), torch.tensor([[F, F, T, T]]))
    assert torch.equal(padding_mask([0, 2], 2), torch.tensor([[F, F], [T, T]]))
    with pytest.raises(ValueError, match="exceeds max_len=2"):
        padding_mask([3], 2)


def test_causal_square() -> None:
    expected = torch.tensor([[T, F, F], [T, T, F], [T, T, T]])
    assert torch.equal(causal_mask(3), expected)


def test_causal_with_cached_keys() -> None:
    # 2 new queries after 3 cached keys: they sit at absolute positions 3 and 4.
    expected = torch.tensor([[T, T, T, T, F], [T, T, T, T, T]])
    assert torch.equal(causal_mask(2, 5), expected)
    # one decode step sees everything
    assert torch.equal(causal_mask(1, 4), torch.tensor([[T, T, T, T]]))
    with pytest.raises(ValueError, match="kv_len must be >= q_len"):
        causal_mask(3, 2)


def test_bidirectional() -> None:
    assert torch.equal(bidirectional_mask(2), torch.ones(2, 2, dtype=torch.bool))
    assert torch.equal(bidirectional_mask(1, 3), torch.tensor([[T, T, T]]))


def test_block_diagonal() -> None:
    seg = torch.tensor([[0, 0, 1, 1, 1]])
    expected = torch.tensor(
        [
            [T, T, F, F, F],
            [T, T, F, F, F],
            [F, F, T, T, T],
            [F, F, T, T, T],
            [F, F, T, T, T],
        ]
    )
    assert torch.equal(block_diagonal_mask(seg), expected[None])
    # packing for a decoder: block-diagonal and causal
    packed = block_diagonal_mask(seg) & causal_mask(5)
    expected_causal = torch.tensor(
        [
            [T, F, F, F, F],
            [T, T, F, F, F],
            [F, F, T, F, F],
            [F, F, T, T, F],
            [F, F, T, T, T],
        ]
    )
    assert torch.equal(packed, expected_causal[None])


def test_to_4d_right_padding_bidirectional() -> None:
    key = padding_mask([2, 3])  # (2, 3)
    mask = to_4d(key, bidirectional_mask(3))
    assert mask.shape == (2, 1, 3, 3)
    row0 = torch.tensor([[T, T, F], [T, T, F], [T, T, F]])  # the padding query attends to real keys: no empty row
    assert torch.equal(mask[0, 0], row0)
    assert torch.equal(mask[1, 0], torch.ones(3, 3, dtype=torch.bool))


def test_to_4d_left_padding_causal_opens_empty_rows_on_own_key() -> None:
    key = padding_mask([2, 4], side="left")  # [[F, F, T, T], [T, T, T, T]]
    mask = to_4d(key, causal_mask(4))
    # Padding queries 0 and 1 see no real key under a causal mask: each is opened on its own key only.
    expected0 = torch.tensor(
        [
            [T, F, F, F],
            [F, T, F, F],
            [F, F, T, F],
            [F, F, T, T],
        ]
    )
    assert torch.equal(mask[0, 0], expected0)
    assert torch.equal(mask[1, 0], causal_mask(4))


def test_to_4d_empty_row_fix_with_cached_keys() -> None:
    # q_len 2 over kv_len 4: the queries sit at absolute positions 2 and 3. A structure that blocks
    # everything for query 0 gets that query's own key (position 2), not key 0.
    key = torch.tensor([[T, T, T, T]])
    structure = torch.tensor([[F, F, F, F], [T, F, F, T]])
    mask = to_4d(key, structure)
    assert torch.equal(mask[0, 0], torch.tensor([[F, F, T, F], [T, F, F, T]]))


def test_to_4d_batched_structure() -> None:
    key = torch.tensor([[T, T, F], [T, T, T]])
    structure = block_diagonal_mask(torch.tensor([[0, 1, 1], [0, 0, 1]]))  # (2, 3, 3)
    mask = to_4d(key, structure)
    assert torch.equal(mask[0, 0], torch.tensor([[T, F, F], [F, T, F], [F, T, F]]))
    assert torch.equal(mask[1, 0], torch.tensor([[T, T, F], [T, T, F], [F, F, T]]))


def test_empty_row_fix_keeps_softmax_finite() -> None:
    key = padding_mask([1, 3], side="left")
    mask = to_4d(key, causal_mask(3))  # (2, 1, 3, 3)
    q = torch.randn(2, 1, 3, 4)
    out = nnf.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert bool(torch.isfinite(out).all())


def test_to_additive() -> None:
    mask = torch.tensor([[T, F], [F, T]])
    add = to_additive(mask, torch.float32)
    assert add.dtype == torch.float32
    assert torch.equal(add, torch.tensor([[0.0, MIN32], [MIN32, 0.0]]))
    bf = to_additive(mask, torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    assert float(bf[0, 1]) == torch.finfo(torch.bfloat16).min
    assert float(bf[0, 0]) == 0.0


def test_position_ids_ignore_left_padding() -> None:
    key = padding_mask([2, 4, 0], 4, side="left")
    expected = torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 0, 0]])
    assert torch.equal(position_ids(key), expected)
    assert torch.equal(position_ids(padding_mask([2, 4])), torch.tensor([[0, 1, 0, 0], [0, 1, 2, 3]]))


def test_segment_position_ids() -> None:
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 7, 7, 7, 7]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    assert torch.equal(segment_position_ids(seg), expected)


# --- fill-mask composition (service/masks/fill.py) -----------------------------------------------------------


def test_fill_attention_right_padded_bidirectional() -> None:
    masks = fill_attention([3, 1], torch.float32)
    assert torch.equal(masks.key_mask, torch.tensor([[T, T, T], [T, F, F]]))
    assert torch.equal(masks.position_ids, torch.tensor([[0, 1, 2], [0, 0, 0]]))
    z, m = 0.0, MIN32
    expected = torch.tensor(
        [
            [[[z, z, z], [z, z, z], [z, z, z]]],
            [[[z, m, m], [z, m, m], [z, m, m]]],
        ]
    )
    assert masks.attention.shape == (2, 1, 3, 3)
    assert torch.equal(masks.attention, expected)


def test_read_position() -> None:
    assert read_position(4, mntp=False) == 4
    assert read_position(4, mntp=True) == 3  # LLM2Vec: token i predicted from the output at i-1
    assert read_position(0, mntp=False) == 0
    with pytest.raises(ValueError, match="prefix token"):
        read_position(0, mntp=True)


def test_expand_mask() -> None:
    m = 9
    assert expand_mask([1, m, 2], 1, [], 1, m) == [1, m, 2]
    assert expand_mask([1, m, 2], 1, [], 3, m) == [1, m, m, m, 2]
    assert expand_mask([1, m, 2], 1, [7, 8], 1, m) == [1, 7, 8, m, 2]
    assert expand_mask([1, m, 2, m], 3, [7], 0, m) == [1, m, 2, 7]  # the other mask is untouched
    with pytest.raises(ValueError, match="not the mask token"):
        expand_mask([1, m, 2], 0, [], 1, m)


def test_restrict_vocab() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    out = restrict_vocab(logp, torch.tensor([T, F, T]))
    assert out[0, 1] == float("-inf")
    assert torch.equal(out[0, [0, 2]], logp[0, [0, 2]])  # not renormalised
