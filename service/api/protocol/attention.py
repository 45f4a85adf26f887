"""The ``attention`` object of a request: character spans of the prompt the model reads around or toward.

    "attention": {"exclude": [{"start": 10, "end": 42}],
                  "isolate": {"segments": [{"start": 0, "end": 20}, {"start": 21, "end": 40}]},
                  "emphasis": {"spans": [{"start": 50, "end": 70}], "factor": 3.0}}

Spans are half-open character ranges ``[start, end)`` of ``prompt`` — or, for chat ``messages``, of the content
of the message numbered ``message``. Each covers every token it touches (``service/api/serving/attention.py``
maps them to tokens).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

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
