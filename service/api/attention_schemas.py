"""The ``attention`` object of a request: character spans of the prompt -> per-request attention constraints.

    "attention": {"exclude": [{"start": 10, "end": 42}],
                  "isolate": {"segments": [{"start": 0, "end": 20}, {"start": 21, "end": 40}]},
                  "emphasis": {"spans": [{"start": 50, "end": 70}], "factor": 3.0}}

Spans are half-open character ranges ``[start, end)`` of ``prompt`` — or, for chat ``messages``, of the content
of the message numbered ``message``. Each covers every token it touches.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from service.errors import InvalidRequest
from service.masks.attention import AttentionConstraints, SpanError, TokenSpan, validate_constraints
from service.masks.spans import Offsets, char_span_to_tokens

MAX_SPANS = 32


class CharSpan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: int = Field(ge=0, description="First character (0-based).")
    end: int = Field(ge=1, description="One past the last character.")
    message: int | None = Field(
        None, ge=0, description="With chat messages: the index of the message whose content the offsets refer to."
    )


class IsolateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segments: list[CharSpan] = Field(min_length=2, max_length=MAX_SPANS)
    restart_positions: bool = Field(False, description="Every segment starts at the same position (PCW).")


class EmphasisSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spans: list[CharSpan] = Field(min_length=1, max_length=MAX_SPANS)
    factor: float = Field(3.0, gt=0.0, le=1000.0, description="Attention to the spans grows by this factor.")
    layers: list[int] | None = Field(
        None, min_length=1, max_length=1024, description="Only on these layers (0-based); default: all layers."
    )
    heads: list[int] | None = Field(
        None, min_length=1, max_length=1024, description="Only on these attention heads (0-based); default: all."
    )


class AttentionSpec(BaseModel):
    """What the model may attend to (see docs/masks.md)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"exclude": [{"start": 10, "end": 42}]}]})

    exclude: list[CharSpan] = Field(default_factory=list, max_length=MAX_SPANS, description="Spans nothing reads.")
    isolate: IsolateSpec | None = Field(None, description="Segments that cannot attend to one another.")
    emphasis: EmphasisSpec | None = Field(None, description="Steer attention toward spans (PASTA).")

    def to_constraints(
        self,
        offsets: Offsets,
        text_len: int,
        message_starts: Sequence[tuple[int, int]] | None = None,
        *,
        last_token_reads: bool = True,
        dims: tuple[int, int] | None = None,
    ) -> AttentionConstraints:
        """Map and validate; any problem -> InvalidRequest naming the span (``attention.exclude[1]``).

        ``message_starts`` holds, per chat message, where its content starts in the rendered prompt and its
        length; spans with ``message`` are shifted by it. ``dims`` (layers, heads) bounds emphasis on chosen
        layers/heads; None: the model cannot do that (its attention does not run service/engine/steering.py).
        """
        emphasis = self.emphasis
        if emphasis is not None and dims is None and (emphasis.layers is not None or emphasis.heads is not None):
            raise InvalidRequest(
                "this model's attention cannot be steered on chosen layers or heads; leave out 'layers' and "
                "'heads' to emphasize on all of them",
                param="attention.emphasis",
            )

        def tokens(span: CharSpan, param: str) -> TokenSpan:
            start, end, limit = span.start, span.end, text_len
            if span.message is not None:
                if message_starts is None:
                    raise InvalidRequest("'message' is only for requests with chat messages", param=param)
                if span.message >= len(message_starts):
                    raise InvalidRequest(f"there is no message {span.message}", param=param)
                base, length = message_starts[span.message]
                if end > length:
                    raise InvalidRequest(f"end {end} is past message {span.message}'s {length} characters", param=param)
                start, end, limit = start + base, end + base, text_len
            return char_span_to_tokens(offsets, start, end, limit, param)

        try:
            constraints = AttentionConstraints(
                exclude=tuple(tokens(s, f"attention.exclude[{i}]") for i, s in enumerate(self.exclude)),
                isolate=tuple(
                    tokens(s, f"attention.isolate.segments[{i}]") for i, s in enumerate(self.isolate.segments)
                )
                if self.isolate
                else (),
                restart_positions=bool(self.isolate and self.isolate.restart_positions),
                emphasis=tuple(tokens(s, f"attention.emphasis.spans[{i}]") for i, s in enumerate(self.emphasis.spans))
                if self.emphasis
                else (),
                emphasis_factor=emphasis.factor if emphasis else 1.0,
                emphasis_layers=tuple(emphasis.layers) if emphasis and emphasis.layers is not None else None,
                emphasis_heads=tuple(emphasis.heads) if emphasis and emphasis.heads is not None else None,
            )
            n_layers, n_heads = dims if dims is not None else (None, None)
            validate_constraints(
                len(offsets), constraints, last_token_reads=last_token_reads, n_layers=n_layers, n_heads=n_heads
            )
        except SpanError as exc:
            raise InvalidRequest(
                exc.message if exc.message.startswith(exc.param) else str(exc), param=exc.param
            ) from None
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
