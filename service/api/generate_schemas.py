"""Request and response models of ``POST /v1/generate``, and the output-mask fields the OpenAI routes share.

Each request converts itself into an engine job (``to_job``); routes only pass the job on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from service.api.attention_schemas import AttentionSpec, message_spans
from service.config import Settings
from service.engine.generate import (
    MAX_TOP_LOGPROBS,
    GenerationJob,
    GenerationResult,
    SamplingParams,
    TokenEvent,
    TokenInfo,
)
from service.engine.scheduler import GenerationScheduler
from service.errors import InvalidRequest
from service.masks.attention import AttentionConstraints, RequestAttention, request_attention
from service.masks.output import OutputMaskSpec

MAX_WORDS = 256  # entries in bad_words / allowed_words / choice
MAX_STOP = 8
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

    def output_mask_spec(
        self,
        logit_bias: dict[str, float] | None,
        *,
        json_schema: dict[str, Any] | None = None,
        json_object: bool = False,
        param_names: tuple[tuple[str, str], ...] = (),
    ) -> OutputMaskSpec:
        schema = json_schema if json_schema is not None else self.json_schema
        return OutputMaskSpec(
            bad_words=tuple(self.bad_words or ()),
            allowed_token_ids=tuple(self.allowed_token_ids) if self.allowed_token_ids is not None else None,
            allowed_words=tuple(self.allowed_words) if self.allowed_words is not None else None,
            logit_bias=parse_logit_bias(logit_bias),
            min_tokens=self.min_tokens,
            choice=tuple(self.choice) if self.choice is not None else None,
            regex=self.regex,
            json_schema=json.dumps(schema) if schema is not None else None,
            json_object=json_object,
            param_names=param_names,
        )


def parse_logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """JSON object keys are strings: ``{"50256": -100}`` -> ((50256, -100.0),). Values lie in [-100, 100]."""
    out = []
    for key, value in (bias or {}).items():
        try:
            out.append((int(key), float(value)))
        except ValueError:
            message = f"logit_bias keys are token ids; {key!r} is not one"
            raise InvalidRequest(message, param=f"logit_bias.{key}") from None
        if not -100.0 <= value <= 100.0:
            raise InvalidRequest("logit_bias values must lie in [-100, 100]", param=f"logit_bias.{key}")
    return tuple(out)


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt as the engine will see it, with what inspection needs: text, ids, character offsets."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    constraints: AttentionConstraints
    attention: RequestAttention | None  # None: plain causal


def encode_prompt(
    gen: GenerationScheduler,
    *,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    attention: AttentionSpec | None,
    param: str,
) -> EncodedPrompt:
    """Tokenize ``prompt`` (as it is) or ``messages`` (chat template) and map the attention spans onto it."""
    if messages is not None:
        text = gen.render_chat(messages, param)
        ids, offsets = gen.encode(text, param, chat=True)
        starts = message_spans(text, [m["content"] for m in messages]) if attention else None
    else:
        text = prompt or ""
        ids, offsets = gen.encode(text, param, chat=False)
        starts = None
    dims = gen.loaded.attention_dims if gen.loaded.steerable else None
    constraints = (
        attention.to_constraints(offsets, len(text), starts, dims=dims) if attention else AttentionConstraints()
    )
    n_layers, n_heads = gen.loaded.attention_dims
    request = request_attention(len(ids), constraints, torch.float32, n_layers=n_layers, n_heads=n_heads)
    return EncodedPrompt(text, ids, offsets, constraints, request)


def make_job(
    ids: list[int],
    spec: OutputMaskSpec,
    settings: Settings,
    *,
    max_new_tokens: int | None,
    max_param: str,
    temperature: float,
    top_p: float,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: list[str] | str | None = None,
    top_logprobs: int = 0,
    stream: bool = False,
) -> GenerationJob:
    """Checks that need the settings, then the engine job."""
    max_new = max_new_tokens if max_new_tokens is not None else settings.default_max_new_tokens
    if max_new > settings.max_new_tokens:
        raise InvalidRequest(
            f"{max_param} is {max_new}; this server allows at most {settings.max_new_tokens} "
            "(MASKSERVE_MAX_NEW_TOKENS)",
            param=max_param,
        )
    if spec.min_tokens > max_new:
        raise InvalidRequest(f"min_tokens ({spec.min_tokens}) exceeds {max_param} ({max_new})", param="min_tokens")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stops),
        top_logprobs=top_logprobs,
    )
    return GenerationJob(ids, params, spec, stream=stream)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(OutputMaskFields):
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
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: smallest set with this much mass.")
    top_k: int = Field(0, ge=0, description="Sample among the k most probable tokens (0 = all).")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="> 1 discourages repeating tokens.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Same seed, same request -> same output.")
    stop: list[Word] | None = Field(None, max_length=MAX_STOP, description="Stop before any of these strings.")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id -> value in [-100, 100] added to its logit.", examples=[{"28": -100}]
    )
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives listed per token.")
    stream: bool = Field(False, description="Server-sent events: one per token, then one with the result.")

    attention: AttentionSpec | None = Field(None, description="What the model may attend to (character spans).")
    return_masks: bool = Field(False, description="Add every applied mask to the response (see /v1/masks).")

    def encode(self, gen: GenerationScheduler) -> EncodedPrompt:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("give either 'prompt' or 'messages' (exactly one)", param="prompt")
        messages = [m.model_dump() for m in self.messages] if self.messages is not None else None
        param = "messages" if messages is not None else "prompt"
        return encode_prompt(gen, prompt=self.prompt, messages=messages, attention=self.attention, param=param)

    def to_job(
        self, gen: GenerationScheduler, settings: Settings, encoded: EncodedPrompt | None = None
    ) -> GenerationJob:
        encoded = encoded or self.encode(gen)
        job = make_job(
            encoded.ids,
            self.output_mask_spec(self.logit_bias),
            settings,
            max_new_tokens=self.max_new_tokens,
            max_param="max_new_tokens",
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop,
            top_logprobs=self.top_logprobs,
            stream=self.stream,
        )
        job.attention = encoded.attention
        job.record_masks = self.return_masks
        return job


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

    @classmethod
    def of(cls, t: TokenInfo, with_top: bool) -> TokenDetail:
        top = [TopLogprobDetail(id=a.id, text=a.text, logprob=a.logprob) for a in t.top_logprobs] if with_top else None
        return cls(id=t.id, text=t.text, logprob=t.logprob, special=t.special, top_logprobs=top)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, r: GenerationResult) -> Usage:
        return cls(
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            total_tokens=r.prompt_tokens + r.completion_tokens,
        )


FinishReasonName = Literal["length", "eos_token", "stop_sequence", "constraint"]


class GenerateResponse(BaseModel):
    id: str
    model: str
    generated_text: str
    finish_reason: FinishReasonName
    tokens: list[TokenDetail]
    usage: Usage
    seed: int = Field(description="The seed used (drawn at random when the request gave none).")
    masks: dict[str, Any] | None = Field(None, description="With return_masks: every applied mask.")

    @classmethod
    def of(cls, r: GenerationResult, model: str, with_top: bool) -> GenerateResponse:
        return cls(
            id=r.request_id,
            model=model,
            generated_text=r.text,
            finish_reason=r.finish_reason.value,
            tokens=[TokenDetail.of(t, with_top) for t in r.tokens],
            usage=Usage.of(r),
            seed=r.seed,
        )


class GenerateStreamEvent(BaseModel):
    """One server-sent event. Token events carry ``token``; the last event carries ``generated_text``,
    ``finish_reason`` and ``usage`` (and ``token`` null). Joining every event's ``text`` gives the output."""

    id: str
    index: int
    token: TokenDetail | None
    text: str
    generated_text: str | None = None
    finish_reason: FinishReasonName | None = None
    usage: Usage | None = None
    seed: int | None = None

    @classmethod
    def of_token(cls, request_id: str, e: TokenEvent, with_top: bool) -> GenerateStreamEvent:
        return cls(id=request_id, index=e.index, token=TokenDetail.of(e.token, with_top), text=e.text)

    @classmethod
    def of_result(cls, r: GenerationResult) -> GenerateStreamEvent:
        return cls(
            id=r.request_id,
            index=r.completion_tokens,
            token=None,
            text=r.rest,
            generated_text=r.text,
            finish_reason=r.finish_reason.value,
            usage=Usage.of(r),
            seed=r.seed,
        )
