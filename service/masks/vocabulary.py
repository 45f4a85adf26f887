"""What output masks need to know of the model's vocabulary: the bytes each token adds to the text."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Vocabulary:
    """What output masks need to know of the model's vocabulary.

    ``token_bytes[i]`` is what token ``i`` adds to the output text (``b""`` for special tokens, which decoding
    skips; ids past the tokenizer's vocabulary also get ``b""``). ``size`` is the model's logit width.
    """

    token_bytes: tuple[bytes, ...]
    eos_ids: frozenset[int]
    special_ids: frozenset[int]

    @property
    def size(self) -> int:
        return len(self.token_bytes)

    @cached_property
    def _sorted(self) -> tuple[list[bytes], list[int]]:
        order = sorted((b, i) for i, b in enumerate(self.token_bytes) if b)
        return [b for b, _ in order], [i for _, i in order]

    def ids_starting_with(self, prefix: bytes) -> list[int]:
        """Tokens whose bytes start with ``prefix`` (a contiguous range of the sorted vocabulary)."""
        keys, ids = self._sorted
        lo = bisect.bisect_left(keys, prefix)
        hi = lo
        while hi < len(keys) and keys[hi].startswith(prefix):
            hi += 1
        return ids[lo:hi]
