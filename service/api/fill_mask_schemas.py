"""Fill-mask request/response schemas: the Hugging Face Inference API shape, plus two extensions.

Request ``{"inputs": str | [str], "parameters": {"top_k", "targets", "whole_word", "max_word_tokens"}}``;
response: one input with one mask -> ``[{"sequence","score","token","token_str"}, ...]``; several masks ->
one such list per mask, in order; a list of inputs -> one entry per input (each shaped as above).

Status codes: a JSON value of the wrong type or shape is a 422 (pydantic); a value of the right type that
cannot be served (no mask, too many masks, too long, top_k out of range, a bad target) is a 400.
Both name the offending ``param``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from service.api.attention_schemas import AttentionSpec
from service.config import Settings
from service.engine.fill_mask import (
    AppliedMask,
    FillCandidate,
    FillInput,
    FillMaskCodec,
    FillMaskJob,
    FillMaskResult,
)
from service.errors import InvalidRequest
from service.masks.attention import SpanError
from service.masks.fill import check_fill_constraints


class FillMaskParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(
        5, description="How many candidates per mask, 1..MASKSERVE_MAX_TOP_K.", json_schema_extra={"minimum": 1}
    )
    targets: list[str] | None = Field(
        None,
        description="Score only these words (each may span several sub-tokens: scored jointly by the chain "
        "rule over all of them, not by the first sub-token as transformers' pipeline does).",
    )
    whole_word: bool = Field(
        False,
        description="Fill each mask with a whole word of 1..max_word_tokens sub-tokens (beam search; ranked "
        "by the geometric mean of the sub-token probabilities).",
    )
    max_word_tokens: int | None = Field(
        None,
        description="Most sub-tokens of a whole-word fill (default and upper limit: MASKSERVE_MAX_WORD_TOKENS).",
        json_schema_extra={"minimum": 1},
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _one_target(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value  # the pipeline accepts a single string too


class FillMaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: str | list[str] = Field(
        description="Text with [MASK] (or the model's own mask token) where words are missing; or a list of them."
    )
    parameters: FillMaskParameters = Field(default_factory=FillMaskParameters)
    options: dict[str, Any] | None = Field(
        None, description="Accepted for Inference API clients (e.g. wait_for_model) and ignored."
    )
    return_masks: bool = Field(
        False,
        description="Answer {'results': <the usual answer>, 'masks': <every applied mask>} instead (an extension).",
    )
    attention: AttentionSpec | None = Field(
        None,
        description="What the model may attend to: character spans of 'inputs' (a single text), which must "
        "not exclude a mask (docs/masks.md; an extension).",
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _text_or_texts(cls, value: object) -> object:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
        if isinstance(value, list) and not value:
            raise PydanticCustomError("empty_list", "must not be an empty list")
        raise PydanticCustomError("inputs_type", "must be a string or a list of strings")

    @field_validator("parameters", mode="before")
    @classmethod
    def _null_parameters(cls, value: object) -> object:
        return {} if value is None else value

    def to_job(self, codec: FillMaskCodec, settings: Settings) -> FillMaskJob:
        """Validate against the model and the limits; tokenize. Raises InvalidRequest naming the param."""
        p = self.parameters
        if not 1 <= p.top_k <= settings.max_top_k:
            raise InvalidRequest(
                f"'parameters.top_k' must be between 1 and {settings.max_top_k} (MASKSERVE_MAX_TOP_K); got {p.top_k}",
                param="parameters.top_k",
            )
        max_words = settings.max_word_tokens if p.max_word_tokens is None else p.max_word_tokens
        if not 1 <= max_words <= settings.max_word_tokens:
            raise InvalidRequest(
                f"'parameters.max_word_tokens' must be between 1 and {settings.max_word_tokens} "
                f"(MASKSERVE_MAX_WORD_TOKENS); got {max_words}",
                param="parameters.max_word_tokens",
            )
        if p.targets is not None and p.whole_word:
            raise InvalidRequest(
                "'parameters.whole_word' and 'parameters.targets' exclude each other: targets are already "
                "scored as whole words; drop one of them",
                param="parameters.whole_word",
            )
        batched = isinstance(self.inputs, list)
        texts = self.inputs if isinstance(self.inputs, list) else [self.inputs]
        if self.attention is not None and batched:
            raise InvalidRequest(
                "attention spans are character ranges of one text; send 'inputs' as a single string",
                param="attention",
            )
        inputs = [codec.encode(t, f"inputs[{i}]" if batched else "inputs") for i, t in enumerate(texts)]
        if self.attention is not None:
            inputs = [constrain(inputs[0], self.attention, codec)]
        targets = None
        if p.targets is not None:
            if not p.targets:
                raise InvalidRequest(
                    "'parameters.targets' is empty; give at least one word, or leave it out",
                    param="parameters.targets",
                )
            if len(p.targets) > settings.max_top_k:
                raise InvalidRequest(
                    f"'parameters.targets' has {len(p.targets)} words; at most {settings.max_top_k} "
                    "(MASKSERVE_MAX_TOP_K)",
                    param="parameters.targets",
                )
            encoded = [
                codec.encode_target(t, f"parameters.targets[{i}]", settings.max_word_tokens)
                for i, t in enumerate(p.targets)
            ]
            targets = list({t.text: t for t in encoded}.values())  # duplicates scored once
        # A mask widened to its longest fill must still fit the model.
        widest = max((max(len(t.spaced), len(t.bare)) for t in targets), default=1) if targets else 1
        widest = max_words if p.whole_word else widest
        for i, inp in enumerate(inputs):
            if len(inp.ids) + widest - 1 > codec.max_length:
                param = f"inputs[{i}]" if batched else "inputs"
                raise InvalidRequest(
                    f"'{param}' is {len(inp.ids)} tokens; widening a mask to {widest} sub-tokens would exceed "
                    f"the model's {codec.max_length}",
                    param=param,
                )
        job = FillMaskJob(
            inputs=inputs,
            top_k=min(p.top_k, len(targets)) if targets else p.top_k,
            targets=targets,
            whole_word=p.whole_word,
            max_word_tokens=max_words if p.whole_word else 1,
            batched=batched,
        )
        job.applied_masks = applied_masks(job, codec)
        return job


def constrain(inp: FillInput, spec: AttentionSpec, codec: FillMaskCodec) -> FillInput:
    """The input with its attention constraints, mapped to tokens and checked (InvalidRequest names the span)."""
    if not inp.offsets:
        raise InvalidRequest("this model's tokenizer gives no character offsets to map spans on", param="attention")
    constraints = spec.to_constraints(inp.offsets, len(inp.text), last_token_reads=False, dims=codec.attention_dims)
    try:
        check_fill_constraints(constraints, [s.index for s in inp.slots], mntp=codec.mntp)
    except SpanError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None
    return replace(inp, attention=None if constraints.empty else constraints)


def applied_masks(job: FillMaskJob, codec: FillMaskCodec) -> list[AppliedMask]:
    """What the job will apply: input masks, the attention structure, the output (vocabulary) mask."""
    masks = [
        AppliedMask("input", "mask_token", {"input": i, "positions": [s.index for s in inp.slots]})
        for i, inp in enumerate(job.inputs)
    ]
    attention: dict[str, object] = {"padding": "right", "read_offset": -1 if codec.mntp else 0}
    masks.append(AppliedMask("attention", "bidirectional", attention))
    if job.targets is not None:
        masks.append(AppliedMask("output", "targets", {"targets": [t.text for t in job.targets]}))
    elif job.whole_word:
        masks.append(AppliedMask("output", "whole_word", {"max_word_tokens": job.max_word_tokens}))
    else:
        masks.append(AppliedMask("output", "no_special_tokens"))
    return masks


class FillMaskCandidate(BaseModel):
    sequence: str = Field(description="The input with this candidate in place of the mask.")
    score: float = Field(
        description="Probability: of the token; for a multi-token target the joint (chain-rule) probability; "
        "for a whole-word fill the geometric mean of its sub-token probabilities."
    )
    token: int = Field(description="The predicted token id (the first sub-token of a multi-token fill).")
    token_str: str = Field(description="The predicted token, or the whole fill when it spans several sub-tokens.")
    tokens: list[int] | None = Field(
        None, description="Only for fills of several sub-tokens: all their ids, in order (an extension)."
    )

    @classmethod
    def of(cls, c: FillCandidate) -> dict[str, Any]:
        out: dict[str, Any] = {"sequence": c.sequence, "score": c.score, "token": c.token, "token_str": c.token_str}
        if len(c.pieces) > 1:
            out["tokens"] = list(c.pieces)
        return out


FillMaskResponse = (
    list[FillMaskCandidate]
    | list[list[FillMaskCandidate]]
    | list[list[FillMaskCandidate] | list[list[FillMaskCandidate]]]
)


class FillMaskWithMasks(BaseModel):
    """The answer with ``return_masks``: the usual answer under ``results``, the applied masks beside it."""

    results: FillMaskResponse
    masks: dict[str, Any]


def render_response(job: FillMaskJob, result: FillMaskResult) -> list[Any]:
    """The Inference API shape: a mask's list alone when the input has one mask; one entry per input for lists."""
    per_input = [
        [FillMaskCandidate.of(c) for c in masks[0]]
        if len(masks) == 1
        else [[FillMaskCandidate.of(c) for c in cands] for cands in masks]
        for masks in result
    ]
    return per_input if job.batched else per_input[0]


FILL_MASK_EXAMPLES: dict[str, Any] = {
    "one mask": {
        "summary": "One input, one mask",
        "value": {"inputs": "The [MASK] barked at the mailman."},
    },
    "top_k": {
        "summary": "Fewer candidates",
        "value": {"inputs": "Paris is the [MASK] of France.", "parameters": {"top_k": 3}},
    },
    "several masks": {
        "summary": "Several masks: one list per mask, in order",
        "value": {"inputs": "The [MASK] chased the [MASK] up a tree."},
    },
    "batch": {
        "summary": "A list of inputs: one entry per input",
        "value": {"inputs": ["The [MASK] barked.", "Birds can [MASK] because they have wings."]},
    },
    "targets": {
        "summary": "Score given words (multi-token words scored jointly)",
        "value": {"inputs": "[MASK] is the largest planet.", "parameters": {"targets": ["Jupiter", "Mars"]}},
    },
    "attention": {
        "summary": "Read around a passage: exclude the first sentence (characters 0..27)",
        "value": {
            "inputs": "The note says it is Monday. Today is [MASK], the day after Sunday.",
            "attention": {"exclude": [{"start": 0, "end": 27}]},
        },
    },
    "whole word": {
        "summary": "Whole-word fills of up to 4 sub-tokens",
        "value": {
            "inputs": "[MASK] is the largest planet.",
            "parameters": {"whole_word": True, "max_word_tokens": 4, "top_k": 5},
        },
    },
}
