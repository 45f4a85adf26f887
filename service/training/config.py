"""The settings of a fine-tuning run: one dataclass of defaults, and the CLI flags generated from it.

Kept free of torch imports so that ``maskserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from service.config import BUNDLED_MODEL

if TYPE_CHECKING:
    from service.masks.input import InputMasking

CONFIG_FILE = "finetune_config.json"  # the resolved config, written next to the adapter


@dataclass
class FinetuneConfig:
    """Every setting of a run, with its default; ``--resume`` takes them from the saved config."""

    data: str = ""  # .txt (one example per line) or .jsonl
    model: str = BUNDLED_MODEL  # a local Hugging Face model directory, or 'bundled'
    objective: str = "auto"  # mlm | mntp | sft; auto = mlm for encoders, mntp for decoders
    out: str = "runs/finetune"
    steps: int = 1000
    batch_size: int = 16  # examples per step and process
    lr: float = 5e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    init_adapter: str = ""  # start from this adapter's LoRA weights (same r and targets), e.g. the shipped one
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"  # every linear layer but the output head; or comma-separated names
    mask_ratio: float = 0.2
    mask_strategy: str = "whole_word"  # token | whole_word | span
    replace_prob: float = 0.8  # 80/10/10: mask token / random token / kept
    random_prob: float = 0.1
    mean_span: float = 3.0
    # mntp: the token every sentence starts with ('' = the tokenizer's BOS). SmolLM2's BOS is an attention
    # sink whose state hardly depends on the text, so a first word read there cannot depend on it either
    # (docs/finetune.md); the newline token "Ċ" is not.
    prefix_token: str = ""
    first_word_prob: float = 0.0  # mlm/mntp: share of examples whose first word is masked too (sentence starts)
    prompt_loss_weight: float = 0.0  # sft: 0 = prompt tokens masked out of the loss ... 1 = full weight
    max_length: int = 64  # mlm/mntp: tokens per example (truncated)
    pack_length: int = 512  # sft: tokens per packed row
    val_fraction: float = 0.01
    val_max: int = 256
    eval_every: int = 100
    save_every: int = 200
    cloze: str = ""  # cloze file evaluated after training (mlm/mntp); 'default' = service/data/cloze.tsv
    cloze_limit: int = 0  # evaluate only the first N cloze items (0 = all)
    seed: int = 0
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    autocast: str = "none"  # none | bf16 (bfloat16 autocast; faster on CPUs with bf16 support)
    save_dtype: str = "float16"  # adapter weights on disk
    resume: bool = False

    def masking(self) -> InputMasking:
        from service.masks.input import InputMasking, MaskingStrategy

        return InputMasking(
            ratio=self.mask_ratio,
            strategy=MaskingStrategy(self.mask_strategy),
            replace_prob=self.replace_prob,
            random_prob=self.random_prob,
            mean_span=self.mean_span,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (``--batch-size``), defaults from the dataclass: one place for both."""
    for f in fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=f.default)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, dest=f.name, metavar=f.name.upper())


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
