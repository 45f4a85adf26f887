"""Fill-mask: text -> masked token ids, the searches that fill a mask, and the worker that batches them.

A request becomes a :class:`FillMaskJob` (``FillMaskRequest.to_job``). Each mask of each input is filled by
one *search*, a generator that yields the rows it needs forwarded and receives their log-probabilities:

- :func:`top_tokens`: one forward, the ``top_k`` single sub-tokens (what transformers' pipeline does);
- :func:`score_targets`: each target word of ``k`` sub-tokens is scored jointly by the chain rule: the mask
  is widened to ``k`` masks and filled left to right, ``P(w) = prod_j P(w_j | context, w_<j, k masks)``
  (teacher forcing, so all of a target's steps go into one forward);
- :func:`whole_words`: for each length ``n = 1..max_word_tokens`` a beam search fills ``n`` masks left to
  right with one word-start sub-token then continuations; the candidates of all lengths compete on the
  geometric mean of their sub-token probabilities, ``exp(mean_j log P(w_j | ...))`` (length-normalised, as
  X-FACTR ranks multi-token fills, Jiang et al. 2020), so a 3-piece word is not beaten by every 1-piece word
  merely for having more factors below 1.

The worker (:class:`FillMaskWorker`) groups the searches of concurrent requests into padded forwards
(dynamic batching), one step of every running search per round, and runs each forward in a thread under the
engine's ``compute_lock``. Rows are right-padded and read under a bidirectional 4D mask with explicit
position ids (``service/masks/fill.py``), so a request scores the same alone or in a batch.

Decoders fill masks through an MNTP adapter: bidirectional attention, a reserved mask token, and the
prediction for position i read at i-1 (LLM2Vec, BehnamGhader et al. 2024); a prefix token (BOS) gives a mask
at the start of the text an i-1, as in training.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import threading
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service import metrics
from service.config import Settings
from service.engine.compute import ComputeThread
from service.engine.loading import UNIVERSAL_MASK, LoadedModel, ModelKind, read_adapter_meta
from service.engine.steering import AttentionProbe
from service.errors import InvalidRequest, NotReady, Overloaded, RequestTimeout
from service.masks.attention import AttentionConstraints
from service.masks.fill import expand_mask, fill_attention, read_position, restrict_vocab, widen_constraints

log = logging.getLogger("maskserve.fill_mask")

WORKER = "fill_mask"  # metrics label
MIN_BEAMS = 5  # whole-word beam width is max(top_k, MIN_BEAMS)
WORD_BODY = re.compile(r"[\w'\-]+")  # what a whole-word sub-token may consist of (after its space marker)
SPACE_MARKERS = ("Ġ", "▁")  # byte-level BPE and SentencePiece: the sub-token starts a word after a space


# --- vocabulary --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WordPieces:
    """Vocabulary classes (each (V,) bool): which sub-tokens may fill a mask, start a word, continue one."""

    real: Tensor  # not a special or added token: may fill a mask at all
    start_spaced: Tensor  # begins a word that follows a space ("Ġdog"; any non-"##" piece for WordPiece)
    start_bare: Tensor  # begins a word with no space before it (text start; "dog" without marker)
    cont: Tensor  # continues the previous sub-token's word ("##g"; a BPE piece without space marker)


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
    real, spaced, bare, cont = (torch.zeros(vocab_size, dtype=torch.bool) for _ in range(4))
    for i, (tok, text) in enumerate(zip(tokens, texts, strict=True)):
        if i in specials or tok is None:
            continue
        real[i] = True
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
    return WordPieces(real, spaced, bare, cont)


# --- encoded requests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskSlot:
    index: int  # position of the mask token in ``FillInput.ids``
    spaced: bool  # a space preceded the placeholder: the fill carries it (BPE "Ġdog"), as in training
    written: str  # the placeholder as the client wrote it, for the ``sequence`` of other masks' candidates


@dataclass(frozen=True)
class FillInput:
    text: str
    ids: tuple[int, ...]
    slots: tuple[MaskSlot, ...]
    offsets: tuple[tuple[int, int], ...] = ()  # each token's characters in ``text`` ((0, 0): special tokens);
    # empty with a slow tokenizer (no offsets: no attention spans)
    attention: AttentionConstraints | None = None  # in token positions of ``ids``


@dataclass(frozen=True)
class Target:
    text: str
    spaced: tuple[int, ...]  # sub-tokens after a space
    bare: tuple[int, ...]  # sub-tokens at the start of the text

    def pieces(self, slot: MaskSlot) -> tuple[int, ...]:
        return self.spaced if slot.spaced else self.bare


@dataclass(frozen=True)
class AppliedMask:
    """One mask a request caused, kept with the job (for the inspection endpoint of a later issue)."""

    kind: str  # input | attention | output
    name: str
    detail: dict[str, object] = field(default_factory=dict)


@dataclass
class FillMaskJob:
    """Engine input: encoded texts (with their attention constraints) and what to predict.
    ``applied_masks`` records every mask used."""

    inputs: list[FillInput]
    top_k: int
    targets: list[Target] | None = None
    whole_word: bool = False
    max_word_tokens: int = 1
    batched: bool = False  # ``inputs`` was a list: the response has one entry per input
    applied_masks: list[AppliedMask] = field(default_factory=list)


@dataclass(frozen=True)
class Candidate:
    pieces: tuple[int, ...]  # the sub-tokens that fill the mask
    score: float


@dataclass(frozen=True)
class FillCandidate:
    """One answer, in the Hugging Face Inference API's terms (``pieces`` feeds the extra ``tokens`` field)."""

    sequence: str
    score: float
    token: int  # the (first) sub-token id
    token_str: str  # the whole fill, decoded
    pieces: tuple[int, ...]


FillMaskResult = list[list[list[FillCandidate]]]  # per input, per mask (in order), ranked candidates


def mntp_prefix_id(model: LoadedModel) -> int | None:
    """The token MNTP puts before every text so a mask at the start has an i-1: the adapter's
    ``maskserve.json`` ``prefix_token``, else the tokenizer's BOS (training prepends the same)."""
    meta = read_adapter_meta(Path(model.adapter)) if model.adapter else {}
    token = meta.get("prefix_token") or model.tokenizer.bos_token
    if token is None:
        return None
    token_id = model.tokenizer.convert_tokens_to_ids(str(token))
    return int(token_id) if isinstance(token_id, int) else None


class FillMaskCodec:
    """Text <-> token ids for fill-mask on one model: placeholders, prefix/specials, targets, rendering."""

    def __init__(self, model: LoadedModel, settings: Settings) -> None:
        if model.fill_mask_model is None or model.mask_token is None or model.mask_token_id is None:
            raise ValueError("this model cannot fill masks")
        self.tokenizer = model.tokenizer
        self.mask_token: str = model.mask_token
        self.mask_id: int = model.mask_token_id
        self.mntp = model.mntp
        self.prefix_id = mntp_prefix_id(model) if self.mntp else None
        self.max_length = model.max_length
        self.max_masks = settings.max_masks_per_input
        self.specials = special_ids(self.tokenizer)
        self.attention_dims = model.attention_dims if model.steerable else None  # emphasis on chosen layers
        self.vocab = word_pieces(self.tokenizer, model.vocab_size)
        self.placeholders = tuple(dict.fromkeys([UNIVERSAL_MASK, self.mask_token]))
        # Spaces before a placeholder belong to the masked word: BPE writes " dog" as one sub-token "Ġdog",
        # and MNTP training masks that sub-token whole (RoBERTa's <mask> lstrip does the same).
        self._placeholder = re.compile("( *)(" + "|".join(re.escape(p) for p in self.placeholders) + ")")

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def read(self, index: int) -> int:
        return read_position(index, mntp=self.mntp)

    def placeholder_hint(self) -> str:
        own = f" (or the model's own {self.mask_token})" if self.mask_token != UNIVERSAL_MASK else ""
        return f"write {UNIVERSAL_MASK}{own} where the word to predict goes"

    def encode(self, text: str, param: str) -> FillInput:
        """Placeholders -> the model's mask token, then token ids and (fast tokenizers) each token's
        characters in ``text`` as the client wrote it (for attention spans and inspection)."""
        if not text.strip():
            raise InvalidRequest(f"'{param}' is empty; {self.placeholder_hint()}", param=param)
        spaced: list[bool] = []
        written: list[str] = []
        chunks: list[str] = []
        starts: list[int] = []  # per character of the masked text: where it came from in ``text``
        ends: list[int] = []
        pos = 0
        for m in self._placeholder.finditer(text):
            spaced.append(bool(m.group(1)) and m.start() > 0)
            written.append(m.group(2))
            chunks += [text[pos : m.start()], self.mask_token]  # the spaces before a placeholder go with it
            starts += [*range(pos, m.start()), *[m.start(2)] * len(self.mask_token)]
            ends += [*range(pos + 1, m.start() + 1), *[m.end()] * len(self.mask_token)]
            pos = m.end()
        chunks.append(text[pos:])
        starts += range(pos, len(text))
        ends += range(pos + 1, len(text) + 1)
        masked_text = "".join(chunks)
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
        if self.mntp and self.prefix_id is not None:
            ids = [self.prefix_id, *ids]
            spans = [(0, 0), *spans] if offsets else []
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
        slots = tuple(MaskSlot(i, s, w) for i, s, w in zip(where, spaced, written, strict=True))
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
        ids = expand_mask(inp.ids, slot.index, cand.pieces, 0, self.mask_id)
        others = [s for n, s in enumerate(inp.slots) if n != slot_no]
        return FillCandidate(
            sequence=self._sequence(ids, others),
            score=cand.score,
            token=cand.pieces[0],
            token_str=self.decode(cand.pieces),
            pieces=cand.pieces,
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


# --- searches ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One sequence to forward, where to read predictions (already shifted for MNTP), and its attention
    constraints in its own token positions."""

    ids: tuple[int, ...]
    reads: tuple[int, ...]
    attention: AttentionConstraints | None = None


def widened_row(codec: FillMaskCodec, inp: FillInput, slot: MaskSlot, filled: Sequence[int], n_masks: int) -> Row:
    """The input with ``slot``'s mask replaced by ``filled`` + ``n_masks`` masks, read at the next one."""
    ids = expand_mask(inp.ids, slot.index, filled, n_masks, codec.mask_id)
    extra = len(filled) + n_masks - 1
    attention = widen_constraints(inp.attention, slot.index, extra) if inp.attention is not None else None
    return Row(tuple(ids), (codec.read(slot.index + len(filled)),), attention)


# A search yields the rows it needs, receives one (len(reads), V) log-probability tensor per row, and
# finally returns its value.
Search = Generator[list[Row], list[Tensor], Any]


def top_tokens(codec: FillMaskCodec, inp: FillInput, slot: MaskSlot, k: int) -> Search:
    (logp,) = yield [Row(inp.ids, (codec.read(slot.index),), inp.attention)]
    top = restrict_vocab(logp, codec.vocab.real)[0].topk(min(k, logp.shape[-1]))  # (k,)
    return [
        Candidate((int(i),), math.exp(float(v)))
        for v, i in zip(top.values, top.indices, strict=True)
        if v > float("-inf")
    ]


def score_targets(codec: FillMaskCodec, inp: FillInput, slot: MaskSlot, targets: Sequence[Target], k: int) -> Search:
    rows = []
    for target in targets:
        pieces = target.pieces(slot)
        for j in range(len(pieces)):  # step j: pieces before j filled in, the rest still masked
            rows.append(widened_row(codec, inp, slot, pieces[:j], len(pieces) - j))
    outs = iter((yield rows))
    scored = []
    for target in targets:
        pieces = target.pieces(slot)
        logp = sum(float(next(outs)[0, p]) for p in pieces)  # chain rule: log P(w) = sum_j log P(w_j | w_<j)
        scored.append(Candidate(pieces, math.exp(logp)))
    return sorted(scored, key=lambda c: -c.score)[:k]


def whole_words(codec: FillMaskCodec, inp: FillInput, slot: MaskSlot, k: int, max_pieces: int) -> Search:
    beam = max(k, MIN_BEAMS)
    first = codec.vocab.start_spaced if slot.spaced else codec.vocab.start_bare
    # beams[n]: the best partial fills (sub-tokens so far, summed log-prob) of an n-sub-token word
    beams: dict[int, list[tuple[tuple[int, ...], float]]] = {n: [((), 0.0)] for n in range(1, max_pieces + 1)}
    for j in range(max_pieces):  # all lengths advance together: step j fills sub-token j
        live = {n: b for n, b in beams.items() if n > j and b}
        if not live:
            break
        rows = [widened_row(codec, inp, slot, fill, n - j) for n, b in live.items() for fill, _ in b]
        outs = iter((yield rows))
        allowed = first if j == 0 else codec.vocab.cont
        for n, b in live.items():
            logp = restrict_vocab(torch.cat([next(outs) for _ in b]), allowed)  # (beams, V)
            total = logp + torch.tensor([s for _, s in b])[:, None]  # (beams, V)
            top = total.flatten().topk(min(beam, total.numel()))
            width = total.shape[1]
            beams[n] = [
                ((*b[int(f) // width][0], int(f) % width), float(v))
                for f, v in zip(top.indices, top.values, strict=True)
                if v > float("-inf")
            ]
    best: dict[str, Candidate] = {}
    for n, b in beams.items():
        for fill, logp_sum in b:
            if len(fill) != n:
                continue
            word = codec.decode(fill)
            cand = Candidate(fill, math.exp(logp_sum / n))  # geometric mean: length-fair across n
            if cand.score > best.get(word, Candidate((), -1.0)).score:
                best[word] = cand
    return sorted(best.values(), key=lambda c: -c.score)[:k]


def job_search(job: FillMaskJob, codec: FillMaskCodec) -> Generator[list[Row], list[Tensor], FillMaskResult]:
    """Every mask's search, stepped together; returns the rendered result."""
    searches: list[Search] = []
    where: list[tuple[int, int]] = []
    for i, inp in enumerate(job.inputs):
        for s, slot in enumerate(inp.slots):
            if job.targets is not None:
                searches.append(score_targets(codec, inp, slot, job.targets, job.top_k))
            elif job.whole_word:
                searches.append(whole_words(codec, inp, slot, job.top_k, job.max_word_tokens))
            else:
                searches.append(top_tokens(codec, inp, slot, job.top_k))
            where.append((i, s))
    values: list[list[Candidate]] = [[] for _ in searches]
    pending: dict[int, list[Row]] = {}
    for n, search in enumerate(searches):
        try:
            pending[n] = next(search)
        except StopIteration as stop:
            values[n] = stop.value
    while pending:
        outs = iter((yield [row for rows in pending.values() for row in rows]))
        advanced: dict[int, list[Row]] = {}
        for n, rows in pending.items():
            try:
                advanced[n] = searches[n].send([next(outs) for _ in rows])
            except StopIteration as stop:
                values[n] = stop.value
        pending = advanced
    result: FillMaskResult = [[[] for _ in inp.slots] for inp in job.inputs]
    for (i, s), cands in zip(where, values, strict=True):
        result[i][s] = [codec.render(job.inputs[i], s, c) for c in cands]
    return result


# --- the forward -------------------------------------------------------------------------------------------

ForwardFn = Callable[[Sequence[Row]], list[Tensor]]


def forward_rows(
    model: LoadedModel, rows: Sequence[Row], *, head_only: bool = True, probe: AttentionProbe | None = None
) -> list[Tensor]:
    """One right-padded forward; per row, float32 log-probabilities (len(reads), V) on the CPU.

    Decoders run the head on the read positions only (``head_only``): the LM head is a large share of a small
    model's FLOPs (SmolLM2: 57 of ~270 MFLOP a token) and only a few positions are read. ``probe`` records
    the attention weights of row 0 (inspection).
    """
    net = model.fill_mask_model
    assert net is not None
    lengths = [len(r.ids) for r in rows]
    width = max(lengths)
    pad = int(model.tokenizer.pad_token_id or 0)
    ids = torch.tensor([[*r.ids, *[pad] * (width - len(r.ids))] for r in rows], device=model.device)  # (B, S)
    dims = model.attention_dims if model.steerable else (0, 0)
    masks = fill_attention(lengths, model.dtype, model.device, [r.attention for r in rows], dims)
    steer: dict[str, Any] = {"scoped_bias": masks.scoped_bias} if masks.scoped_bias is not None else {}
    if probe is not None:
        steer["attention_probe"] = probe
    b_idx = torch.tensor([b for b, r in enumerate(rows) for _ in r.reads], device=model.device)  # (R,)
    t_idx = torch.tensor([t for r in rows for t in r.reads], device=model.device)  # (R,)
    with torch.inference_mode():
        if model.kind is ModelKind.DECODER:
            if head_only:
                body = net.base_model(
                    input_ids=ids, attention_mask=masks.attention, position_ids=masks.position_ids, use_cache=False,
                    **steer,
                )  # fmt: skip
                logits = net.get_output_embeddings()(body.last_hidden_state[b_idx, t_idx])  # (R, V)
            else:
                out = net(
                    input_ids=ids, attention_mask=masks.attention, position_ids=masks.position_ids, use_cache=False,
                    **steer,
                )  # fmt: skip
                logits = out.logits[b_idx, t_idx]  # (R, V)
        else:
            # Encoders keep their own position ids: under right padding a real token's position does not
            # depend on the batch. Only restarted positions (isolate) are passed, shifted past padding_idx
            # for the encoders (RoBERTa) whose positions start there.
            if masks.restarted:
                steer["position_ids"] = masks.position_ids + encoder_position_offset(net)
            logits = net(input_ids=ids, attention_mask=masks.attention, **steer).logits[b_idx, t_idx]  # (R, V)
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # (R, V)
    return list(logp.split([len(r.reads) for r in rows]))


def fill_attention_weights(model: LoadedModel, inp: FillInput, lock: threading.Lock) -> dict[int, Tensor]:
    """Per layer, the attention weights (mean over heads) of the input read as fill-mask reads it.  # (T, T)"""
    probe = AttentionProbe()
    read = read_position(inp.slots[0].index, mntp=model.mntp)  # any read position: only the weights are kept
    with lock:
        forward_rows(model, [Row(inp.ids, (read,), inp.attention)], probe=probe)
    return probe.layers


def encoder_position_offset(net: Any) -> int:
    """Where an encoder's position ids start: ``padding_idx + 1`` for RoBERTa-style embeddings, else 0."""
    padding_idx = getattr(getattr(net.base_model, "embeddings", None), "padding_idx", None)
    return padding_idx + 1 if isinstance(padding_idx, int) else 0


def head_only_matches(model: LoadedModel) -> bool:
    """Whether head-on-read-positions equals the full model here (it would not with logit scaling or
    soft-capping, which some architectures add after the head)."""
    if model.kind is not ModelKind.DECODER:
        return False
    ids = tuple(range(3, 9))
    row = Row(ids, (2, 5))
    fast, full = forward_rows(model, [row])[0], forward_rows(model, [row], head_only=False)[0]
    return bool(torch.allclose(fast, full, atol=1e-4))


# --- the worker --------------------------------------------------------------------------------------------


class ClientGone(Exception):
    """The client disconnected before its answer; nothing is sent."""


@dataclass(eq=False)
class _Pending:
    job: FillMaskJob
    future: asyncio.Future[FillMaskResult]
    search: Generator[list[Row], list[Tensor], FillMaskResult] | None = None
    rows: list[Row] = field(default_factory=list)
    result: FillMaskResult | None = None
    error: BaseException | None = None
    abandoned: bool = False  # timed out or client gone: dropped before any further forward

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None


class FillMaskWorker:
    """Dynamic batching for fill-mask: a bounded queue, rounds of padded forwards in a thread."""

    def __init__(
        self,
        model: LoadedModel,
        settings: Settings,
        compute_lock: threading.Lock,
        forward: ForwardFn | None = None,
        *,
        compute: ComputeThread | None = None,
    ) -> None:
        """``compute``: the thread rounds run on (the engine's; without one, a private one is made)."""
        self.model = model
        self.settings = settings
        self.codec = FillMaskCodec(model, settings)
        self._lock = compute_lock
        if forward is None:
            head_only = head_only_matches(model)
            forward = lambda rows: forward_rows(model, rows, head_only=head_only)  # noqa: E731
        self._forward = forward
        self._capacity = settings.max_batch_size + settings.max_queued_requests
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._outstanding = 0  # queued + running
        self._active: list[_Pending] = []  # admitted: their searches advance one step per round
        self._task: asyncio.Task[None] | None = None
        self._owns_compute = compute is None
        self._runner = compute or ComputeThread()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fill-mask-worker")

    async def stop(self) -> None:
        """Stop the loop; requests still queued or running fail with 503."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        waiting = self._active + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(NotReady("the server is shutting down"))
        self._active = []
        if self._owns_compute:
            self._runner.shutdown()

    async def submit(
        self, job: FillMaskJob, *, client_gone: Callable[[], Awaitable[object]] | None = None
    ) -> FillMaskResult:
        """Queue a job and wait for its result (RequestTimeout, Overloaded, ClientGone otherwise).

        ``client_gone`` makes an awaitable that finishes when the client disconnects (made only once queued).
        """
        if self._outstanding >= self._capacity:
            metrics.REJECTED.labels("queue_full").inc()
            raise Overloaded(f"fill-mask queue is full ({self._capacity} requests running or waiting); retry shortly")
        pending = _Pending(job, asyncio.get_running_loop().create_future())
        self._outstanding += 1
        self._queue.put_nowait(pending)
        self._arrived.set()
        metrics.QUEUE_DEPTH.labels(WORKER).set(self._queue.qsize())
        gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        try:
            waiting: set[asyncio.Future[Any]] = {pending.future} | ({gone} if gone else set())
            done, _ = await asyncio.wait(
                waiting, timeout=self.settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if pending.future in done:
                return pending.future.result()
            if gone is not None and gone in done:
                raise ClientGone()
            raise RequestTimeout(
                f"fill-mask did not finish within {self.settings.request_timeout_s:g} s (MASKSERVE_REQUEST_TIMEOUT_S)"
            )
        finally:
            if not pending.future.done():
                pending.abandoned = True
                pending.future.cancel()
            if gone is not None:
                gone.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wait_s = self.settings.max_batch_wait_ms / 1000
        while True:
            if not self._active:
                self._active.append(await self._queue.get())
                deadline = loop.time() + wait_s  # a fresh batch: let concurrent requests join it
            else:
                deadline = loop.time()  # searches mid-way go on at once, with whatever has queued meanwhile
            while len(self._active) < self.settings.max_batch_size:
                if not self._queue.empty():
                    self._active.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
                except TimeoutError:
                    break
            self._active = self._retire(self._active, lambda p: p.abandoned)
            metrics.QUEUE_DEPTH.labels(WORKER).set(self._queue.qsize())
            metrics.RUNNING.labels(WORKER).set(len(self._active))
            if not self._active:
                continue
            try:
                await self._runner.run(self._round, self._active)
            except Exception as exc:  # a bug in the round itself: fail its requests, keep serving others
                log.exception("fill-mask round failed")
                for p in self._active:
                    p.error = p.error or exc
            for p in self._active:
                if p.finished and not p.future.done():
                    if p.error is not None:
                        p.future.set_exception(p.error)
                    else:
                        p.future.set_result(p.result)  # type: ignore[arg-type]
            self._active = self._retire(self._active, lambda p: p.finished)

    def _retire(self, active: list[_Pending], gone: Callable[[_Pending], bool]) -> list[_Pending]:
        kept = [p for p in active if not gone(p)]
        self._outstanding -= len(active) - len(kept)
        return kept

    def _round(self, active: list[_Pending]) -> None:
        """In a thread: start new searches, forward every row they need, advance each by one step."""
        for p in active:
            if p.search is None:
                for mask in p.job.applied_masks:
                    metrics.MASKS_APPLIED.labels(mask.kind).inc()
                for kind in {k for inp in p.job.inputs if inp.attention is not None for k in inp.attention.kinds}:
                    metrics.MASKS_APPLIED.labels(f"attention_{kind}").inc()
                p.search = job_search(p.job, self.codec)
                self._advance(p, None)
        live = [p for p in active if not p.finished]
        if not live:
            return
        try:
            outs = self._compute(dict.fromkeys(row for p in live for row in p.rows))
        except Exception as exc:  # a failed forward fails its round, not the worker
            log.exception("fill-mask forward failed")
            for p in live:
                p.error = exc
            return
        for p in live:
            self._advance(p, [outs[row] for row in p.rows])

    def _advance(self, p: _Pending, outs: list[Tensor] | None) -> None:
        assert p.search is not None
        try:
            p.rows = next(p.search) if outs is None else p.search.send(outs)
        except StopIteration as stop:
            p.result = stop.value
        except Exception as exc:
            log.exception("fill-mask search failed")
            p.error = exc

    def _compute(self, unique: dict[Row, None]) -> dict[Row, Tensor]:
        """Forward distinct rows in chunks of max_batch_size, shortest first (less padding per chunk)."""
        rows = sorted(unique, key=lambda r: len(r.ids))
        size = self.settings.max_batch_size
        outs: dict[Row, Tensor] = {}
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            with self._lock:
                logps = self._forward(chunk)
            metrics.BATCH_SIZE.labels(WORKER).observe(len(chunk))
            metrics.PROMPT_TOKENS.labels(WORKER).inc(sum(len(r.ids) for r in chunk))
            outs.update(zip(chunk, logps, strict=True))
        return outs
