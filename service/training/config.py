"""The settings of a fine-tuning run and of a cloze evaluation: dataclasses of defaults, each field with its
meaning beside it, and the CLI flags generated from them (``service/cli_args.py``): one place for all three.

Kept free of torch imports so that ``maskserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import TYPE_CHECKING

from service.cli_args import add_dataclass_flags, option
from service.config import BUNDLED_MODEL, DType

if TYPE_CHECKING:
    from service.masks.input import InputMasking

CONFIG_FILE = "finetune_config.json"  # the resolved config, written next to the adapter
AUTO = "auto"


class Objective(StrEnum):
    MLM = "mlm"
    MNTP = "mntp"
    SFT = "sft"


class Autocast(StrEnum):
    NONE = "none"
    BF16 = "bf16"


class EvalMode(StrEnum):
    PLAIN = "plain"
    WHOLE_WORD = "whole_word"


# The values of service.masks.input.MaskingStrategy, which imports torch; tests/unit/test_cli_help.py keeps
# the two equal.
MASK_STRATEGIES = ("token", "whole_word", "span")
BOTH_MODES = "both"


@dataclass
class FinetuneConfig:
    """Every setting of a run, with its default and meaning; ``--resume`` takes them from the saved config."""

    data: str = option("", "training data: .txt (one example per line; mlm, mntp) or .jsonl (required unless --resume)")
    model: str = option(BUNDLED_MODEL, "a local Hugging Face model directory, or 'bundled' (SmolLM2-135M-Instruct)")
    objective: str = option(
        AUTO,
        "mlm (encoders), mntp (masked next-token prediction, decoders) or sft (prompt/response pairs, "
        "decoders); auto = mlm for encoders, mntp for decoders",
        choices=(AUTO, *Objective),
    )
    out: str = option("runs/finetune", "output directory: the adapter, model card, curve and checkpoint")
    steps: int = option(1000, "optimizer steps")
    batch_size: int = option(16, "examples per step and process")
    lr: float = option(5e-4, "peak learning rate (AdamW)")
    warmup_steps: int = option(50, "steps of linear warmup before the cosine decay")
    min_lr_ratio: float = option(0.1, "cosine decay ends at lr * this")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient norm clip")
    init_adapter: str = option(
        "", "start from this adapter's LoRA weights (same r and targets), e.g. the shipped one; unset = fresh"
    )
    lora_r: int = option(16, "LoRA rank (inner dimension of each update)")
    lora_alpha: int = option(32, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_targets: str = option(
        "all-linear", "modules LoRA adapts: every linear layer but the output head, or comma-separated names"
    )
    mask_ratio: float = option(0.2, "mlm/mntp: share of the tokens selected for masking")
    mask_strategy: str = option(
        "whole_word", "mlm/mntp: select single tokens, whole words or geometric spans", choices=MASK_STRATEGIES
    )
    replace_prob: float = option(0.8, "share of the selected tokens replaced by the mask token (BERT's 80/10/10)")
    random_prob: float = option(0.1, "share replaced by a random token; the rest stay as they are")
    mean_span: float = option(3.0, "mean span length for --mask-strategy span")
    # SmolLM2's BOS is an attention sink whose state hardly depends on the text, so a first word read there
    # cannot depend on it either (docs/finetune.md); the newline token "Ċ" is not.
    prefix_token: str = option(
        "",
        "mntp: the token(s) every sentence starts with, space-separated tokens as the vocabulary writes them "
        "(e.g. '<|im_start|> Ġand'); unset = the tokenizer's BOS",
    )
    # After a prefix that ends in a word (" and"), a first word written bare ("Jupiter") is a token family the
    # base model rarely saw there; with a space it is the family every mid-sentence word is in (" Jupiter").
    space_first_word: bool = option(
        False,
        "mntp: start every sentence with a space, so its first word is a spaced sub-token as mid-sentence "
        "(recorded in maskserve.json; serving does the same)",
    )
    first_word_prob: float = option(0.0, "mlm/mntp: share of examples whose first word is masked too (sentence starts)")
    prompt_loss_weight: float = option(
        0.0, "sft: loss weight of prompt tokens (0 = masked out of the loss ... 1 = full weight)"
    )
    max_length: int = option(64, "mlm/mntp: tokens per example (longer ones are truncated)")
    pack_length: int = option(512, "sft: tokens per packed row")
    val_fraction: float = option(0.01, "share of the examples held out for validation (at least one)")
    val_max: int = option(256, "at most this many validation examples")
    eval_every: int = option(100, "validate every N steps and at the end (0 = only at the end)")
    save_every: int = option(200, "checkpoint every N steps and at the end (0 = never)")
    cloze: str = option(
        "", "cloze file evaluated after training (mlm/mntp); 'default' = service/data/cloze.tsv; unset = none"
    )
    cloze_limit: int = option(0, "evaluate only the first N cloze items (0 = all)")
    seed: int = option(0, "seed of the validation split, example order, masks and LoRA init")
    threads: int = option(0, "torch intra-op threads (0 = torch's default)")
    autocast: str = option(
        Autocast.NONE.value,
        "none = float32; bf16 = bfloat16 autocast (can be faster on CPUs with bf16 support)",
        choices=Autocast,
    )
    save_dtype: str = option(
        DType.FLOAT16.value,
        "dtype of the adapter weights on disk",
        choices=(d for d in DType if d not in (DType.AUTO, DType.INT8)),
    )
    resume: bool = option(
        False, "continue from OUT's last checkpoint with OUT's saved settings (only --steps and --threads change)"
    )

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
    """``maskserve finetune``: one flag per config field (``--batch-size``)."""
    add_dataclass_flags(parser, FinetuneConfig)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})


@dataclass
class FillMaskEvalConfig:
    """``maskserve eval fill-mask``: what to score and how (the model and adapter are ``Settings``)."""

    cloze: str = option("", "cloze file (.tsv or .jsonl); unset = the bundled service/data/cloze.tsv")
    mode: str = option(
        BOTH_MODES,
        "plain = the top tokens at one mask token; whole_word = 1..several mask tokens filled as one word "
        "(beam search); both = each",
        (BOTH_MODES, *EvalMode),
    )
    limit: int = option(0, "score only the first N items (0 = all)")
    json: str = option("", "write every prediction to this JSON file")
    update_card: bool = option(False, "record the numbers in the adapter's model card (README.md, metrics.json)")
