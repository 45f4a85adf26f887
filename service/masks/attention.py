"""Attention masks: which positions each position may attend to.

Conventions (the same everywhere in maskserve, and what transformers' SDPA path accepts):
- a *key mask* is 2D ``(B, S)`` bool, True = a real token that may be attended to (False = padding);
- a *structure* is ``(T, S)`` or ``(B, T, S)`` bool, True = query t may attend key s;
- a *4D mask* is ``(B, 1, T, S)``: bool (True = attend) or additive float (0 = attend, dtype min = blocked).
  ``S`` counts cached keys too: in a decode step ``T = 1`` and ``S`` = past + 1.

All functions are pure: tensors in, tensors out, no model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

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


# --- per-request attention constraints (exclude, isolate, emphasis) -------------------------------------------
# Spans reach these functions as token ranges; service/masks/spans.py maps a client's character ranges to them.


class SpanError(ValueError):
    """A span that cannot work; ``param`` names it (e.g. ``attention.exclude[1]``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True)
class TokenSpan:
    start: int  # first token index
    end: int  # one past the last token index

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class AttentionConstraints:
    """What one request may attend to, in token positions of its prompt.

    - ``exclude``: no token outside a span may attend to it (the model reads around it);
    - ``isolate``: segments that cannot attend to one another; everything else attends to all of them
      (Parallel Context Windows, Ratner et al. 2023); ``restart_positions`` gives every segment the same
      starting position, and what follows continues after the longest one;
    - ``emphasis``: keys outside these spans get an additive ``-log(factor)`` (PASTA, Zhang et al. 2023),
      i.e. the spans' share of attention grows by ``factor`` before renormalisation; on ``layers``/``heads``
      only when given.
    """

    exclude: tuple[TokenSpan, ...] = ()
    isolate: tuple[TokenSpan, ...] = ()
    restart_positions: bool = False
    emphasis: tuple[TokenSpan, ...] = ()
    emphasis_factor: float = 1.0
    emphasis_layers: tuple[int, ...] | None = None
    emphasis_heads: tuple[int, ...] | None = None

    @property
    def empty(self) -> bool:
        return not self.kinds

    @property
    def kinds(self) -> tuple[str, ...]:
        """The constraints that change anything (for metrics and reports)."""
        on = {"exclude": bool(self.exclude), "isolate": bool(self.isolate),
              "emphasis": bool(self.emphasis) and self.emphasis_factor != 1.0}  # fmt: skip
        return tuple(k for k, v in on.items() if v)


def _span_flags(n: int, spans: Sequence[TokenSpan], device: torch.device | None = None) -> Tensor:
    flags = torch.zeros(n, dtype=torch.bool, device=device)  # (T,)
    for span in spans:
        flags[span.start : span.end] = True
    return flags


def segment_ids_for(n: int, segments: Sequence[TokenSpan], device: torch.device | None = None) -> Tensor:
    """0 outside all segments, k+1 inside segment k. Tokens lying *between* two segments join the following
    segment: otherwise a later segment could read an earlier one through them, and isolation would leak.
    # -> (T,) long
    """
    ids = torch.zeros(n, dtype=torch.long, device=device)  # (T,)
    ordered = sorted(segments, key=lambda s: s.start)
    for k, span in enumerate(ordered):
        start = ordered[k - 1].end if k > 0 else span.start
        ids[start : span.end] = k + 1
    return ids


def constrained_structure(
    n: int, constraints: AttentionConstraints, *, causal: bool = True, device: torch.device | None = None
) -> Tensor:
    """The prompt's attention structure under the constraints.  # -> (T, T) bool, True = query t sees key s

    Every token still sees itself, so no row is ever empty.
    """
    base = causal_mask(n, device=device) if causal else bidirectional_mask(n, device=device)  # (T, T)
    allowed = base.clone()
    if constraints.exclude:
        excluded = _span_flags(n, constraints.exclude, device)  # (T,)
        # A key inside an excluded span is visible only to queries inside the same span.
        same_span = torch.zeros(n, n, dtype=torch.bool, device=device)  # (T, T)
        for span in constraints.exclude:
            same_span[span.start : span.end, span.start : span.end] = True
        allowed &= ~excluded[None, :] | same_span
    if constraints.isolate:
        seg = segment_ids_for(n, constraints.isolate, device)  # (T,)
        in_seg = seg > 0
        cross = in_seg[:, None] & in_seg[None, :] & (seg[:, None] != seg[None, :])  # (T, T)
        allowed &= ~cross
    return allowed | torch.eye(n, dtype=torch.bool, device=device)  # (T, T)


def decode_key_row(n_prompt: int, constraints: AttentionConstraints, device: torch.device | None = None) -> Tensor:
    """What a generated token may see of the prompt: everything but excluded spans.  # -> (n_prompt,) bool"""
    return ~_span_flags(n_prompt, constraints.exclude, device)


def constrained_position_ids(n: int, constraints: AttentionConstraints, device: torch.device | None = None) -> Tensor:
    """Positions 0..n-1, or with ``restart_positions`` each isolated segment restarting where the first began
    and later tokens continuing after the longest segment (PCW).  # -> (T,) long
    """
    if not (constraints.isolate and constraints.restart_positions):
        return torch.arange(n, device=device)
    seg = segment_ids_for(n, constraints.isolate, device).tolist()
    pos = torch.empty(n, dtype=torch.long, device=device)
    base = next(i for i, s in enumerate(seg) if s > 0)  # where the first segment starts
    nxt, longest_end, current = 0, 0, 0
    for i, s in enumerate(seg):
        if s > 0:
            if s != current:  # a new segment starts at the shared base
                nxt, current = base, s
            pos[i] = nxt
            nxt += 1
            longest_end = max(longest_end, nxt)
        else:
            if current:  # first token after the segments
                nxt, current = longest_end, 0
            pos[i] = nxt
            nxt += 1
    return pos


def next_position(position_ids: Tensor) -> int:
    """Where a generated token goes: one past the largest prompt position."""
    return int(position_ids.max()) + 1


def emphasis_key_bias(
    n_keys: int, constraints: AttentionConstraints, dtype: torch.dtype, device: torch.device | None = None
) -> Tensor:
    """Additive bias per key: 0 on emphasized spans, ``-log(factor)`` elsewhere.  # -> (S,) float

    Keys beyond the prompt (generated tokens) are not emphasized. Softmax is shift-invariant per row, so this
    equals ``+log(factor)`` on the spans: their attention share grows by ``factor`` before renormalisation.
    """
    bias = torch.full((n_keys,), -math.log(constraints.emphasis_factor), dtype=dtype, device=device)  # (S,)
    flags = _span_flags(n_keys, constraints.emphasis, device)
    return bias.masked_fill(flags, 0.0)


def validate_constraints(
    n: int,
    constraints: AttentionConstraints,
    *,
    last_token_reads: bool = True,
    n_layers: int | None = None,
    n_heads: int | None = None,
) -> None:
    """Raise SpanError naming the span for out-of-range, empty or overlapping spans, for spans that would
    cut the token that produces the output off from its own input, and for emphasis layers/heads the model
    (``n_layers`` x ``n_heads``, when given) does not have."""
    groups = (
        ("exclude", constraints.exclude),
        ("isolate.segments", constraints.isolate),
        ("emphasis.spans", constraints.emphasis),
    )
    seen: list[tuple[str, TokenSpan]] = []
    for kind, spans in groups:
        for i, span in enumerate(spans):
            param = f"attention.{kind}[{i}]"
            if not 0 <= span.start < span.end <= n:
                raise SpanError(param, f"covers no token of the {n}-token prompt or lies outside it")
            for other_param, other in seen:
                if span.start < other.end and other.start < span.end:
                    raise SpanError(param, f"overlaps {other_param}; spans must not overlap")
            seen.append((param, span))
    if last_token_reads:
        for i, span in enumerate(constraints.exclude):
            if span.end >= n:
                raise SpanError(
                    f"attention.exclude[{i}]",
                    "includes the prompt's last token, which produces the output; end the span earlier",
                )
    if constraints.isolate and len(constraints.isolate) < 2:
        raise SpanError("attention.isolate.segments", "needs at least two segments to isolate from each other")
    if constraints.emphasis and not constraints.emphasis_factor > 0:
        raise SpanError("attention.emphasis.factor", "must be > 0")
    validate_scope(constraints, n_layers, n_heads)


def validate_scope(constraints: AttentionConstraints, n_layers: int | None, n_heads: int | None) -> None:
    """Emphasis layers/heads must exist in a model of ``n_layers`` x ``n_heads`` (None: not checked)."""
    for name, chosen, limit in (
        ("layers", constraints.emphasis_layers, n_layers),
        ("heads", constraints.emphasis_heads, n_heads),
    ):
        if chosen is None or limit is None:
            continue
        if not chosen:
            raise SpanError(f"attention.emphasis.{name}", "is empty; leave it out to emphasize on all")
        for i, index in enumerate(chosen):
            if not 0 <= index < limit:
                raise SpanError(
                    f"attention.emphasis.{name}[{i}]", f"the model has {limit} {name} (0..{limit - 1}); got {index}"
                )


def emphasis_scope(constraints: AttentionConstraints, n_layers: int, n_heads: int) -> Tensor | None:
    """Where emphasis applies: (L, H) bool, True on the chosen layers x heads; None when it applies on all
    (then the bias rides in the 4D mask every layer shares, and no custom attention function is needed)."""
    if constraints.emphasis_layers is None and constraints.emphasis_heads is None:
        return None
    validate_scope(constraints, n_layers, n_heads)  # a SpanError naming the layer, never an IndexError
    layers = torch.zeros(n_layers, dtype=torch.bool)  # (L,)
    heads = torch.zeros(n_heads, dtype=torch.bool)  # (H,)
    layers[list(constraints.emphasis_layers) if constraints.emphasis_layers is not None else slice(None)] = True
    heads[list(constraints.emphasis_heads) if constraints.emphasis_heads is not None else slice(None)] = True
    return layers[:, None] & heads[None, :]  # (L, H)


# --- continuous batching: prefill and decode masks for a batch of requests ------------------------------------
# A running batch keeps every row right-aligned: row b's cached keys are the last L_b columns of the batch's
# S columns, and the columns before them are left padding that the row never attends. Requests join (left-pad
# the narrower side), leave (drop their rows, then the leading columns no row attends any more) and grow by one
# column per decode step. These functions are the only place that builds those masks; the engine moves the KV
# cache in step with them.


@dataclass(frozen=True)
class RequestAttention:
    """What one request brings to its batch's attention masks; all ``None`` is plain causal attention.

    - ``structure`` (T, T) bool: which prompt keys each prompt query may attend (its prefill);
    - ``decode_keys`` (T,) bool: which prompt keys every generated token may attend;
    - ``key_bias`` (T,) float: an additive bias on the prompt's keys, for prompt and generated queries alike;
    - ``positions`` (T,) long: the prompt's position ids (default ``0..T-1``);
    - ``bias_scope`` (L, H) bool: the layers x heads ``key_bias`` applies on (default: all of them);
    - ``kinds``: the constraints behind it (``exclude``, ``isolate``, ``emphasis``), for metrics.
    """

    length: int
    structure: Tensor | None = None
    decode_keys: Tensor | None = None
    key_bias: Tensor | None = None
    positions: Tensor | None = None
    bias_scope: Tensor | None = None
    kinds: tuple[str, ...] = ()

    def next_position(self) -> int:
        """Position of the first generated token: one past the largest prompt position."""
        return self.length if self.positions is None else int(self.positions.max()) + 1


def _left_pad_rows(values: Sequence[Tensor], width: int, fill: float | bool | int, like: Tensor) -> Tensor:
    """Stack 1D rows right-aligned in ``width`` columns.  # -> (B, width)"""
    out = torch.full((len(values), width), fill, dtype=like.dtype, device=like.device)  # (B, S)
    for b, row in enumerate(values):
        if len(row):
            out[b, width - len(row) :] = row
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
    rows: Sequence[RequestAttention], width: int, dtype: torch.dtype, device: torch.device | None
) -> Tensor:
    """Every row's key bias, right-aligned in ``width`` columns, 0 where a row has none.  # -> (B, width)"""
    zeros = torch.zeros(width, dtype=dtype, device=device)
    return _left_pad_rows([r.key_bias if r.key_bias is not None else zeros[: r.length] for r in rows], width, 0.0,
                          zeros)  # fmt: skip


class PrefillMasks(NamedTuple):
    mask: Tensor  # (B, 1, T, T) bool, or additive float when a row has a key bias
    positions: Tensor  # (B, T) long, 0 on padding
    scoped_bias: ScopedBias | None  # a key bias on chosen layers/heads only (not in ``mask``)


def prefill_attention(
    rows: Sequence[RequestAttention], *, dtype: torch.dtype, device: torch.device | None = None
) -> PrefillMasks:
    """Masks for prefilling several prompts in one left-padded forward, ``T`` being the longest prompt.

    A key bias on all layers is added to the mask; once any row scopes its bias to chosen layers/heads, every
    row's bias moves to ``scoped_bias`` and the mask stays free of it.
    """
    if not rows:
        raise ValueError("no rows to prefill")
    width = max(r.length for r in rows)
    key_mask = padding_mask([r.length for r in rows], width, side="left", device=device)  # (B, T)
    structure = causal_mask(width, device=device).repeat(len(rows), 1, 1)  # (B, T, T)
    positions = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # (B, T)
    for b, row in enumerate(rows):
        start = width - row.length
        if row.structure is not None:
            if tuple(row.structure.shape) != (row.length, row.length):
                raise ValueError(f"row {b}: structure must be ({row.length}, {row.length})")
            structure[b, start:, start:] = row.structure
        own = row.positions if row.positions is not None else torch.arange(row.length, device=device)
        positions[b, start:] = own
    mask = to_4d(key_mask, structure)  # (B, 1, T, T)
    if all(r.key_bias is None for r in rows):
        return PrefillMasks(mask, positions, None)
    bias = _row_biases(rows, width, dtype, device)  # (B, T)
    scope = _row_scopes(rows)
    if scope is None:
        return PrefillMasks(_as_mask(mask, bias[:, None, None, :], dtype), positions, None)  # (B, 1, T, T)
    return PrefillMasks(to_additive(mask, dtype), positions, ScopedBias(bias, scope.to(device)))


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
        keys = _left_pad_rows(
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


def request_attention(
    n: int,
    constraints: AttentionConstraints,
    dtype: torch.dtype,
    *,
    causal: bool = True,
    n_layers: int = 0,
    n_heads: int = 0,
) -> RequestAttention | None:
    """A request's constraints as per-row attention (the decode loop's, or a fill-mask row's with
    ``causal=False``); None when there are none, so an empty constraint takes exactly the unconstrained path
    (bit-identical results). ``n_layers``/``n_heads`` size the scope of emphasis on chosen layers/heads."""
    if constraints.empty:
        return None
    emphasized = "emphasis" in constraints.kinds
    return RequestAttention(
        length=n,
        structure=constrained_structure(n, constraints, causal=causal),  # (T, T)
        decode_keys=decode_key_row(n, constraints),  # (T,)
        key_bias=emphasis_key_bias(n, constraints, dtype) if emphasized else None,  # (T,)
        positions=constrained_position_ids(n, constraints) if constraints.restart_positions else None,  # (T,)
        bias_scope=emphasis_scope(constraints, n_layers, n_heads) if emphasized else None,  # (L, H)
        kinds=constraints.kinds,
    )
