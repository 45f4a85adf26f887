"""The searches that fill a mask. Each is a generator that yields the rows it needs forwarded and receives
their log-probabilities (one ``(len(reads), V)`` tensor per row), then returns its candidates:

- :func:`top_tokens`: one forward, the ``top_k`` single sub-tokens (what transformers' pipeline does);
- :func:`score_targets`: each target word of ``k`` sub-tokens is scored jointly by the chain rule: the mask
  is widened to ``k`` masks and filled left to right, ``P(w) = prod_j P(w_j | context, w_<j, k masks)``
  (teacher forcing, so all of a target's steps go into one forward);
- :func:`whole_words`: for each length ``n = 1..max_word_tokens`` a beam search fills ``n`` masks left to
  right with one word-start sub-token then continuations; the candidates of all lengths compete on the
  geometric mean of their sub-token probabilities, ``exp(mean_j log P(w_j | ...))`` (length-normalised, as
  X-FACTR ranks multi-token fills, Jiang et al. 2020), so a 3-piece word is not beaten by every 1-piece word
  merely for having more factors below 1. With the rerank on (:meth:`FillMaskCodec.reranks`), the best
  ``top_k`` words are ordered again by :func:`rerank`: the base decoder's probability of the whole sentence
  with the word in it, times the geometric mean to the power ``RERANK_WEIGHT``.

:func:`job_search` steps every mask's search of a job together.

A search names what it reads of each row (a :class:`Pick`: the best ``k`` tokens of one vocabulary family, or
given tokens), and receives only that (:class:`Picked`): no full-vocabulary tensor outlives its forward, so a
step of many rows, held until all its rows are forwarded, costs ``rows x k`` numbers, not ``rows x V``.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.engine.fill.codec import FillMaskCodec, WordPieces
from service.engine.fill.job import Candidate, FillInput, FillMaskJob, FillMaskResult, MaskSlot, Target
from service.masks.constraints import RequestAttention
from service.masks.fill import expand_mask, restrict_vocab

MIN_BEAMS = 5  # whole-word beam width is max(top_k, MIN_BEAMS)
# The rerank's weight on the MNTP geometric mean's log against the sentence's log-probability. Chosen on
# service/data/cloze_everyday.tsv, not on the cloze set the README reports (docs/fill-mask.md, "Rerank").
RERANK_WEIGHT = 2.0
OWN_TOKENS = "own"  # a Pick family: a causal row's own next tokens (the forward gathers them itself)


@dataclass(frozen=True)
class Row:
    """One sequence to forward, where to read predictions (already shifted for MNTP), and its compiled
    attention constraints (None: unconstrained). Rows are deduplicated within a round: equal ids, reads and
    the same compiled constraints (compared by identity) are forwarded once."""

    ids: tuple[int, ...]
    reads: tuple[int, ...]
    attention: RequestAttention | None = None
    causal: bool = False  # read by the base decoder under a causal mask (the rerank), not the MNTP model


@dataclass(frozen=True)
class Pick:
    """What a search keeps of a row's log-probabilities at each read: the ``k`` best tokens of the
    vocabulary family ``family`` (a :class:`WordPieces` field), or, when ``ids`` is given, those tokens;
    family ``OWN_TOKENS``: a causal row's next token at each read (``ids``: those tokens, one per read)."""

    family: str = "real"
    k: int = 0
    ids: tuple[int, ...] = ()
    capital: bool = False  # only the family's capitalised tokens (a word that starts a sentence)


@dataclass(frozen=True)
class Need:
    """One row a search needs forwarded and what it reads of it."""

    row: Row
    pick: Pick


@dataclass(frozen=True)
class Picked:
    """A pick's result: per read, log-probabilities and their token ids (best first for a top-k; in
    ``Pick.ids`` order otherwise; -inf where a family had fewer than ``k`` tokens).  (reads, k) each"""

    logp: Tensor
    ids: Tensor


def pick(logp: Tensor, what: Pick, vocab: WordPieces) -> Picked:
    """Keep what ``what`` names of one row's log-probabilities.  (reads, V) -> (reads, k)

    A causal row's forward already gathered its own next tokens: (reads, 1) -> (reads, 1)."""
    if what.family == OWN_TOKENS:
        return Picked(logp, torch.tensor(what.ids, device=logp.device)[:, None])
    if what.ids:
        ids = torch.tensor(what.ids, device=logp.device).expand(logp.shape[0], -1)  # (reads, k)
        return Picked(logp.gather(1, ids), ids)
    allowed = getattr(vocab, what.family) & vocab.capital if what.capital else getattr(vocab, what.family)
    allowed = allowed.to(logp.device)  # (V,)
    top = restrict_vocab(logp, allowed).topk(min(what.k, logp.shape[-1]))
    return Picked(top.values, top.indices)


def widened_row(codec: FillMaskCodec, inp: FillInput, slot: MaskSlot, filled: Sequence[int], n_masks: int) -> Row:
    """The input with ``slot``'s mask replaced by ``filled`` + ``n_masks`` masks, read at the next one."""
    ids = expand_mask(inp.ids, slot.index, filled, n_masks, codec.mask_id)
    extra = len(filled) + n_masks - 1
    attention = inp.compiled.at(slot.index, extra) if inp.compiled is not None else None
    return Row(tuple(ids), (codec.read(slot.index + len(filled)),), attention)


# A search yields the rows it needs and what it reads of each, receives one Picked per Need, and finally
# returns its value.
Search = Generator[list[Need], list[Picked], Any]


def top_tokens(codec: FillMaskCodec, inp: FillInput, slot: MaskSlot, k: int) -> Search:
    row = Row(inp.ids, (codec.read(slot.index),), inp.compiled.base if inp.compiled else None)
    (top,) = yield [Need(row, Pick("real", k))]
    return [
        Candidate((int(i),), math.exp(float(v)))
        for v, i in zip(top.logp[0], top.ids[0], strict=True)
        if v > float("-inf")
    ]


def score_targets(codec: FillMaskCodec, inp: FillInput, slot: MaskSlot, targets: Sequence[Target], k: int) -> Search:
    needs = []
    for target in targets:
        pieces = target.pieces(slot)
        for j in range(len(pieces)):  # step j: pieces before j filled in, the rest still masked
            needs.append(Need(widened_row(codec, inp, slot, pieces[:j], len(pieces) - j), Pick(ids=(pieces[j],))))
    outs = iter((yield needs))
    scored = []
    for target in targets:
        pieces = target.pieces(slot)
        logp = sum(float(next(outs).logp[0, 0]) for _ in pieces)  # chain rule: log P(w) = sum_j log P(w_j | w_<j)
        scored.append(Candidate(pieces, math.exp(logp)))
    return sorted(scored, key=lambda c: -c.score)[:k]


def whole_words(codec: FillMaskCodec, inp: FillInput, slot: MaskSlot, k: int, max_pieces: int) -> Search:
    beam = max(k, MIN_BEAMS)
    first = "start_spaced" if slot.spaced else "start_bare"
    # beams[n]: the best partial fills (sub-tokens so far, summed log-prob) of an n-sub-token word
    beams: dict[int, list[tuple[tuple[int, ...], float]]] = {n: [((), 0.0)] for n in range(1, max_pieces + 1)}
    for j in range(max_pieces):  # all lengths advance together: step j fills sub-token j
        live = {n: b for n, b in beams.items() if n > j and b}
        if not live:
            break
        # The best `beam` extensions over all of a length's beams are among each beam's own best `beam`.
        what = Pick(first, beam, capital=slot.starts_sentence) if j == 0 else Pick("cont", beam)
        needs = [Need(widened_row(codec, inp, slot, fill, n - j), what) for n, b in live.items() for fill, _ in b]
        outs = iter((yield needs))
        for n, b in live.items():
            picked = [next(outs) for _ in b]
            total = torch.cat([p.logp for p in picked]) + torch.tensor([s for _, s in b])[:, None]  # (beams, beam)
            ids = torch.cat([p.ids for p in picked])  # (beams, beam)
            top = total.flatten().topk(min(beam, total.numel()))
            width = total.shape[1]
            beams[n] = [
                ((*b[int(f) // width][0], int(ids.flatten()[f])), float(v))
                for f, v in zip(top.indices, top.values, strict=True)
                if v > float("-inf")
            ]
    best: dict[str, Candidate] = {}
    for n, b in beams.items():
        for fill, logp_sum in b:
            if len(fill) != n:
                continue
            word = codec.decode(fill)
            if codec.lexicon is not None and not codec.lexicon.is_word(word.strip(), pieces=n, uncased=codec.uncased):
                continue  # "acknowled", "Ale" + "john": sub-tokens that read as one word but are none
            cand = Candidate(fill, math.exp(logp_sum / n))  # geometric mean: length-fair across n
            if cand.score > best.get(word, Candidate((), -1.0)).score:
                best[word] = cand
    found = sorted(best.values(), key=lambda c: -c.score)[:k]
    if not found or not codec.reranks(inp):
        return found
    return (yield from rerank(codec, inp, slot, found))


def rerank(codec: FillMaskCodec, inp: FillInput, slot: MaskSlot, found: Sequence[Candidate]) -> Search:
    """Rank the best ``top_k`` words of a whole-word search again, by

        log P_base(the sentence with the word) + RERANK_WEIGHT * log geometric-mean P_MNTP(word)

    The base decoder reads the filled sentence left to right, so a word that the words after it make likely
    ("Jupiter is the largest planet") gains over a word that fits any sentence start ("It", "The"), which
    MNTP's read of the mask alone favours. Only the order changes, not the set: reranking every word the
    beams completed lost sentence-initial top-5 answers (docs/fill-mask.md, "Rerank"). A candidate's score
    is its share of the joint score over the ``top_k`` (a softmax): the answers stay ranked by their scores."""
    sentences = [codec.sentence_row(inp, slot, c.pieces) for c in found]
    needs = [Need(Row(s, tuple(range(len(s) - 1)), causal=True), Pick(OWN_TOKENS, ids=s[1:])) for s in sentences]
    outs = yield needs
    mntp = [math.log(max(c.score, 1e-300)) for c in found]  # log geometric mean (0 underflows: ~-690)
    joint = torch.tensor(
        [float(o.logp.sum()) + RERANK_WEIGHT * m for o, m in zip(outs, mntp, strict=True)], dtype=torch.float64
    )  # (pool,)
    share = torch.softmax(joint, 0)  # (pool,)
    return [Candidate(found[i].pieces, float(share[i])) for i in joint.argsort(descending=True).tolist()]


def job_search(job: FillMaskJob, codec: FillMaskCodec) -> Generator[list[Need], list[Picked], FillMaskResult]:
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
    pending: dict[int, list[Need]] = {}
    for n, search in enumerate(searches):
        try:
            pending[n] = next(search)
        except StopIteration as stop:
            values[n] = stop.value
    while pending:
        outs = iter((yield [need for needs in pending.values() for need in needs]))
        advanced: dict[int, list[Need]] = {}
        for n, needs in pending.items():
            try:
                advanced[n] = searches[n].send([next(outs) for _ in needs])
            except StopIteration as stop:
                values[n] = stop.value
        pending = advanced
    result: FillMaskResult = [[[] for _ in inp.slots] for inp in job.inputs]
    for (i, s), cands in zip(where, values, strict=True):
        result[i][s] = [codec.render(job.inputs[i], s, c) for c in cands]
    return result
