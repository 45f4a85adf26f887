"""Small models trained from scratch with the project's fine-tuning objectives (experiments 2-4).

The objectives are the ones ``maskserve finetune`` runs (service/training/objectives.py: each builds its
batch — input mask, 4D attention mask, position ids, targets, loss weights — from service/masks, and
``LossModule`` computes the weighted loss), so what these experiments measure is what the project trains.
What differs is the model and the loop: ``maskserve finetune`` trains LoRA adapters on a pretrained base,
and on this CPU budget a pretrained base is out of reach for a dozen runs an experiment. A LoRA adapter on a
random-init tiny model learned nothing in 1000 steps here (exact match 0% on the packing task), so these
runs train every parameter of a small model built on the tiny test tokenizers (tests/tiny.py).
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from bench.experiments.common import tiny_llama_dir
from service.training.data import batch_indices
from service.training.objectives import Batch, Encoded, LossModule

Collate = Callable[[list[Encoded], torch.Generator], Batch]


@functools.cache
def tiny_bert_dir() -> Path:
    from tests.tiny import build_tiny_bert

    return build_tiny_bert(Path(tempfile.mkdtemp(prefix="maskserve-tiny-bert-")))


def small_model(kind: str, *, hidden: int, layers: int, heads: int = 4, seed: int) -> tuple[PreTrainedModel, Tokenizer]:
    """A fresh ``decoder`` (Llama) or ``encoder`` (BERT) of the given size, on the tiny test tokenizer."""
    source = tiny_llama_dir() if kind == "decoder" else tiny_bert_dir()
    config = AutoConfig.from_pretrained(source)
    config.hidden_size, config.intermediate_size = hidden, 2 * hidden
    config.num_hidden_layers, config.num_attention_heads = layers, heads
    if kind == "decoder":
        config.num_key_value_heads, config.head_dim = heads, hidden // heads
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if kind == "decoder" else AutoModelForMaskedLM
    model = auto.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def train(model: PreTrainedModel, collate: Collate, data: Sequence[Encoded], *, decoder: bool, steps: int,
          batch_size: int, lr: float, seed: int, every: int = 0,
          checkpoint: Callable[[int], None] | None = None) -> list[float]:  # fmt: skip
    """AdamW on every parameter, linear warmup (5%) then cosine to 10%; batches drawn as ``maskserve
    finetune`` draws them (service/training/data.batch_indices). ``checkpoint(step)`` runs every ``every``
    steps, the model in eval mode. Returns the training loss per step."""
    loss_module = LossModule(model, decoder=decoder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses = []
    for step in range(steps):
        idx = batch_indices(len(data), batch_size, seed, step)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)  # the input masks of this step
        s, w = loss_module(collate([data[i] for i in idx], gen))
        loss = s / w.clamp_min(1e-8)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if checkpoint is not None and every and (step + 1) % every == 0:
            model.eval()
            checkpoint(step + 1)
            model.train()
    model.eval()
    return losses


@torch.no_grad()
def weighted_loss(model: PreTrainedModel, batch: Batch, *, decoder: bool) -> float:
    s, w = LossModule(model, decoder=decoder)(batch)
    return float(s / w.clamp_min(1e-8))
