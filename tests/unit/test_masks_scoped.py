"""Exact tensors for emphasis on chosen layers/heads and for attention constraints on fill-mask rows."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from service.masks.batch import DecodeMask, ScopedBias, batch_attention
from service.masks.constraints import (
    AttentionConstraints,
    RequestAttention,
    TokenSpan,
    emphasis_scope,
    request_attention,
    validate_constraints,
)
from service.masks.errors import MaskError
from service.masks.fill import (
    check_fill_constraints,
    compile_fill_attention,
    expand_mask,
    fill_attention,
    widen_constraints,
)

T, F = True, False
MIN = torch.finfo(torch.float32).min
LOG3 = math.log(3.0)


def emphasis(layers: tuple[int, ...] | None = None, heads: tuple[int, ...] | None = None) -> AttentionConstraints:
    return AttentionConstraints(
        emphasis=(TokenSpan(0, 1),), emphasis_factor=3.0, emphasis_layers=layers, emphasis_heads=heads
    )


def scope(c: AttentionConstraints, layers: int, heads: int) -> torch.Tensor:
    """emphasis_scope for a choice that names layers or heads, so a scope exists."""
    found = emphasis_scope(c, layers, heads)
    assert found is not None
    return found


def test_scope_is_the_chosen_layers_times_heads() -> None:
    assert emphasis_scope(emphasis(), 3, 2) is None  # all layers and heads: the bias rides in the mask
    assert torch.equal(scope(emphasis(layers=(1,)), 3, 2), torch.tensor([[F, F], [T, T], [F, F]]))
    assert torch.equal(scope(emphasis(heads=(0,)), 2, 2), torch.tensor([[T, F], [T, F]]))
    assert torch.equal(scope(emphasis(layers=(0, 2), heads=(1,)), 3, 2), torch.tensor([[F, T], [F, F], [F, T]]))


@pytest.mark.parametrize(
    ("c", "param"),
    [
        (emphasis(layers=(0, 3)), "attention.emphasis.layers[1]"),
        (emphasis(heads=(2,)), "attention.emphasis.heads[0]"),
        (emphasis(layers=()), "attention.emphasis.layers"),
    ],
)
def test_layers_and_heads_the_model_lacks_are_named(c: AttentionConstraints, param: str) -> None:
    with pytest.raises(MaskError) as err:
        validate_constraints(3, c, n_layers=3, n_heads=2)
    assert err.value.param == param


def test_scoped_bias_for_a_layer() -> None:
    bias = torch.tensor([[0.0, -1.0], [-2.0, 0.0]])  # (B=2, S=2)
    scope = torch.tensor([[[T, F], [F, F]], [[T, T], [T, T]]])  # (B=2, L=2, H=2)
    sb = ScopedBias(bias, scope)
    layer0 = sb.for_layer(0)
    assert layer0 is not None
    assert layer0.shape == (2, 2, 1, 2)
    assert torch.equal(layer0[:, :, 0, :], torch.tensor([[[0.0, -1.0], [0.0, 0.0]], [[-2.0, 0.0], [-2.0, 0.0]]]))
    assert ScopedBias(bias, torch.zeros(2, 2, 2, dtype=torch.bool)).for_layer(1) is None


def test_prefill_moves_a_scoped_bias_out_of_the_mask() -> None:
    scoped = request_attention(2, emphasis(layers=(1,)), torch.float32, n_layers=2, n_heads=1)
    assert scoped is not None
    plain = RequestAttention(3)
    mask, _, sb, _ = batch_attention([scoped, plain], dtype=torch.float32)
    # additive, with no bias in it: 0 where attended, MIN where blocked (row 0 is left-padded by one)
    assert torch.equal(mask[0, 0], torch.tensor([[0.0, MIN, MIN], [MIN, 0.0, MIN], [MIN, 0.0, 0.0]]))
    assert sb is not None
    assert torch.allclose(sb.bias, torch.tensor([[0.0, 0.0, -LOG3], [0.0, 0.0, 0.0]]))
    assert torch.equal(sb.scope, torch.tensor([[[F], [T]], [[T], [T]]]))  # (B, L, H): the plain row's is all True
    # without a scope the bias is folded into the mask as before
    unscoped = request_attention(2, emphasis(), torch.float32)
    assert unscoped is not None
    mask2, _, sb2, _ = batch_attention([unscoped], dtype=torch.float32)
    assert sb2 is None
    assert torch.allclose(mask2[0, 0], torch.tensor([[0.0, MIN], [0.0, -LOG3]]))


def test_decode_mask_carries_the_scope_through_join_and_select() -> None:
    scoped = request_attention(2, emphasis(heads=(0,)), torch.float32, n_layers=1, n_heads=2)
    assert scoped is not None
    a = DecodeMask.for_prompts([scoped], dtype=torch.float32)
    b = DecodeMask.for_prompts([RequestAttention(1)], dtype=torch.float32)
    joined = a.join(b).extend()  # (B=2, S=3)
    assert torch.equal(joined.to_4d(torch.float32)[:, 0, 0], torch.tensor([[0.0, 0.0, 0.0], [MIN, 0.0, 0.0]]))
    sb = joined.scoped_bias()
    assert sb is not None
    assert torch.allclose(sb.bias, torch.tensor([[0.0, -LOG3, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(sb.scope, torch.tensor([[[T, F]], [[T, T]]]))
    # once the scoped row leaves, the remaining (all-True) scope is dropped and the bias rides in the mask
    rest = joined.select(torch.tensor([1]))
    assert rest.scope is None
    assert rest.scoped_bias() is None


def fill_row(c: AttentionConstraints, n: int, dims: tuple[int, int] = (0, 0)) -> RequestAttention:
    row = request_attention(n, c, torch.float32, causal=False, n_layers=dims[0], n_heads=dims[1])
    assert row is not None
    return row


def test_fill_attention_applies_each_rows_constraints() -> None:
    exclude = AttentionConstraints(exclude=(TokenSpan(1, 2),))
    masks = fill_attention([3, 2], torch.float32, rows=[fill_row(exclude, 3), None])
    z, m = 0.0, MIN
    expected = torch.tensor(
        [
            [[[z, m, z], [z, z, z], [z, m, z]]],  # key 1 is read only by itself; bidirectional otherwise
            [[[z, z, m], [z, z, m], [z, z, m]]],  # an unconstrained right-padded row
        ]
    )
    assert torch.equal(masks.attention, expected)
    assert masks.scoped_bias is None
    assert not masks.restarted


def test_fill_attention_restarts_positions_and_biases_keys() -> None:
    c = AttentionConstraints(
        isolate=(TokenSpan(1, 3), TokenSpan(3, 4)),
        restart_positions=True,
        emphasis=(TokenSpan(0, 1),),
        emphasis_factor=3.0,
    )
    masks = fill_attention([5], torch.float32, rows=[fill_row(c, 5)])
    assert masks.restarted
    assert torch.equal(masks.position_ids, torch.tensor([[0, 1, 2, 1, 3]]))
    z, m, b = 0.0, MIN, -LOG3
    expected = torch.tensor([[[[z, b, b, b, b], [z, b, b, m, b], [z, b, b, m, b], [z, m, m, b, b], [z, b, b, b, b]]]])
    assert torch.allclose(masks.attention, expected)


def test_fill_attention_scoped_emphasis_goes_to_scoped_bias() -> None:
    masks = fill_attention([2], torch.float32, rows=[fill_row(emphasis(layers=(0,)), 2, dims=(2, 1))])
    assert torch.equal(masks.attention, torch.zeros(1, 1, 2, 2))
    assert masks.scoped_bias is not None
    assert torch.allclose(masks.scoped_bias.bias, torch.tensor([[0.0, -LOG3]]))
    assert torch.equal(masks.scoped_bias.scope, torch.tensor([[[T], [F]]]))


def test_widen_constraints_follows_expand_mask() -> None:
    # ids [a, M, b, c]: the mask at 1 becomes 3 tokens -> [a, x, M, M, b, c]
    assert expand_mask([7, 0, 8, 9], 1, [5], 2, 0) == [7, 5, 0, 0, 8, 9]
    c = AttentionConstraints(
        exclude=(TokenSpan(2, 4),),  # b, c: moves by 2
        isolate=(TokenSpan(0, 1), TokenSpan(1, 2)),  # the segment holding the mask grows by 2
        emphasis=(TokenSpan(0, 1),),  # before the mask: stays
        emphasis_factor=2.0,
    )
    wide = widen_constraints(c, 1, 2)
    assert wide.exclude == (TokenSpan(4, 6),)
    assert wide.isolate == (TokenSpan(0, 1), TokenSpan(1, 4))
    assert wide.emphasis == (TokenSpan(0, 1),)
    assert widen_constraints(c, 1, 0) is c


def test_every_span_group_is_listed_moved_and_named() -> None:
    c = AttentionConstraints(exclude=(TokenSpan(0, 1),), isolate=(TokenSpan(1, 2), TokenSpan(2, 3)),
                             emphasis=(TokenSpan(3, 4),), emphasis_factor=2.0)  # fmt: skip
    span_fields = {f.name for f in fields(AttentionConstraints) if f.type == "tuple[TokenSpan, ...]"}
    assert span_fields == {"exclude", "isolate", "emphasis"}  # a new span field joins span_groups by its type
    assert dict(c.span_groups()) == {
        "exclude": (TokenSpan(0, 1),),
        "isolate.segments": (TokenSpan(1, 2), TokenSpan(2, 3)),
        "emphasis.spans": (TokenSpan(3, 4),),
    }
    moved = c.map_spans(lambda s: TokenSpan(s.start + 10, s.end + 10))
    assert [s.start for _, spans in moved.span_groups() for s in spans] == [10, 11, 12, 13]
    assert moved.emphasis_factor == 2.0


def test_fill_attention_is_compiled_once_for_every_width() -> None:
    c = AttentionConstraints(exclude=(TokenSpan(2, 4),))  # ids [a, M, b, c]
    compiled = compile_fill_attention(c, 4, [1], [0, 1, 2], torch.float32)
    assert compiled is not None
    assert set(compiled.widened) == {(1, 1), (1, 2)}
    assert compiled.at(1, 0) is compiled.base
    wide = compiled.at(1, 2)  # [a, M, M, M, b, c]: the excluded span moved by 2
    assert wide.length == 6
    expected = fill_row(widen_constraints(c, 1, 2), 6).structure
    assert wide.structure is not None
    assert expected is not None
    assert torch.equal(wide.structure, expected)
    assert compile_fill_attention(AttentionConstraints(), 4, [1], [0, 1], torch.float32) is None


def test_fill_constraints_must_not_exclude_a_mask_or_its_read_position() -> None:
    c = AttentionConstraints(exclude=(TokenSpan(0, 2), TokenSpan(3, 4)))
    with pytest.raises(MaskError) as err:
        check_fill_constraints(c, [3], mntp=False)
    assert err.value.param == "attention.exclude[1]"
    check_fill_constraints(c, [2], mntp=False)  # an encoder reads the mask at 2 itself: allowed
    with pytest.raises(MaskError) as err:
        check_fill_constraints(c, [2], mntp=True)  # MNTP reads it at 1, inside exclude[0]
    assert err.value.param == "attention.exclude[0]"
