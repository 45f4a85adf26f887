"""Wire models of ``POST /v1/fill-mask``: the Hugging Face Inference API shape, plus two extensions.

Request ``{"inputs": str | [str], "parameters": {"top_k", "targets", "whole_word", "max_word_tokens"}}``;
response: one input with one mask -> ``[{"sequence","score","token","token_str"}, ...]``; several masks ->
one such list per mask, in order; a list of inputs -> one entry per input (each shaped as above).

Status codes: a JSON value of the wrong type or shape is a 422 (pydantic); a value of the right type that
cannot be served (no mask, too many masks, too long, top_k out of range, a bad target) is a 400
(``service/api/serving/fill_mask.py``). Both name the offending ``param``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from service.api.protocol.attention import AttentionSpec


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


FillMaskResponse = (
    list[FillMaskCandidate]
    | list[list[FillMaskCandidate]]
    | list[list[FillMaskCandidate] | list[list[FillMaskCandidate]]]
)


class FillMaskWithMasks(BaseModel):
    """The answer with ``return_masks``: the usual answer under ``results``, the applied masks beside it."""

    id: str = Field(description="The server's id of this request: GET /v1/masks/{id} serves its masks again.")
    results: FillMaskResponse
    masks: dict[str, Any]


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
