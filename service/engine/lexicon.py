"""Is a whole-word fill a word? A lexicon of English words and names, and a rule for well-formed names.

The lexicon (``service/data/words.txt.gz``, 135,289 entries, 380 KB) is the union of SCOWL's
``american-english-large`` and ``british-english`` word lists as Debian ships them (packages
``wamerican-large``, ``wbritish``; SCOWL, Copyright 2000-2011 Kevin Atkinson, permissive licence: use, copy,
modify, distribute and sell, with the notice kept), less the ``'s`` possessives. It holds common words
("dog", "hairdresser"), inflections ("firefighters"), contractions ("don't"), names as written ("Jupiter",
"Shakespeare", "NASA").

``is_word(text)``:
- a number (``42``, ``1990``, ``3.5``) or an ordinal (``5th``) is a word;
- lower-case text (``dogs``, ``hairdresser``) is a word if the lexicon holds it in lower case; for an uncased
  model (BERT uncased writes ``jupiter``), in any case;
- capitalised text (``Dogs`` at a sentence start, ``Jupiter``) is a word if the lexicon holds it in any case;
  all-capitals and mixed case (``NASA``, ``McDonald``) only as written;
- a capitalised name the lexicon lacks is a word only when ``pieces == 1``: the model writes it as one
  sub-token, so it is a name frequent enough in the pretraining text to have its own token ("Obama");
  a name assembled from pieces ("Ale" + "john", "Ishig" + "ata") is not;
- hyphenated text only if the list holds it as written (the SCOWL lists hold no hyphenated entry, so a
  compound assembled by the model never passes); a possessive if its stem is a word (``dog's``).

Pure (no torch): the engine and the evaluator share it.
"""

from __future__ import annotations

import gzip
import re
from bisect import bisect_left
from functools import lru_cache
from pathlib import Path

WORDS_FILE = Path(__file__).resolve().parent.parent / "data" / "words.txt.gz"
NUMBER = re.compile(r"\d+(?:[.,]\d+)*|\d+(?:st|nd|rd|th)")
NAME = re.compile(r"[A-Z][a-z]+")  # a well-formed capitalised name: one capital, then lower-case letters


class Lexicon:
    """Word lookups over one word list (one entry per line, as written)."""

    def __init__(self, words: list[str]) -> None:
        self._exact = frozenset(words)
        self._lower = frozenset(w.lower() for w in words)
        self._prefixes = sorted({w.lower() for w in words})

    @classmethod
    def from_file(cls, path: Path) -> Lexicon:
        with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8") as f:
            return cls([line.strip() for line in f if line.strip()])

    def __len__(self) -> int:
        return len(self._exact)

    def is_word(self, text: str, *, pieces: int | None = None, uncased: bool = False) -> bool:
        """Whether ``text`` (one fill, without surrounding spaces) is a word; ``pieces``: its sub-tokens.
        ``uncased``: the model lower-cases everything (BERT uncased), so "paris" stands for "Paris"; a cased
        model's lower-case fill must be a lower-case entry ("cu" and "cf" are, "ven" is not: only "Ven")."""
        if not text or text != text.strip() or " " in text:
            return False
        if NUMBER.fullmatch(text):
            return True
        if "-" in text:
            # Only as listed: compounds of listed parts were nearly all concoctions ("China-China", "Edo-d",
            # "Olympia-land": 152 of 1,009 whole-word answers on the cloze set, docs/finetune.md).
            return text in self._exact or (uncased and text.lower() in self._lower)
        if text.endswith(("'s", "’s")) and len(text) > 2:
            return self.is_word(text[:-2], uncased=uncased)
        if text in self._exact and (text.islower() or text[0].isupper()):
            return True
        if text.islower() or len(text) == 1:
            return uncased and text.lower() in self._lower
        if text[0].isupper() and text[1:].islower():
            return text.lower() in self._lower or (pieces == 1 and NAME.fullmatch(text) is not None)
        return False

    def could_start(self, text: str) -> bool:
        """Whether some lexicon word begins with ``text`` (any case): a partial fill worth extending."""
        low = text.lower()
        i = bisect_left(self._prefixes, low)
        return i < len(self._prefixes) and self._prefixes[i].startswith(low)


@lru_cache(maxsize=1)
def default_lexicon() -> Lexicon:
    return Lexicon.from_file(WORDS_FILE)


def load_lexicon(spec: str) -> Lexicon | None:
    """MASKSERVE_WHOLE_WORD_LEXICON: ``english`` (the bundled list), ``none`` (no word check), or a file."""
    if spec == "english":
        return default_lexicon()
    if spec == "none":
        return None
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"MASKSERVE_WHOLE_WORD_LEXICON: {spec!r} is not 'english', 'none' or a word-list file")
    return Lexicon.from_file(path)


def is_word(text: str, *, pieces: int | None = None, uncased: bool = False) -> bool:
    """``default_lexicon().is_word``: see the module docstring for the rule."""
    return default_lexicon().is_word(text, pieces=pieces, uncased=uncased)
