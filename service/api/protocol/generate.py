"""Wire models of ``POST /v1/generate``, and the output-mask and sampling fields the OpenAI routes share.

Fields and validation only: ``service/api/serving/generate.py`` turns a request into an engine job.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.protocol.attention import AttentionSpec
from service.engine.params import MAX_TOP_LOGPROBS, FinishReason

MAX_WORDS = 256  # entries in bad_words / allowed_words / choice
MAX_STOP = 8
MAX_NGRAM = 64  # no_repeat_ngram_size
Word = Annotated[str, Field(min_length=1, max_length=200)]


class OutputMaskFields(BaseModel):
    """Output masks, the same on /v1/generate and (as extra body fields) on the OpenAI routes."""

    bad_words: list[Word] | None = Field(
        None,
        max_length=MAX_WORDS,
        description="Words that never appear in the output text, however they would be tokenized (also inside "
        "longer words; case-sensitive).",
        examples=[["Monday"]],
    )
    allowed_token_ids: list[int] | None = Field(
        None, min_length=1, description="Only these tokens (and end-of-sequence) may be generated."
    )
    allowed_words: list[Word] | None = Field(
        None,
        min_length=1,
        max_length=MAX_WORDS,
        description="Only the tokens of these words (with and without a leading space) and end-of-sequence.",
    )
    min_tokens: int = Field(0, ge=0, description="End-of-sequence and stop sequences are ignored until then.")
    choice: list[Word] | None = Field(
        None, min_length=1, max_length=MAX_WORDS, description="The output is exactly one of these strings."
    )
    regex: str | None = Field(None, max_length=4096, description="The output matches this regular expression.")
    json_schema: dict[str, Any] | None = Field(None, description="The output is JSON valid under this JSON Schema.")
    no_repeat_ngram_size: int = Field(
        0,
        ge=0,
        le=MAX_NGRAM,
        description="No n-gram of this size appears twice in prompt + output: a token that would complete one "
        "already there is masked (transformers' no_repeat_ngram_size; 0 = off).",
        examples=[3],
    )


class SamplingFields(OutputMaskFields):
    """Sampling and attention fields both APIs share (each route sets its own temperature and stop fields)."""

    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: smallest set with this much mass.")
    top_k: int = Field(0, ge=0, description="Sample among the k most probable tokens (0 = all).")
    # Bounded on both sides: CTRL's penalty divides logits by it, and a tiny one (1e-90) overflowed them to inf
    repetition_penalty: float = Field(
        1.0, ge=0.1, le=10.0, description="> 1 discourages repeating tokens, < 1 encourages them (0.1-10)."
    )
    frequency_penalty: float = Field(
        0.0,
        ge=-2.0,
        le=2.0,
        description="OpenAI's: subtracted from a token's logit once per time it was generated so far.",
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI's: subtracted from the logit of every token generated so far."
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="Same seed, same request -> same output.")
    n: int = Field(
        1,
        ge=1,
        description="Sequences of the prompt (at most MASKSERVE_MAX_N); sequence i samples with seed + i.",
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id -> value in [-100, 100] added to its logit.", examples=[{"28": -100}]
    )
    stream: bool = Field(False, description="Server-sent events: one per token, then one with the result.")
    attention: AttentionSpec | None = Field(None, description="What the model may attend to (docs/masks.md).")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(SamplingFields):
    """Give ``prompt`` (plain text, continued as it is) or ``messages`` (rendered with the chat template)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "messages": [{"role": "user", "content": "Name a day of the week."}],
                    "max_new_tokens": 8,
                    "bad_words": ["Monday"],
                },
                {"prompt": "The capital of France is", "max_new_tokens": 5, "temperature": 0.7, "seed": 1},
                {"prompt": "Answer yes or no: is water wet?", "choice": ["yes", "no"]},
            ]
        },
    )

    prompt: str | None = Field(None, description="Text to continue.")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="A chat, answered as 'assistant'.")
    max_new_tokens: int | None = Field(None, ge=1, description="Default MASKSERVE_DEFAULT_MAX_NEW_TOKENS.")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 = greedy (the default); > 0 samples.")
    stop: list[Word] | None = Field(None, max_length=MAX_STOP, description="Stop before any of these strings.")
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives listed per token.")
    return_masks: bool = Field(False, description="Add every applied mask to the response (see /v1/masks).")


# --- responses -------------------------------------------------------------------------------------------------


class TopLogprobDetail(BaseModel):
    id: int
    text: str
    logprob: float


class TokenDetail(BaseModel):
    id: int
    text: str
    logprob: float = Field(description="After penalties, logit_bias and output masks; before temperature.")
    special: bool
    top_logprobs: list[TopLogprobDetail] | None = None


class Usage(BaseModel):
    """Token counts; the same wire shape as OpenAI's."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    id: str
    model: str
    generated_text: str
    finish_reason: FinishReason
    tokens: list[TokenDetail]
    usage: Usage
    seed: int = Field(description="The seed used (drawn at random when the request gave none).")
    masks: dict[str, Any] | None = Field(None, description="With return_masks: every applied mask.")


class GenerateChoice(BaseModel):
    """One of the n sequences of a request with ``n`` > 1."""

    index: int
    generated_text: str
    finish_reason: FinishReason
    tokens: list[TokenDetail]
    seed: int = Field(description="This sequence's seed: the request's seed + index.")


class GenerateChoicesResponse(BaseModel):
    """The answer to a request with ``n`` > 1 (with n = 1 the answer is a ``GenerateResponse``)."""

    id: str
    model: str
    choices: list[GenerateChoice]
    usage: Usage = Field(description="The prompt counted once; completion tokens of every sequence.")
    masks: dict[str, Any] | None = Field(None, description="With return_masks: every applied mask (sequence 0's).")


class GenerateStreamEvent(BaseModel):
    """One server-sent event. Token events carry ``token``; the last event carries ``generated_text``,
    ``finish_reason`` and ``usage`` (and ``token`` null). Joining every event's ``text`` gives the output."""

    id: str
    index: int
    token: TokenDetail | None
    text: str
    generated_text: str | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    seed: int | None = None
    choice: int | None = Field(None, description="With n > 1 only: which sequence (0..n-1) the event is of.")
