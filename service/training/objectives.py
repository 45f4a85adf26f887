"""Fine-tuning objectives: examples -> a ``Batch`` of tensors built from ``service/masks``, and its loss.

- ``mlm`` (encoders): input masking (ratio, 80/10/10, whole-word, span), bidirectional attention over real
  tokens, each masked position predicts its own token (BERT, Devlin et al. 2019).
- ``mntp`` (decoders): the same input masking under a *bidirectional* attention mask, but masked token i is
  predicted from the output at i-1, the position a causal LM already uses to predict token i, so the
  pretrained head keeps its meaning (masked next-token prediction, LLM2Vec, BehnamGhader et al. 2024).
  A BOS token is prepended so the first word is predictable too.
- ``sft`` (decoders): prompt/response pairs rendered with the chat template, packed without padding into
  rows; a block-diagonal ∧ causal attention mask and per-example position ids keep the packed examples
  from seeing each other; a loss weight scales prompt tokens (0 = masked ... 1 = full).

Every objective yields the same ``Batch`` (input ids, 4D bool attention mask, position ids, targets read at
each position, loss weights), so one loss function and one training loop serve all three.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from service.masks.attention import (
    bidirectional_mask,
    block_diagonal_mask,
    causal_mask,
    padding_mask,
    position_ids,
    segment_position_ids,
    to_4d,
)
from service.masks.input import IGNORE_INDEX, InputMasking, apply_input_mask, select_positions
from service.masks.loss import next_token_targets, prompt_loss_weights, shift_left, target_weights
from service.training.data import ChatExample, Example


@dataclass
class Batch:
    input_ids: Tensor  # (B, T) long
    attention_mask: Tensor  # (B, 1, T, T) bool, True = attend
    position_ids: Tensor  # (B, T) long
    targets: Tensor  # (B, T) long: what the output at t predicts, IGNORE_INDEX where nothing
    weights: Tensor  # (B, T) float: loss weight of position t, 0 where ignored
    n_tokens: int  # real (non-padding) tokens, for throughput

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.targets.to(device),
            self.weights.to(device),
            self.n_tokens,
        )


@dataclass
class Encoded:
    """One tokenized example. ``word_ids``: word index per token (-1 outside words); ``is_prompt``: sft."""

    ids: list[int]
    word_ids: list[int] = field(default_factory=list)
    is_prompt: list[bool] = field(default_factory=list)


def non_special_ids(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Tensor:
    """Ids that random replacement (the "10% random" of 80/10/10) may draw: no special or added tokens."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    return torch.tensor([i for i in range(min(vocab_size, len(tokenizer))) if i not in special], dtype=torch.long)


def _pad(rows: list[list[int]], width: int, value: int) -> Tensor:
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)  # (B, T)


@dataclass
class MaskedObjective:
    """``mlm`` and ``mntp``: input masking + bidirectional attention; ``shift`` reads targets at i-1."""

    tokenizer: PreTrainedTokenizerBase
    masking: InputMasking
    mask_token_id: int
    random_token_ids: Tensor
    max_length: int
    shift: bool  # MNTP: masked token i is predicted from the output at i-1
    # MNTP: tokens before each sentence (BOS, or BOS then " and"), so that its first word has an i-1
    prefix_ids: tuple[int, ...] = ()
    # Share of examples whose first word is selected as well (on top of the ratio): a uniform choice
    # reaches a sentence's first word about as often as any other, and nearly always a "The"/"He"/"I".
    first_word_prob: float = 0.0
    # MNTP: every text starts with a space, so a first word is " Jupiter" as mid-sentence, not "Jupiter"
    space_first_word: bool = False

    def encode(self, examples: Sequence[Example]) -> list[Encoded]:
        texts = [e for e in examples if isinstance(e, str)]
        if len(texts) != len(examples):
            raise ValueError("mlm/mntp examples are plain text")
        room = self.max_length - len(self.prefix_ids)
        if self.space_first_word:
            texts = [" " + t.lstrip() for t in texts]
        enc = self.tokenizer(texts, add_special_tokens=not self.prefix_ids and not self.shift,
                             truncation=True, max_length=room)  # fmt: skip
        out = []
        for i, ids in enumerate(enc["input_ids"]):
            words = [-1 if w is None else int(w) for w in enc.word_ids(i)]
            if self.prefix_ids:
                ids, words = [*self.prefix_ids, *ids], [*[-1] * len(self.prefix_ids), *words]
            out.append(Encoded(list(ids), words))
        return out

    def collate(self, items: list[Encoded], generator: torch.Generator) -> Batch:
        lengths = [len(it.ids) for it in items]
        width = max(lengths)
        ids = _pad([it.ids for it in items], width, int(self.tokenizer.pad_token_id or 0))  # (B, T)
        words = _pad([it.word_ids for it in items], width, -1)  # (B, T)
        key = padding_mask(lengths, width)  # (B, T)
        candidates = (words >= 0) & key  # (B, T) only real word tokens are ever masked
        selected = torch.stack(
            [select_positions(candidates[b], self.masking, generator, words[b]) for b in range(len(items))]
        )  # (B, T)
        if self.first_word_prob > 0:
            selected |= self._first_words(words, candidates, generator)
        masked, labels = apply_input_mask(
            ids, selected, self.mask_token_id, 0, generator,
            replace_prob=self.masking.replace_prob, random_prob=self.masking.random_prob,
            random_token_ids=self.random_token_ids,
        )  # fmt: skip
        targets = next_token_targets(labels) if self.shift else labels  # (B, T)
        return Batch(
            input_ids=masked,
            attention_mask=to_4d(key, bidirectional_mask(width)),  # (B, 1, T, T)
            position_ids=position_ids(key),
            targets=targets,
            weights=target_weights(targets),
            n_tokens=sum(lengths),
        )

    def _first_words(self, words: Tensor, candidates: Tensor, generator: torch.Generator) -> Tensor:
        """The tokens of each example's first word, in a ``first_word_prob`` share of the examples.  -> (B, T)"""
        big = torch.iinfo(words.dtype).max
        first = words.masked_fill(~candidates, big).min(dim=1).values  # (B,) word ids grow along the text
        draw = torch.rand(len(words), generator=generator, device=generator.device).to(words.device)  # (B,)
        chosen = (draw < self.first_word_prob) & (first < big)  # (B,)
        return chosen[:, None] & (words == first[:, None]) & candidates  # (B, T)


@dataclass
class SftObjective:
    """Prompt/response pairs, packed padding-free, prompt tokens weighted by ``prompt_weight``."""

    tokenizer: PreTrainedTokenizerBase
    pack_length: int
    prompt_weight: float

    def encode(self, examples: Sequence[Example]) -> list[Encoded]:
        out = []
        for ex in examples:
            if not isinstance(ex, ChatExample):
                raise ValueError("sft examples are prompt/response pairs")
            prompt = self._render(ex.messages, generation_prompt=True)
            full = self._render([*ex.messages, {"role": "assistant", "content": ex.response}], generation_prompt=False)
            if full[: len(prompt)] != prompt:
                raise ValueError("the chat template renders the prompt differently once a response follows")
            full = full[: self.pack_length]
            out.append(Encoded(full, is_prompt=[i < len(prompt) for i in range(len(full))]))
        return out

    def _render(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    def pack(self, items: list[Encoded]) -> list[list[int]]:
        """Greedy, in order: item indices per row, each row at most ``pack_length`` tokens."""
        rows: list[list[int]] = []
        used = self.pack_length  # forces a first row
        for i, it in enumerate(items):
            if used + len(it.ids) > self.pack_length:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += len(it.ids)
        return rows

    def collate(self, items: list[Encoded], generator: torch.Generator | None = None) -> Batch:
        rows = self.pack(items)
        ids_rows, seg_rows, prompt_rows = [], [], []
        for row in rows:
            ids_rows.append([t for i in row for t in items[i].ids])
            seg_rows.append([s for s, i in enumerate(row) for _ in items[i].ids])
            prompt_rows.append([int(p) for i in row for p in items[i].is_prompt])
        width = max(len(r) for r in ids_rows)
        ids = _pad(ids_rows, width, int(self.tokenizer.pad_token_id or 0))  # (B, T)
        seg = _pad(seg_rows, width, -1)  # (B, T) -1 = padding
        is_prompt = _pad(prompt_rows, width, 0).bool()  # (B, T)
        key = seg >= 0  # (B, T)
        structure = block_diagonal_mask(seg) & causal_mask(width)  # (B, T, T) own example, past only
        labels = ids.masked_fill(~key, IGNORE_INDEX)  # (B, T)
        targets = next_token_targets(labels, seg)  # (B, T) never across a packed boundary
        weights = prompt_loss_weights(targets, shift_left(is_prompt, True), self.prompt_weight)
        return Batch(
            input_ids=ids,
            attention_mask=to_4d(key, structure),  # (B, 1, T, T)
            position_ids=segment_position_ids(seg),  # restart at 0 for each packed example
            targets=targets,
            weights=weights,
            n_tokens=int(key.sum()),
        )


class LossModule(nn.Module):
    """Weighted token cross-entropy; returns (sum of weighted losses, sum of weights).

    For decoders the LM head runs only at the positions that have a target (about a fifth of them under
    MNTP): the head is ~20% of SmolLM2's compute, most of it otherwise spent on logits no one reads. This
    module is what DDP wraps, so gradients sync whichever path runs.
    """

    def __init__(self, model: nn.Module, *, decoder: bool) -> None:
        super().__init__()
        self.model = model
        self.decoder = decoder

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        sel = batch.weights > 0  # (B, T)
        if self.decoder:
            body, head = decoder_parts(self.model)
            hidden = body(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
            ).last_hidden_state  # (B, T, H)
            logits = head(hidden[sel])  # (N, V)
        else:
            logits = forward_logits(self.model, batch)[sel]  # (N, V)
        ce = nn.functional.cross_entropy(logits.float(), batch.targets[sel], reduction="none")  # (N,)
        weights = batch.weights[sel]
        return (ce * weights).sum(), weights.sum()


def decoder_parts(model: Any) -> tuple[Any, Any]:
    """(transformer body, LM head) of a causal LM, through a PEFT wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def forward_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Full logits under the batch's own masks and positions.  -> (B, T, V)"""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return out.logits
