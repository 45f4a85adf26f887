"""Character ranges of a prompt -> token ranges, through the tokenizer's offsets.

A token belongs to a span when its characters overlap the span at all, so a span always covers the whole
of every token it touches (a span never splits a token).
"""

from __future__ import annotations

from collections.abc import Sequence

from service.masks.constraints import TokenSpan
from service.masks.errors import MaskError

Offsets = Sequence[tuple[int, int]]  # (start, end) characters of each token; (0, 0) for special tokens


def char_span_to_tokens(offsets: Offsets, start: int, end: int, text_len: int, param: str) -> TokenSpan:
    if not 0 <= start < end <= text_len:
        raise MaskError(param, f"needs 0 <= start < end <= {text_len} (the prompt's length); got {start}..{end}")
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and start < b]
    if not hits:
        raise MaskError(param, f"characters {start}..{end} contain no token")
    return TokenSpan(hits[0], hits[-1] + 1)
