"""Texts and spans shared by the attention-constraint tests (generate and fill-mask)."""

from __future__ import annotations

from typing import Any

PREFIX = "the dog sees the red ball."
SPAN_A = " the cat likes some bread."
SPAN_B = " a bird likes some bread."  # the same number of tokens as SPAN_A on both tiny tokenizers


def isolate_two(first: str, second: str) -> dict[str, Any]:
    """``attention`` isolating ``first`` and ``second`` (placed right after PREFIX), with restarted positions."""
    a0 = len(PREFIX)
    b0 = a0 + len(first)
    segments = [{"start": a0, "end": b0}, {"start": b0, "end": b0 + len(second)}]
    return {"isolate": {"segments": segments, "restart_positions": True}}
