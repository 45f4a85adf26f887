"""One fill-mask forward: right-padded rows under a bidirectional 4D mask, log-probabilities at the read
positions. Decoders fill masks through an MNTP adapter: bidirectional attention, a reserved mask token, and the
prediction for position i read at i-1 (LLM2Vec, BehnamGhader et al. 2024). The whole-word rerank's causal rows
go through the base decoder instead, under a causal mask (``search.rerank``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from service.engine.fill.codec import WordPieces
from service.engine.fill.job import FillInput
from service.engine.fill.search import Need, Pick, Picked, Row, pick
from service.engine.loading import LoadedModel, ModelKind
from service.engine.steering import AttentionProbe
from service.masks.fill import fill_attention, read_position

ForwardFn = Callable[[Sequence[Row]], list[Tensor]]
HEAD_SLICE = 256  # causal rows: positions sent through the LM head at a time, so (positions, V) stays ~50 MB


def forward_rows(
    model: LoadedModel, rows: Sequence[Row], *, head_only: bool = True, probe: AttentionProbe | None = None
) -> list[Tensor]:
    """One right-padded forward; per row, float32 log-probabilities (len(reads), V) on the CPU.

    Decoders run the head on the read positions only (``head_only``): the LM head is a large share of a small
    model's FLOPs (SmolLM2: 57 of ~270 MFLOP a token) and only a few positions are read. ``probe`` records
    the attention weights of row 0 (inspection). Rows are all causal or none (:func:`forward_needs`).
    """
    if rows[0].causal:
        return sentence_logprobs(model, rows)
    net = model.fill_mask_model
    assert net is not None
    ids, b_idx, t_idx = padded_rows(model, rows)
    masks = fill_attention([len(r.ids) for r in rows], model.fill_mask_dtype, model.device, [r.attention for r in rows])
    steer: dict[str, Any] = {"scoped_bias": masks.scoped_bias} if masks.scoped_bias is not None else {}
    if probe is not None:
        steer["attention_probe"] = probe
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


def padded_rows(model: LoadedModel, rows: Sequence[Row]) -> tuple[Tensor, Tensor, Tensor]:
    """The rows' ids right-padded to the longest, and every read as (row, position) indices.
    (B, S), (R,), (R,)"""
    width = max(len(r.ids) for r in rows)
    pad = int(model.tokenizer.pad_token_id or 0)
    ids = torch.tensor([[*r.ids, *[pad] * (width - len(r.ids))] for r in rows], device=model.device)  # (B, S)
    b_idx = torch.tensor([b for b, r in enumerate(rows) for _ in r.reads], device=model.device)  # (R,)
    t_idx = torch.tensor([t for r in rows for t in r.reads], device=model.device)  # (R,)
    return ids, b_idx, t_idx


def sentence_logprobs(model: LoadedModel, rows: Sequence[Row]) -> list[Tensor]:
    """Causal rows through the base decoder: per row, the float32 log-probability of its next token at each
    read, ``log P(ids[r + 1] | ids[: r + 1])``, gathered here so no ``(positions, V)`` tensor outlives a slice
    of the head.  (len(reads), 1) per row"""
    net = model.generation_model
    assert net is not None
    ids, b_idx, t_idx = padded_rows(model, rows)
    masks = fill_attention([len(r.ids) for r in rows], model.dtype, model.device, causal=True)
    with torch.inference_mode():
        body = net.base_model(
            input_ids=ids, attention_mask=masks.attention, position_ids=masks.position_ids, use_cache=False
        )
        hidden = body.last_hidden_state[b_idx, t_idx]  # (R, H)
        nexts = ids[b_idx, t_idx + 1]  # (R,)
        head = net.get_output_embeddings()
        logp = torch.cat(
            [
                torch.log_softmax(head(h).float(), dim=-1).gather(1, n[:, None])  # (slice, 1)
                for h, n in zip(hidden.split(HEAD_SLICE), nexts.split(HEAD_SLICE), strict=True)
            ]
        ).cpu()  # (R, 1)
    return list(logp.split([len(r.reads) for r in rows]))


def engine_forward(model: LoadedModel) -> ForwardFn:
    """The forward the server runs: the LM head on the read positions only where that equals the full model."""
    head_only = head_only_matches(model)
    return lambda rows: forward_rows(model, rows, head_only=head_only)


def forward_needs(needs: Sequence[Need], forward: ForwardFn, vocab: WordPieces, batch_size: int) -> list[Picked]:
    """One Picked per need, in order: the distinct rows forwarded in chunks of ``batch_size``, shortest first
    (less padding per chunk); of each chunk's log-probabilities only the picks are kept, so at most one
    chunk's ``(rows, V)`` tensor exists at a time, whatever the number of rows."""
    wanted: dict[Row, dict[Pick, None]] = {}  # row -> its distinct picks (rows and picks deduplicated)
    for need in needs:
        wanted.setdefault(need.row, {})[need.pick] = None
    picked: dict[Need, Picked] = {}
    for causal in (False, True):  # a forward runs one model: the MNTP rows, then the rerank's causal rows
        rows = sorted((r for r in wanted if r.causal is causal), key=lambda r: len(r.ids))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            for row, logp in zip(chunk, forward(chunk), strict=True):
                for what in wanted[row]:
                    picked[Need(row, what)] = pick(logp, what, vocab)
    return [picked[need] for need in needs]


def fill_attention_weights(model: LoadedModel, inp: FillInput, lock: threading.Lock) -> dict[int, Tensor]:
    """Per layer, the attention weights (mean over heads) of the input read as fill-mask reads it.  # (T, T)"""
    probe = AttentionProbe()
    read = read_position(inp.slots[0].index, mntp=model.mntp)  # any read position: only the weights are kept
    with lock:
        forward_rows(model, [Row(inp.ids, (read,), inp.compiled.base if inp.compiled else None)], probe=probe)
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
