"""A request's ``attention`` object -> attention constraints in token positions, validated.

Character spans become token spans through the tokenizer's offsets (``service/masks/spans.py``); the result is
checked against the prompt and the model (``validate_constraints``). Any problem is a 400
naming the span (``attention.exclude[1]``).
"""

from __future__ import annotations

from collections.abc import Sequence

from service.api.protocol.attention import AttentionSpec, CharSpan
from service.errors import InvalidRequest
from service.masks.constraints import AttentionConstraints, TokenSpan, validate_constraints
from service.masks.spans import Offsets, char_span_to_tokens


def to_constraints(
    spec: AttentionSpec,
    offsets: Offsets,
    text_len: int,
    message_starts: Sequence[tuple[int, int]] | None = None,
    *,
    last_token_reads: bool = True,
    dims: tuple[int, int] | None = None,
) -> AttentionConstraints:
    """Map and validate ``spec`` on a prompt of ``text_len`` characters whose tokens have ``offsets``.

    ``message_starts`` holds, per chat message, where its content starts in the rendered prompt and its
    length; spans with ``message`` are shifted by it. ``dims`` (layers, heads) bounds emphasis on chosen
    layers/heads; None: the model cannot do that (its attention does not run service/engine/steering.py).
    """
    emphasis = spec.emphasis
    if emphasis is not None and dims is None and (emphasis.layers is not None or emphasis.heads is not None):
        raise InvalidRequest(
            "this model's attention cannot be steered on chosen layers or heads; leave out 'layers' and "
            "'heads' to emphasize on all of them",
            param="attention.emphasis",
        )

    def tokens(span: CharSpan, param: str) -> TokenSpan:
        start, end = span.start, span.end
        if span.message is not None:
            if message_starts is None:
                raise InvalidRequest("'message' is only for requests with chat messages", param=param)
            if span.message >= len(message_starts):
                raise InvalidRequest(f"there is no message {span.message}", param=param)
            base, length = message_starts[span.message]
            if end > length:
                raise InvalidRequest(f"end {end} is past message {span.message}'s {length} characters", param=param)
            start, end = start + base, end + base
        return char_span_to_tokens(offsets, start, end, text_len, param)

    constraints = AttentionConstraints(
        exclude=tuple(tokens(s, f"attention.exclude[{i}]") for i, s in enumerate(spec.exclude)),
        isolate=tuple(tokens(s, f"attention.isolate.segments[{i}]") for i, s in enumerate(spec.isolate.segments))
        if spec.isolate
        else (),
        restart_positions=bool(spec.isolate and spec.isolate.restart_positions),
        emphasis=tuple(tokens(s, f"attention.emphasis.spans[{i}]") for i, s in enumerate(emphasis.spans))
        if emphasis
        else (),
        emphasis_factor=emphasis.factor if emphasis else 1.0,
        emphasis_layers=tuple(emphasis.layers) if emphasis and emphasis.layers is not None else None,
        emphasis_heads=tuple(emphasis.heads) if emphasis and emphasis.heads is not None else None,
    )
    n_layers, n_heads = dims if dims is not None else (None, None)
    validate_constraints(len(offsets), constraints, last_token_reads=last_token_reads, n_layers=n_layers,
                         n_heads=n_heads)  # fmt: skip
    return constraints


def message_spans(text: str, contents: Sequence[str]) -> list[tuple[int, int]]:
    """Where each message's content sits in the rendered chat prompt: (start, length), found in order."""
    found, pos = [], 0
    for content in contents:
        at = text.find(content, pos)
        if at < 0:  # a template that rewrites content: offsets cannot be trusted
            raise InvalidRequest("the chat template changed a message's text; give spans on 'prompt' instead",
                                 param="attention")  # fmt: skip
        found.append((at, len(content)))
        pos = at + len(content)
    return found
