"""Exact tensors for the per-request attention constraints (exclude, isolate, emphasis)."""

from __future__ import annotations

import math

import pytest
import torch

from service.masks.constraints import (
    AttentionConstraints,
    TokenSpan,
    constrained_position_ids,
    constrained_structure,
    decode_key_row,
    emphasis_key_bias,
    segment_ids_for,
    validate_constraints,
)
from service.masks.errors import MaskError
from service.masks.spans import char_span_to_tokens

T, F = True, False


def test_empty_constraints_equal_plain_causal() -> None:
    c = AttentionConstraints()
    assert c.empty
    assert torch.equal(constrained_structure(4, c), torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    assert torch.equal(constrained_position_ids(4, c), torch.arange(4))


def test_exclude_hides_span_from_every_other_token() -> None:
    c = AttentionConstraints(exclude=(TokenSpan(1, 3),))
    expected = torch.tensor(
        [
            [T, F, F, F, F],
            [T, T, F, F, F],  # span tokens still read what precedes them and each other
            [T, T, T, F, F],
            [T, F, F, T, F],  # later tokens read around the span
            [T, F, F, T, T],
        ]
    )
    assert torch.equal(constrained_structure(5, c), expected)
    assert torch.equal(decode_key_row(5, c), torch.tensor([T, F, F, T, T]))


def test_exclude_bidirectional_blocks_earlier_tokens_too() -> None:
    c = AttentionConstraints(exclude=(TokenSpan(2, 3),))
    expected = torch.tensor([[T, T, F, T], [T, T, F, T], [T, T, T, T], [T, T, F, T]])
    assert torch.equal(constrained_structure(4, c, causal=False), expected)


def test_isolate_segments_cannot_see_each_other_rest_sees_all() -> None:
    # tokens: 0 = prefix, 1-2 = segment A, 3-4 = segment B, 5 = question
    c = AttentionConstraints(isolate=(TokenSpan(1, 3), TokenSpan(3, 5)))
    expected = torch.tensor(
        [
            [T, F, F, F, F, F],
            [T, T, F, F, F, F],
            [T, T, T, F, F, F],
            [T, F, F, T, F, F],  # B does not see A
            [T, F, F, T, T, F],
            [T, T, T, T, T, T],  # the question sees both
        ]
    )
    assert torch.equal(constrained_structure(6, c), expected)


def test_tokens_between_segments_join_the_next_segment() -> None:
    # A = 1-2, a label token 3 between, B = 4-5: the label must not carry A into B
    assert segment_ids_for(7, [TokenSpan(1, 3), TokenSpan(4, 6)]).tolist() == [0, 1, 1, 2, 2, 2, 0]
    s = constrained_structure(7, AttentionConstraints(isolate=(TokenSpan(1, 3), TokenSpan(4, 6))))
    assert s[3].tolist() == [T, F, F, T, F, F, F]


def test_restart_positions_pcw() -> None:
    c = AttentionConstraints(isolate=(TokenSpan(1, 3), TokenSpan(3, 6)), restart_positions=True)
    # prefix 0; A at 1,2; B restarts at 1,2,3; the rest continues after the longest (B ends at 4)
    assert constrained_position_ids(8, c).tolist() == [0, 1, 2, 1, 2, 3, 4, 5]


def test_emphasis_bias_is_minus_log_factor_outside_spans() -> None:
    c = AttentionConstraints(emphasis=(TokenSpan(1, 2),), emphasis_factor=4.0)
    b = emphasis_key_bias(4, c, torch.float32)
    assert torch.equal(b, torch.tensor([-math.log(4.0), 0.0, -math.log(4.0), -math.log(4.0)]))
    # the span's softmax share grows by the factor relative to the others
    logits = torch.zeros(4)
    p = torch.softmax(logits + b, dim=0)
    assert torch.allclose(p[1] / p[0], torch.tensor(4.0))


@pytest.mark.parametrize(
    ("constraints", "param"),
    [
        (AttentionConstraints(exclude=(TokenSpan(3, 9),)), "attention.exclude[0]"),
        (AttentionConstraints(exclude=(TokenSpan(1, 3), TokenSpan(2, 4))), "attention.exclude[1]"),
        (AttentionConstraints(exclude=(TokenSpan(1, 3),), emphasis=(TokenSpan(2, 3),)), "attention.emphasis.spans[0]"),
        (AttentionConstraints(exclude=(TokenSpan(4, 6),)), "attention.exclude[0]"),  # includes the last token
        (AttentionConstraints(isolate=(TokenSpan(1, 3),)), "attention.isolate.segments"),
    ],
)
def test_invalid_spans_name_the_span(constraints: AttentionConstraints, param: str) -> None:
    with pytest.raises(MaskError) as info:
        validate_constraints(6, constraints)
    assert info.value.param == param


def test_char_spans_map_to_whole_tokens() -> None:
    offsets = [(0, 0), (0, 3), (3, 7), (7, 8), (8, 12)]  # a special token, then "The", " dog", " ", "barks"
    assert char_span_to_tokens(offsets, 4, 6, 12, "p") == TokenSpan(2, 3)
    assert char_span_to_tokens(offsets, 2, 9, 12, "p") == TokenSpan(1, 5)
    with pytest.raises(MaskError, match="0 <= start < end <= 12"):
        char_span_to_tokens(offsets, 5, 20, 12, "attention.exclude[0]")
