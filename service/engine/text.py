"""A sequence's output text as tokens arrive: incremental UTF-8, stop sequences, what is safe to stream.

The text is the UTF-8 decoding of the concatenated token bytes (special tokens add nothing), so a character
split across tokens appears once it is complete. Stop sequences end the output before them (OpenAI's rule);
they count only once ``min_tokens`` tokens were generated. While streaming, text that might be the start of a
stop sequence is held back until it is clear.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextTracker:
    def __init__(self, stop: Sequence[str] = (), min_tokens: int = 0) -> None:
        self.stop = tuple(s for s in stop if s)
        self.min_tokens = min_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._search_from = 0
        self.text = ""
        self.emitted = 0  # characters already streamed
        self.stopped = False

    def add(self, data: bytes, generated: int) -> None:
        """Append a token's bytes; ``generated`` counts tokens so far, this one included."""
        before = len(self.text)
        self.text += self._decoder.decode(data)
        if not self.stop:
            return
        if generated <= self.min_tokens:  # stop sequences do not count yet: never match this text
            self._search_from = len(self.text)
            return
        start = max(self._search_from, before - self._max_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def finish(self) -> None:
        """The sequence ended: flush an incomplete character (as U+FFFD)."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)

    def take_safe(self) -> str:
        """New text that can be streamed now (not possibly the start of a stop sequence)."""
        end = len(self.text)
        if self.stop and not self.stopped:
            end -= self._held_back()
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted : end], end
        return out

    def take_rest(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop sequence."""
        for k in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
