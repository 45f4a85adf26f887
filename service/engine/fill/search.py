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
  merely for having more factors below 1.

:func:`job_search` steps every mask's search of a job together.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.engine.fill.codec import FillMaskCodec
from service.engine.fill.job import Candidate, FillInput, FillMaskJob, FillMaskResult, MaskSlot, Target
from service.masks.constraints import RequestAttention
from service.masks.fill import expand_mask, restrict_vocab

MIN_BEAMS = 5  # whole-word beam width is max(top_k, MIN_BEAMS)


@dataclass(frozen=True)
class Row:
    """One sequence to forward, where to read predictions (already shifted for MNTP), and its compiled
    attention constraints (None: unconstrained). Rows are deduplicated within a round: equal ids, reads and
    the same compiled constraints (compared by identity) are forwarded once."""

    ids: tuple[int, ...]
    reads: tuple[int, ...]
    attention: RequestAttention | None = None


def widened_row(codec: FillMaskCodec, inp: FillInput, slot: MaskSlot, filled: Sequence[int], n_masks: int) -> Row:
    """The input with ``slot``'s mask replaced by ``filled`` + ``n_masks`` masks, read at the next one."""
    ids = expand_mask(inp.ids, slot.index, filled, n_masks, codec.mask_id)
    extra = len(filled) + n_masks - 1
    attention = inp.compiled.at(slot.index, extra) if inp.compiled is not None else None
    return Row(tuple(ids), (codec.read(slot.index + len(filled)),), attention)


# A search yields the rows it needs, receives one (len(reads), V) log-probability tensor per row, and
# finally returns its value.
Search = Generator[list[Row], list[Tensor], Any]


def top_tokens(codec: FillMaskCodec, inp: FillInput, slot: MaskSlot, k: int) -> Search:
    (logp,) = yield [Row(inp.ids, (codec.read(slot.index),), inp.compiled.base if inp.compiled else None)]
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
