"""Per-request attention constraints (exclude, isolate, emphasis): token spans -> the request's own tensors.

Spans reach this module as token ranges (``service/masks/spans.py`` maps a client's character ranges to them).
:func:`request_attention` compiles a request's constraints once into a :class:`RequestAttention`; batches are
assembled from those in ``service/masks/batch.py``. Pure functions: tensors in, tensors out, no model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from service.masks.attention import bidirectional_mask, causal_mask
from service.masks.errors import MaskError
from service.masks.kinds import MaskKind


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
    def kinds(self) -> tuple[MaskKind, ...]:
        """The constraints that change anything (for metrics and reports)."""
        on = {MaskKind.ATTENTION_EXCLUDE: bool(self.exclude), MaskKind.ATTENTION_ISOLATE: bool(self.isolate),
              MaskKind.ATTENTION_EMPHASIS: bool(self.emphasis) and self.emphasis_factor != 1.0}  # fmt: skip
        return tuple(k for k, v in on.items() if v)

    def span_groups(self) -> Iterator[tuple[str, tuple[TokenSpan, ...]]]:
        """Every group of spans with the request field it came from (``"isolate.segments"``), found from the
        fields' types: a new kind of span is validated and widened without being listed anywhere."""
        for f in fields(self):
            if f.type == "tuple[TokenSpan, ...]":
                yield SPAN_PARAMS.get(f.name, f.name), getattr(self, f.name)

    def map_spans(self, move: Callable[[TokenSpan], TokenSpan]) -> AttentionConstraints:
        """The same constraints with every span of every group passed through ``move``."""
        moved = {f.name: tuple(move(s) for s in getattr(self, f.name)) for f in fields(self)
                 if f.type == "tuple[TokenSpan, ...]"}  # fmt: skip
        return replace(self, **moved)  # type: ignore[arg-type]  # every key names a span field


SPAN_PARAMS = {"isolate": "isolate.segments", "emphasis": "emphasis.spans"}  # request fields not named as the field


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
    """Raise MaskError naming the span for out-of-range, empty or overlapping spans, for spans that would
    cut the token that produces the output off from its own input, and for emphasis layers/heads the model
    (``n_layers`` x ``n_heads``, when given) does not have."""
    seen: list[tuple[str, TokenSpan]] = []
    for kind, spans in constraints.span_groups():
        for i, span in enumerate(spans):
            param = f"attention.{kind}[{i}]"
            if not 0 <= span.start < span.end <= n:
                raise MaskError(param, f"covers no token of the {n}-token prompt or lies outside it")
            for other_param, other in seen:
                if span.start < other.end and other.start < span.end:
                    raise MaskError(param, f"overlaps {other_param}; spans must not overlap")
            seen.append((param, span))
    if last_token_reads:
        for i, span in enumerate(constraints.exclude):
            if span.end >= n:
                raise MaskError(
                    f"attention.exclude[{i}]",
                    "includes the prompt's last token, which produces the output; end the span earlier",
                )
    if constraints.isolate and len(constraints.isolate) < 2:
        raise MaskError("attention.isolate.segments", "needs at least two segments to isolate from each other")
    if constraints.emphasis and not constraints.emphasis_factor > 0:
        raise MaskError("attention.emphasis.factor", "must be > 0")
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
            raise MaskError(f"attention.emphasis.{name}", "is empty; leave it out to emphasize on all")
        for i, index in enumerate(chosen):
            if not 0 <= index < limit:
                raise MaskError(
                    f"attention.emphasis.{name}[{i}]", f"the model has {limit} {name} (0..{limit - 1}); got {index}"
                )


def emphasis_scope(constraints: AttentionConstraints, n_layers: int, n_heads: int) -> Tensor | None:
    """Where emphasis applies: (L, H) bool, True on the chosen layers x heads; None when it applies on all
    (then the bias rides in the 4D mask every layer shares, and no custom attention function is needed)."""
    if constraints.emphasis_layers is None and constraints.emphasis_heads is None:
        return None
    validate_scope(constraints, n_layers, n_heads)  # a MaskError naming the layer, never an IndexError
    layers = torch.zeros(n_layers, dtype=torch.bool)  # (L,)
    heads = torch.zeros(n_heads, dtype=torch.bool)  # (H,)
    layers[list(constraints.emphasis_layers) if constraints.emphasis_layers is not None else slice(None)] = True
    heads[list(constraints.emphasis_heads) if constraints.emphasis_heads is not None else slice(None)] = True
    return layers[:, None] & heads[None, :]  # (L, H)


@dataclass(frozen=True, eq=False)  # compared (and hashed) by identity: it holds tensors, and rows key on it
class RequestAttention:
    """What one request brings to its batch's attention masks; all ``None`` is plain causal attention.

    - ``structure`` (T, T) bool: which prompt keys each prompt query may attend (its prefill);
    - ``decode_keys`` (T,) bool: which prompt keys every generated token may attend;
    - ``key_bias`` (T,) float: an additive bias on the prompt's keys, for prompt and generated queries alike;
    - ``positions`` (T,) long: the prompt's position ids (default ``0..T-1``);
    - ``bias_scope`` (L, H) bool: the layers x heads ``key_bias`` applies on (default: all of them);
    - ``kinds``: the constraints behind it, for metrics and reports.
    """

    length: int
    structure: Tensor | None = None
    decode_keys: Tensor | None = None
    key_bias: Tensor | None = None
    positions: Tensor | None = None
    bias_scope: Tensor | None = None
    kinds: tuple[MaskKind, ...] = ()

    def next_position(self) -> int:
        """Position of the first generated token: one past the largest prompt position."""
        return self.length if self.positions is None else next_position(self.positions)


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
    emphasized = MaskKind.ATTENTION_EMPHASIS in constraints.kinds
    return RequestAttention(
        length=n,
        structure=constrained_structure(n, constraints, causal=causal),  # (T, T)
        decode_keys=decode_key_row(n, constraints),  # (T,)
        key_bias=emphasis_key_bias(n, constraints, dtype) if emphasized else None,  # (T,)
        positions=constrained_position_ids(n, constraints) if constraints.restart_positions else None,  # (T,)
        bias_scope=emphasis_scope(constraints, n_layers, n_heads) if emphasized else None,  # (L, H)
        kinds=constraints.kinds,
    )
