"""Bad words: an Aho-Corasick automaton over the words' bytes (Aho & Corasick, 1975).

Its state is the longest suffix of the output that is a prefix of some word; a token is blocked when it would
complete a word from any such suffix, or contains a whole word (see ``service/masks/output.py``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor

from service.masks.vocabulary import Vocabulary


class BadWords:
    """Compiled once per set of words; the per-request state is just a node number (0 = root)."""

    def __init__(self, words: Sequence[bytes], vocab: Vocabulary) -> None:
        self.words = tuple(words)
        goto: list[dict[int, int]] = [{}]
        prefix: list[bytes] = [b""]
        for word in self.words:
            node = 0
            for i, byte in enumerate(word):
                if byte not in goto[node]:
                    goto.append({})
                    prefix.append(word[: i + 1])
                    goto[node][byte] = len(goto) - 1
                node = goto[node][byte]
        self._goto = goto
        self._fail = self._failure_links(goto)
        # Tokens containing a whole word are blocked at every step.
        contains = [i for i, b in enumerate(vocab.token_bytes) if b and any(w in b for w in self.words)]
        self.always = torch.zeros(vocab.size, dtype=torch.bool)  # (V,)
        self.always[contains] = True
        # At node n (the output ends with prefix[n], and with every prefix on n's failure chain), a token is
        # blocked when it starts with the rest of a word that begins with one of those suffixes.
        self._blocked: list[Tensor] = []
        for node in range(len(goto)):
            ids: set[int] = set()
            q = node
            while q:
                for word in self.words:
                    if word.startswith(prefix[q]) and len(word) > len(prefix[q]):
                        ids.update(vocab.ids_starting_with(word[len(prefix[q]) :]))
                q = self._fail[q]
            self._blocked.append(torch.tensor(sorted(ids), dtype=torch.long))

    @staticmethod
    def _failure_links(goto: list[dict[int, int]]) -> list[int]:
        """fail[n]: the node of the longest proper suffix of prefix[n] that is also a prefix of some word."""
        fail = [0] * len(goto)
        queue = deque(goto[0].values())  # breadth first: a node's failure link is known before its children's
        while queue:
            node = queue.popleft()
            for byte, child in goto[node].items():
                f = fail[node]
                while f and byte not in goto[f]:
                    f = fail[f]
                fail[child] = goto[f].get(byte, 0)
                queue.append(child)
        return fail

    def advance(self, node: int, data: bytes) -> int:
        """The automaton's state after the output grew by ``data``."""
        for byte in data:
            while node and byte not in self._goto[node]:
                node = self._fail[node]
            node = self._goto[node].get(byte, 0)
        return node

    def blocked(self, node: int) -> Tensor:
        """Token ids that would complete a word from state ``node`` (besides ``always``).  # (k,) long"""
        return self._blocked[node]
