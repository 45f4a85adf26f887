"""Every kind of mask a request can cause: one vocabulary for metrics, reports and docs.

Each compiled mask names its own kinds (``AttentionConstraints.kinds``, ``CompiledOutputMask.kinds``,
``FillMaskJob.mask_kinds``); the metric ``maskserve_masks_applied_total{kind=...}`` and the ``kinds`` of a
mask report use these values, and docs/production.md lists them all (a test keeps it so).
"""

from __future__ import annotations

from enum import StrEnum


class MaskGroup(StrEnum):
    INPUT = "input"  # replaces tokens the model sees
    ATTENTION = "attention"  # decides what each position may attend to
    OUTPUT = "output"  # decides which tokens may come next (or fill a mask)


class MaskKind(StrEnum):
    # input masks
    MASK_TOKEN = "mask_token"  # fill-mask: each placeholder becomes the model's mask token
    # attention masks a request asks for (padding, causal and bidirectional structures are always there)
    ATTENTION_EXCLUDE = "attention_exclude"
    ATTENTION_ISOLATE = "attention_isolate"
    ATTENTION_EMPHASIS = "attention_emphasis"
    # output masks of generation (named as the request fields that ask for them)
    ALLOWED_TOKEN_IDS = "allowed_token_ids"
    ALLOWED_WORDS = "allowed_words"
    BAD_WORDS = "bad_words"
    LOGIT_BIAS = "logit_bias"
    MIN_TOKENS = "min_tokens"
    CHOICE = "choice"
    REGEX = "regex"
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    NO_REPEAT_NGRAM = "no_repeat_ngram"  # no_repeat_ngram_size
    # output masks of fill-mask (which vocabulary entries may fill a mask)
    TARGETS = "targets"
    WHOLE_WORD = "whole_word"
    NO_SPECIAL_TOKENS = "no_special_tokens"

    @property
    def group(self) -> MaskGroup:
        if self is MaskKind.MASK_TOKEN:
            return MaskGroup.INPUT
        if self.value.startswith("attention_"):
            return MaskGroup.ATTENTION
        return MaskGroup.OUTPUT
