"""The decode loop: prefill, then one token at a time with a KV cache, for a batch whose rows come and go.

``model.generate()`` takes neither per-request 4D attention masks nor rows that join a running batch, so the
loop is ours. :class:`DecodeBatch` holds the running requests (:class:`Sequence`), their KV cache
(:class:`BatchKVCache`) and their attention mask (:class:`DecodeMask`), kept in step:

- ``add(seqs)``: prefill new requests together (left-padded), choose their first tokens, join them in;
- ``step()``: feed every row's last token, choose the next ones, drop rows that finished;
- ``remove(seqs)``: drop rows that were cancelled or timed out.

Each row carries its own sampling parameters, seed (a ``torch.Generator`` of its own, so a seeded request
samples the same tokens whatever else runs beside it) and output masks. A request for ``n`` sequences is ``n``
rows of one job (``RunningRequest.index`` 0..n-1, seeds ``seed + index``): ``add`` prefills its prompt once
and copies the KV cache to the ``n`` rows. Greedy output is the same alone or in
a batch: rows never mix, padding is masked, and position ids are explicit per row.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import torch
from torch import Tensor

from service.engine.fused_decoder import FusedDecoder
from service.engine.kv_cache import BatchKVCache
from service.engine.loading import LoadedModel
from service.engine.params import FinishReason, SamplingParams
from service.engine.steering import AttentionProbe
from service.engine.text import TextTracker
from service.engine.vocab import ModelVocab
from service.masks.batch import DecodeMask, ScopedBias, batch_attention
from service.masks.constraints import AttentionConstraints, RequestAttention, request_attention
from service.masks.kinds import MaskKind
from service.masks.output import (
    CompiledOutputMask,
    OutputMaskSpec,
    OutputMaskState,
    apply_output_masks,
    compile_output_mask,
    mask_effect,
)


@dataclass
class GenerationJob:
    """One request, as the engine sees it: token ids, what to do with them, and the masks it asked for.

    ``constraints`` and ``output_mask`` are the masks as the request gave them; ``GenerationScheduler.compile``
    compiles them once, before the job runs, into ``attention`` and ``compiled_output``, which the decode loop
    and the mask reports read.
    """

    prompt_ids: list[int]
    params: SamplingParams
    output_mask: OutputMaskSpec = field(default_factory=OutputMaskSpec)
    constraints: AttentionConstraints = field(default_factory=AttentionConstraints)
    stream: bool = False
    record_masks: bool = False  # keep what the output mask did at every step (for inspection)
    request_id: str = field(default_factory=lambda: f"gen-{uuid4().hex}")
    attention: RequestAttention | None = None  # compiled ``constraints``; None = plain causal
    compiled_output: CompiledOutputMask | None = None  # compiled ``output_mask``; None = no output mask
    compiled: bool = False

    @property
    def mask_kinds(self) -> tuple[MaskKind, ...]:
        """Every kind of mask this job applies (for metrics and reports)."""
        attention = self.attention.kinds if self.attention is not None else ()
        return (*attention, *(self.compiled_output.kinds if self.compiled_output is not None else ()))


@dataclass(frozen=True)
class TopLogprob:
    id: int
    text: str
    logprob: float
    raw: bytes


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    logprob: float  # under the distribution after penalties, logit_bias and output masks, before temperature
    special: bool
    raw: bytes  # what the token adds to the output text
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class MaskStep:
    """What the output mask did at one decode step (recorded only when a job asks)."""

    step: int
    token_id: int
    allowed: int
    removed_mass: float
    removed_top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TokenEvent:
    index: int
    choice: int  # which of the request's n sequences
    token: TokenInfo
    text: str  # new text that can be shown now (text that may start a stop sequence is held back)


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str
    finish_reason: FinishReason
    tokens: tuple[TokenInfo, ...]
    prompt_tokens: int
    seed: int
    rest: str  # text not yet sent in token events (streaming)
    mask_steps: tuple[MaskStep, ...] | None = None
    index: int = 0  # which of the request's n sequences

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def compile_job(job: GenerationJob, vocab: ModelVocab, *, dtype: torch.dtype, dims: tuple[int, int]) -> None:
    """Compile the job's masks once: its attention constraints (``dims``: the model's layers and heads, which
    size emphasis on chosen ones) and its output masks. Raises MaskError naming the request field."""
    if job.compiled:
        return
    job.attention = request_attention(len(job.prompt_ids), job.constraints, dtype, n_layers=dims[0], n_heads=dims[1])
    job.compiled_output = compile_output_mask(
        job.output_mask, vocab.vocabulary, encode=vocab.encode, grammars=vocab.grammars
    )
    job.compiled = True


def sequence_seed(base: int, index: int) -> int:
    """The seed of sequence ``index`` of a request seeded ``base``: ``base + index`` (wrapping at 2**63)."""
    return (base + index) % 2**63


class RunningRequest:
    """One sequence of a request while it runs: its tokens, masks, text and random generator.

    ``index``: which of the job's ``n`` sequences; ``base_seed``: the request's seed (drawn once per request
    when it gave none, so that all n sequences derive from the one seed the response reports); ``group``: the
    same object for the n sequences of one request (they share a prefill), a new one by default."""

    def __init__(
        self,
        job: GenerationJob,
        device: torch.device,
        *,
        index: int = 0,
        base_seed: int | None = None,
        group: object | None = None,
    ) -> None:
        if not job.compiled:
            raise ValueError("compile the job's masks first (compile_job)")
        self.job = job
        self.index = index
        self.group = group if group is not None else object()
        self.params = job.params
        self.attention = job.attention or RequestAttention(len(job.prompt_ids))
        mask = job.compiled_output
        self.mask_state: OutputMaskState | None = mask.new_state(job.prompt_ids) if mask is not None else None
        base = base_seed if base_seed is not None else job.params.seed
        self.seed = sequence_seed(base if base is not None else secrets.randbits(63), index)
        self.generator: torch.Generator | None = None
        if not job.params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        self.min_tokens = job.output_mask.min_tokens
        self.text = TextTracker(job.params.stop, self.min_tokens)
        self.generated: list[int] = []
        self.tokens: list[TokenInfo] = []
        self.mask_steps: list[MaskStep] | None = [] if job.record_masks else None
        self.finish_reason: FinishReason | None = None
        self.cancelled = False
        self.ended = False  # its slot was released and its answer (or error) delivered
        self.deadline = float("inf")
        self.submitted = time.monotonic()
        self.emit: Callable[[Any], None] = lambda event: None  # set by the scheduler

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def result(self) -> GenerationResult:
        assert self.finish_reason is not None
        return GenerationResult(
            request_id=self.job.request_id,
            text=self.text.text,
            finish_reason=self.finish_reason,
            tokens=tuple(self.tokens),
            prompt_tokens=len(self.job.prompt_ids),
            seed=self.seed,
            rest=self.text.take_rest(),
            mask_steps=tuple(self.mask_steps) if self.mask_steps is not None else None,
            index=self.index,
        )


class DecodeBatch:
    """The running batch. Runs on one thread; holds ``lock`` around every forward."""

    def __init__(
        self, model: Any, vocab: ModelVocab, *, lock: threading.Lock, pad_id: int, decoder: FusedDecoder | None = None
    ) -> None:
        """``decoder``: the fused decode step of ``model`` (service/engine/fused_decoder.py); prefills always run
        ``model``'s own forward."""
        self.model = model
        self.decoder = decoder
        self.vocab = vocab
        self.lock = lock
        self.pad_id = pad_id
        self.device: torch.device = next(model.parameters()).device
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self.num_layers = int(model.config.num_hidden_layers)
        self.eos_ids = vocab.vocabulary.eos_ids
        self.rows: list[RunningRequest] = []
        self.clear()

    @classmethod
    def serving(cls, loaded: LoadedModel, vocab: ModelVocab, lock: threading.Lock | None = None) -> DecodeBatch:
        """The batch as the server runs it for ``loaded``: its generation model, pad token and fused decoder."""
        assert loaded.generation_model is not None
        tok = loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(vocab.vocabulary.eos_ids))
        return cls(
            loaded.generation_model, vocab, lock=lock or threading.Lock(), pad_id=int(pad), decoder=loaded.decoder
        )

    def clear(self) -> None:
        """Drop every row (and the cache)."""
        self.rows = []
        self.cache: BatchKVCache | None = None
        self.mask: DecodeMask | None = None
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) position of the next fed token
        self.next_tokens = torch.zeros(0, dtype=torch.long, device=self.device)  # (B,) the token fed next step

    # --- the three operations ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, seqs: Sequence[RunningRequest]) -> list[RunningRequest]:
        """Prefill ``seqs`` in one forward and join the ones still running; returns those already finished.

        Sequences of one request (n > 1: the same ``group``) share one prefill row: its logits and KV cache are copied
        to each of them (``index_select`` with repeated indices) before they choose their first tokens."""
        first: dict[int, int] = {}  # id(group) -> its prefill row
        prefill: list[RunningRequest] = []  # one sequence per request, in order
        for s in seqs:
            if id(s.group) not in first:
                first[id(s.group)] = len(prefill)
                prefill.append(s)
        attn = [s.attention for s in prefill]
        mask4, positions, scoped, _ = batch_attention(attn, dtype=self.dtype, device=self.device)  # (P,1,T,T), (P,T)
        width = positions.shape[1]
        ids = torch.full((len(prefill), width), self.pad_id, dtype=torch.long, device=self.device)  # (P, T)
        for b, s in enumerate(prefill):
            ids[b, width - len(s.job.prompt_ids) :] = torch.tensor(s.job.prompt_ids, device=self.device)
        cache = BatchKVCache(self.num_layers)
        logits = self._forward(ids, mask4, positions, cache, scoped)  # (P, V)
        new_mask = DecodeMask.for_prompts(attn, dtype=self.dtype, device=self.device)
        rows = [first[id(s.group)] for s in seqs]
        if len(prefill) < len(seqs):  # copy each shared prompt to its n rows
            spread = torch.tensor(rows, device=self.device)  # (B,)
            logits = logits[spread]  # (B, V)
            cache.select(spread)
            new_mask = new_mask.select(spread)
        attn = [s.attention for s in seqs]
        chosen = self._choose(logits, seqs)
        keep = [b for b, s in enumerate(seqs) if not s.finished]
        done = [s for s in seqs if s.finished]
        if not keep:
            return done
        index = torch.tensor(keep, device=self.device)
        if len(keep) < len(seqs):
            cache.select(index)
            new_mask = new_mask.select(index)
        next_pos = torch.tensor([attn[b].next_position() for b in keep], device=self.device)
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, new_mask
        else:
            self.cache.join(cache)
            self.mask = self.mask.join(new_mask)
        self.rows += [seqs[b] for b in keep]
        self.positions = torch.cat([self.positions, next_pos])
        self.next_tokens = torch.cat([self.next_tokens, chosen[index]])
        return done

    @torch.inference_mode()
    def step(self) -> list[RunningRequest]:
        """One decode step for every row; returns the rows that finished (already dropped)."""
        assert self.mask is not None
        assert self.cache is not None
        mask = self.mask.extend()
        mask4, scoped = mask.to_4d(self.dtype), mask.scoped_bias()  # (B, 1, 1, S)
        if self.decoder is not None:
            with self.lock:
                logits = self.decoder.step(self.next_tokens, mask4, self.positions, self.cache, scoped)  # (B, V)
        else:
            logits = self._forward(self.next_tokens[:, None], mask4, self.positions[:, None], self.cache, scoped)
        self.mask = mask
        self.next_tokens = self._choose(logits, self.rows)
        self.positions = self.positions + 1
        done = [s for s in self.rows if s.finished]
        if done:
            self.remove(done)
        return done

    def remove(self, seqs: Sequence[RunningRequest]) -> None:
        """Drop rows (finished, cancelled or timed out), then the leading columns no remaining row attends."""
        gone = {id(s) for s in seqs}
        keep = [b for b, s in enumerate(self.rows) if id(s) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        assert self.mask is not None
        assert self.cache is not None
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[b] for b in keep]
        self.cache.select(index)
        self.mask = self.mask.select(index)
        self.positions, self.next_tokens = self.positions[index], self.next_tokens[index]
        unused = self.mask.unused_columns()
        if unused:
            self.cache.drop_leading(unused)
            self.mask = self.mask.drop_leading(unused)

    # --- internals --------------------------------------------------------------------------------------------

    def _forward(
        self, ids: Tensor, mask: Tensor, positions: Tensor, cache: BatchKVCache, scoped: ScopedBias | None
    ) -> Tensor:
        """Last-position logits.  ids (B, T), mask (B, 1, T, S), positions (B, T) -> (B, V) float32

        ``scoped`` (emphasis on chosen layers/heads) reaches service/engine/steering.py as a forward kwarg.
        """
        extra = {"scoped_bias": scoped} if scoped is not None else {}
        with self.lock:
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1, **extra,
            )  # fmt: skip
        return out.logits[:, -1].float()

    def _choose(self, logits: Tensor, seqs: Sequence[RunningRequest]) -> Tensor:
        """Penalties, output masks, sampling; every row takes its token. (B, V) -> (B,) chosen token ids."""
        raw = {b: logits[b].clone() for b, s in enumerate(seqs) if s.mask_steps is not None}  # what the model said
        for b, s in enumerate(seqs):
            if s.params.repetition_penalty != 1.0:
                _penalize_repetition(logits[b], s.job.prompt_ids + s.generated, s.params.repetition_penalty)
            if s.params.penalized and s.generated:
                penalize_frequency_presence(
                    logits[b], s.generated, s.params.frequency_penalty, s.params.presence_penalty
                )
        states = [s.mask_state for s in seqs]
        dead = set(apply_output_masks(logits, states)) if any(st is not None for st in states) else set()
        logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
        chosen = logits.argmax(dim=-1)  # (B,) greedy rows are done here
        for b, s in enumerate(seqs):
            if not s.params.greedy and b not in dead:
                chosen[b] = _sample(logits[b], s.params, s.generator)
        chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        for b, (s, tid) in enumerate(zip(seqs, chosen.tolist(), strict=True)):
            if b in dead:
                s.finish_reason = FinishReason.CONSTRAINT
                s.text.finish()
                continue
            top: tuple[TopLogprob, ...] = ()
            if s.params.top_logprobs:
                values, ids = logprobs[b].topk(s.params.top_logprobs)
                top = tuple(  # masked-out alternatives (-inf) are not alternatives
                    TopLogprob(i, self.vocab.texts[i], v, self.vocab.vocabulary.token_bytes[i])
                    for i, v in zip(ids.tolist(), values.tolist(), strict=True)
                    if v > float("-inf")
                )
            if b in raw:
                effect = mask_effect(raw[b], logits[b])
                assert s.mask_steps is not None
                s.mask_steps.append(
                    MaskStep(len(s.generated), tid, effect.allowed, effect.removed_mass, effect.removed_top)
                )
            self._accept(s, tid, chosen_lp[b], top)
        return chosen

    def _accept(self, s: RunningRequest, tid: int, logprob: float, top: tuple[TopLogprob, ...]) -> None:
        raw = self.vocab.vocabulary.token_bytes[tid]
        special = tid in self.vocab.vocabulary.special_ids
        info = TokenInfo(tid, self.vocab.texts[tid], logprob, special, raw, top)
        s.generated.append(tid)
        s.tokens.append(info)
        if s.mask_state is not None:
            s.mask_state.advance(tid, raw)
        if tid in self.eos_ids:
            s.finish_reason = FinishReason.EOS
        else:
            s.text.add(raw, len(s.generated))
            if s.text.stopped:
                s.finish_reason = FinishReason.STOP
            elif len(s.generated) >= s.params.max_new_tokens:
                s.finish_reason = FinishReason.LENGTH
        if s.finished:
            s.text.finish()
        if s.job.stream:
            s.emit(TokenEvent(len(s.generated) - 1, s.index, info, s.text.take_safe()))


@torch.inference_mode()
def prompt_attention_weights(
    model: Any, ids: Sequence[int], attention: RequestAttention | None, lock: threading.Lock
) -> dict[int, Tensor]:
    """Per layer, the attention weights (mean over heads) of the prompt as the prefill reads it.  # (T, T)"""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rows = [attention or RequestAttention(len(ids))]
    mask, positions, scoped, _ = batch_attention(rows, dtype=dtype, device=device)
    probe = AttentionProbe()
    extra: dict[str, Any] = {"attention_probe": probe, **({"scoped_bias": scoped} if scoped is not None else {})}
    with lock:
        model(
            input_ids=torch.tensor([list(ids)], device=device), attention_mask=mask, position_ids=positions,
            use_cache=False, logits_to_keep=1, **extra,
        )  # fmt: skip
    return probe.layers


def _penalize_repetition(row: Tensor, seen: list[int], penalty: float) -> None:
    """CTRL / transformers: divide positive logits of seen tokens by the penalty, multiply negative ones. (V,)"""
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=row.device)
    scores = row[ids]
    row[ids] = torch.where(scores < 0, scores * penalty, scores / penalty)


def penalize_frequency_presence(row: Tensor, generated: Sequence[int], frequency: float, presence: float) -> None:
    """OpenAI's penalties (vLLM applies them the same way, after repetition_penalty), in place on a row (V,):
    ``logit[j] -= c[j] * frequency + (c[j] > 0) * presence``, with ``c[j]`` the times token j was generated so
    far (the prompt does not count)."""
    ids, counts = torch.tensor(list(generated), dtype=torch.long, device=row.device).unique(return_counts=True)
    row[ids] -= counts.to(row.dtype) * frequency + presence  # every id here has c[j] > 0


def _sample(row: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Temperature, top-k, top-p (nucleus, Holtzman et al. 2020), then one draw from the row's own generator."""
    scores = row / params.temperature  # (V,)
    if params.top_k and params.top_k < scores.numel():
        kth = scores.topk(params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the most probable one always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        scores = scores.index_fill(0, order[drop], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
