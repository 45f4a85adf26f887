"""Text <-> token ids for fill-mask on one model: placeholders, the MNTP prefix, targets, rendering answers.

Also the vocabulary classes the searches use (which sub-tokens may fill a mask, start a word, continue one),
computed once per model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.config import Settings
from service.engine.fill.job import Candidate, FillCandidate, FillInput, FillMaskJob, MaskSlot, Target
from service.engine.lexicon import load_lexicon
from service.engine.loading import UNIVERSAL_MASK, LoadedModel, read_adapter_meta
from service.errors import InvalidRequest
from service.masks.fill import expand_mask, read_position

# The text before a mask that starts a sentence (the spaces before the mask are the mask's: not in it)
SENTENCE_END = re.compile(r"(?:^|[.!?][\"')\]]*)\s*$")
WORD_BODY = re.compile(r"[\w'\-]+")  # what a whole-word sub-token may consist of (after its space marker)
SPACE_MARKERS = ("Ġ", "▁")  # byte-level BPE and SentencePiece: the sub-token starts a word after a space


@dataclass(frozen=True)
class WordPieces:
    """Vocabulary classes (each (V,) bool): which sub-tokens may fill a mask, start a word, continue one."""

    real: Tensor  # not a special or added token: may fill a mask at all
    start_spaced: Tensor  # begins a word that follows a space ("Ġdog"; any non-"##" piece for WordPiece)
    start_bare: Tensor  # begins a word with no space before it (text start; "dog" without marker)
    cont: Tensor  # continues the previous sub-token's word ("##g"; a BPE piece without space marker)
    capital: Tensor  # its first letter is upper-case, or it is a digit ("ĠJupiter", "Dogs", "1990")


def special_ids(tokenizer: Any) -> set[int]:
    """Special and added tokens (reserved MNTP masks, chat markers): never a fill, dropped from sequences."""
    ids = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    if tokenizer.unk_token_id is not None:
        ids.add(int(tokenizer.unk_token_id))
    return ids


def word_pieces(tokenizer: Any, vocab_size: int) -> WordPieces:
    """Classify the vocabulary once per model: WordPiece marks continuations with ``##``; byte-level BPE and
    SentencePiece mark word starts with a space marker (``Ġ``, ``▁``). Ids past the tokenizer (a model whose
    embeddings were padded) are never real."""
    n = min(vocab_size, len(tokenizer))
    tokens: list[str] = tokenizer.convert_ids_to_tokens(list(range(n)))
    singles = [[i] for i in range(n)]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast (Rust) tokenizer: ~10x faster decoding
    texts: list[str] = (
        backend.decode_batch(singles, skip_special_tokens=False) if backend else tokenizer.batch_decode(singles)
    )
    prefix = str(getattr(getattr(backend, "model", None), "continuing_subword_prefix", None) or "")
    wordpiece = type(getattr(backend, "model", None)).__name__ == "WordPiece" and bool(prefix)
    specials = special_ids(tokenizer)
    real, spaced, bare, cont, capital = (torch.zeros(vocab_size, dtype=torch.bool) for _ in range(5))
    for i, (tok, text) in enumerate(zip(tokens, texts, strict=True)):
        if i in specials or tok is None:
            continue
        real[i] = True
        first = text.lstrip(" ")[:1]
        capital[i] = first.isupper() or first.isdigit()
        if wordpiece:
            is_cont = tok.startswith(prefix)
            if WORD_BODY.fullmatch(tok.removeprefix(prefix) if is_cont else tok):
                cont[i] = is_cont
                spaced[i] = bare[i] = not is_cont
        else:
            marked = tok.startswith(SPACE_MARKERS)
            if WORD_BODY.fullmatch(text.removeprefix(" ") if marked else text):
                spaced[i] = marked
                bare[i] = cont[i] = not marked
    return WordPieces(real, spaced, bare, cont, capital)


def sentence_start(tokenizer: Any) -> int | None:
    """The token a causal LM's documents start from: BOS, or the end-of-text token where BOS is unset."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return int(start) if start is not None else None


@dataclass(frozen=True)
class MntpConvention:
    """How MNTP training wrote every text, which serving must repeat (the adapter's ``maskserve.json``)."""

    prefix_ids: tuple[int, ...]  # before every text, so a mask at the start has an i-1
    space_first_word: bool  # the text starts with a space: its first word is " Jupiter", as mid-sentence


def mntp_convention(model: LoadedModel) -> MntpConvention:
    """``prefix_token`` (space-separated tokens; unset: the tokenizer's BOS) and ``space_first_word``."""
    meta = read_adapter_meta(Path(model.adapter)) if model.adapter else {}
    tokens = str(meta.get("prefix_token") or model.tokenizer.bos_token or "").split()
    ids = [model.tokenizer.convert_tokens_to_ids(t) for t in tokens]
    prefix = tuple(int(i) for i in ids if isinstance(i, int))
    return MntpConvention(prefix, bool(meta.get("space_first_word")))


class FillMaskCodec:
    """Text <-> token ids for fill-mask on one model: placeholders, prefix/specials, targets, rendering."""

    def __init__(self, model: LoadedModel, settings: Settings) -> None:
        if model.fill_mask_model is None or model.mask_token is None or model.mask_token_id is None:
            raise ValueError("this model cannot fill masks")
        self.tokenizer = model.tokenizer
        self.mask_token: str = model.mask_token
        self.mask_id: int = model.mask_token_id
        self.mntp = model.mntp
        convention = mntp_convention(model) if self.mntp else MntpConvention((), False)
        self.prefix_ids = convention.prefix_ids
        self.space_first_word = convention.space_first_word
        self.max_length = model.max_length
        self.max_masks = settings.max_masks_per_input
        self.specials = special_ids(self.tokenizer)
        self.attention_dims = model.attention_dims if model.steerable else None  # emphasis on chosen layers
        self.dtype = model.fill_mask_dtype  # of the 4D masks
        self.vocab = word_pieces(self.tokenizer, model.vocab_size)
        self.lexicon = load_lexicon(settings.whole_word_lexicon)  # whole-word fills must be words (None: any)
        self.uncased = bool(getattr(self.tokenizer, "do_lower_case", False))  # BERT uncased: "jupiter" is a name
        # A word that starts a sentence is capitalised, where the vocabulary can write one
        self.capitalise_starts = not self.uncased and bool((self.vocab.capital & self.vocab.start_bare).any())
        # The rerank's causal rows start from the token a document starts with (docs/fill-mask.md, "Rerank")
        self.sentence_start = sentence_start(self.tokenizer)
        has_base = model.generation_model is not None and self.sentence_start is not None
        self.rerank = settings.fill_rerank and self.mntp and has_base
        self.placeholders = tuple(dict.fromkeys([UNIVERSAL_MASK, self.mask_token]))
        # Spaces before a placeholder belong to the masked word: BPE writes " dog" as one sub-token "Ġdog",
        # and MNTP training masks that sub-token whole (RoBERTa's <mask> lstrip does the same).
        self._placeholder = re.compile("( *)(" + "|".join(re.escape(p) for p in self.placeholders) + ")")

    def compile(self, job: FillMaskJob) -> None:
        """Compile the job's masks once, for this model (its attention constraints, for every width its
        searches use): the worker on admission, the evaluator's driver before it searches."""
        job.compile(self.dtype, self.attention_dims or (0, 0))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def read(self, index: int) -> int:
        return read_position(index, mntp=self.mntp)

    def reranks(self, inp: FillInput) -> bool:
        """Whether the base decoder reranks this input's whole-word fills: with one mask (the filled
        sentence is then whole text) and no attention spans (the base decoder would read what the client
        kept from the fill's view)."""
        return self.rerank and len(inp.slots) == 1 and inp.attention is None

    def sentence_row(self, inp: FillInput, slot: MaskSlot, pieces: Sequence[int]) -> tuple[int, ...]:
        """The filled sentence as the base decoder reads it: the document start, then the client's text
        (not the MNTP prefix, which is the adapter's convention) with ``pieces`` in the mask's place."""
        assert self.sentence_start is not None
        filled = expand_mask(inp.ids, slot.index, pieces, 0, self.mask_id)[len(self.prefix_ids) :]
        return (self.sentence_start, *filled)

    def placeholder_hint(self) -> str:
        own = f" (or the model's own {self.mask_token})" if self.mask_token != UNIVERSAL_MASK else ""
        return f"write {UNIVERSAL_MASK}{own} where the word to predict goes"

    def encode(self, text: str, param: str) -> FillInput:
        """Placeholders -> the model's mask token, then token ids and (fast tokenizers) each token's
        characters in ``text`` as the client wrote it (for attention spans and inspection)."""
        if not text.strip():
            raise InvalidRequest(f"'{param}' is empty; {self.placeholder_hint()}", param=param)
        spaced: list[bool] = []
        initial: list[bool] = []
        written: list[str] = []
        chunks: list[str] = []
        starts: list[int] = []  # per character of the masked text: where it came from in ``text``
        ends: list[int] = []
        pos = 0
        for m in self._placeholder.finditer(text):
            before = text[: m.start()]
            # A mask at the very start fills a bare word ("Jupiter"), unless training spaced first words
            spaced.append((bool(m.group(1)) and m.start() > 0) or (self.space_first_word and not before.strip()))
            initial.append(SENTENCE_END.search(before) is not None)
            written.append(m.group(2))
            chunks += [text[pos : m.start()], self.mask_token]  # the spaces before a placeholder go with it
            starts += [*range(pos, m.start()), *[m.start(2)] * len(self.mask_token)]
            ends += [*range(pos + 1, m.start() + 1), *[m.end()] * len(self.mask_token)]
            pos = m.end()
        chunks.append(text[pos:])
        starts += range(pos, len(text))
        ends += range(pos + 1, len(text) + 1)
        masked_text = "".join(chunks)
        if self.space_first_word and not masked_text[:1].isspace() and not masked_text.startswith(self.mask_token):
            masked_text, starts, ends = " " + masked_text, [0, *starts], [0, *ends]  # a space the client did not write
        if not spaced:
            raise InvalidRequest(f"'{param}' has no mask; {self.placeholder_hint()}", param=param)
        if len(spaced) > self.max_masks:
            raise InvalidRequest(
                f"'{param}' has {len(spaced)} masks; at most {self.max_masks} are allowed "
                "(MASKSERVE_MAX_MASKS_PER_INPUT)",
                param=param,
            )
        # verbose=False: an over-long input is our 400 below, not a tokenizer warning in the log
        offsets = bool(getattr(self.tokenizer, "is_fast", False))
        enc = self.tokenizer(
            masked_text, add_special_tokens=not self.mntp, verbose=False, return_offsets_mapping=offsets
        )
        ids = list(enc["input_ids"])
        spans = [(starts[a], ends[b - 1]) if b > a else (0, 0) for a, b in enc["offset_mapping"]] if offsets else []
        if self.prefix_ids:
            ids = [*self.prefix_ids, *ids]
            spans = [*[(0, 0)] * len(self.prefix_ids), *spans] if offsets else []
        if len(ids) > self.max_length:
            raise InvalidRequest(
                f"'{param}' is {len(ids)} tokens long; the model takes at most {self.max_length}", param=param
            )
        where = [i for i, t in enumerate(ids) if t == self.mask_id]
        if len(where) != len(spaced):  # a tokenizer that splits or merges its own mask token: never seen
            raise InvalidRequest(f"'{param}': could not place the masks; write them between words", param=param)
        if self.mntp and where[0] == 0:
            raise InvalidRequest(
                f"'{param}' starts with a mask, and this model has no prefix token to predict it from",
                param=param,
            )
        slots = tuple(
            MaskSlot(i, s, w, starts_sentence=f and self.capitalise_starts)
            for i, s, w, f in zip(where, spaced, written, initial, strict=True)
        )
        return FillInput(text, tuple(ids), slots, tuple(spans))

    def encode_target(self, word: str, param: str, max_pieces: int) -> Target:
        text = word.strip()
        if not text or any(c.isspace() for c in text):
            raise InvalidRequest(f"'{param}': target {word!r} is not a single word", param=param)
        spaced = tuple(self.tokenizer(" " + text, add_special_tokens=False)["input_ids"])
        bare = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        for pieces in (spaced, bare):
            if not pieces or any(p in self.specials for p in pieces):
                raise InvalidRequest(
                    f"'{param}': target {word!r} cannot be written with the model's vocabulary", param=param
                )
            if len(pieces) > max_pieces:
                raise InvalidRequest(
                    f"'{param}': target {word!r} is {len(pieces)} sub-tokens; at most {max_pieces} "
                    "(MASKSERVE_MAX_WORD_TOKENS)",
                    param=param,
                )
        return Target(text, spaced, bare)

    def render(self, inp: FillInput, slot_no: int, cand: Candidate) -> FillCandidate:
        slot = inp.slots[slot_no]
        # The MNTP prefix is the model's convention, not the client's text: it may be a word (" and")
        ids = expand_mask(inp.ids, slot.index, cand.pieces, 0, self.mask_id)[len(self.prefix_ids) :]
        others = [s for n, s in enumerate(inp.slots) if n != slot_no]
        sequence = self._sequence(ids, others)
        token_str = self.decode(cand.pieces)
        if not inp.text[:1].isspace():  # a spaced fill at the very start: the client's text has no space there
            sequence = sequence.lstrip(" ")
            if slot.index == len(self.prefix_ids):
                token_str = token_str.lstrip(" ")
        return FillCandidate(
            sequence=sequence, score=cand.score, token=cand.pieces[0], token_str=token_str, pieces=cand.pieces
        )

    def _sequence(self, ids: Sequence[int], other_slots: Sequence[MaskSlot]) -> str:
        """The text with the fill, specials dropped, other masks written back as the client wrote them."""
        kept = [t for t in ids if t == self.mask_id or t not in self.specials]
        text = self.decode(kept)
        parts = text.split(self.mask_token)
        if len(parts) != len(other_slots) + 1:
            return text
        out = parts[0]
        for slot, part in zip(other_slots, parts[1:], strict=True):
            space = " " if slot.spaced and out and not out.endswith(" ") else ""
            out += space + slot.written + part
        return out
