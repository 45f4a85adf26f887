"""Request and response models of the OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions``.

The official ``openai`` client works against them. Beyond OpenAI's fields, the output masks of
``/v1/generate`` (``bad_words``, ``allowed_words``, ``allowed_token_ids``, ``min_tokens``, ``choice``,
``regex``, ``json_schema``) and ``top_k`` / ``repetition_penalty`` are accepted as extra body fields
(``extra_body=`` in the client). Fields OpenAI has and this server cannot honour are refused with a 400 naming
them, never silently ignored; unknown fields are a 422.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.attention_schemas import AttentionSpec
from service.api.generate_schemas import (  # Usage: the same wire shape as OpenAI's
    MAX_STOP,
    OutputMaskFields,
    Usage,
    Word,
    encode_prompt,
    make_job,
)
from service.config import Settings
from service.engine.generate import MAX_TOP_LOGPROBS, FinishReason, GenerationJob, TokenInfo
from service.engine.scheduler import GenerationScheduler
from service.errors import InvalidRequest

OPENAI_FINISH = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP: "stop",
    # The output masks left no token to continue with: the output was cut by our filters.
    FinishReason.CONSTRAINT: "content_filter",
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIFields(OutputMaskFields):
    """What both routes share. OpenAI's defaults: temperature 1, top_p 1."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The served model's id (GET /v1/models).")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Word | list[Word] | None = Field(None)
    seed: int | None = Field(None, ge=0, lt=2**63)
    logit_bias: dict[str, float] | None = Field(None, description="Token id -> bias in [-100, 100].")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Not supported (only 0).")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Not supported (only 0).")
    user: str | None = Field(None, description="Accepted and ignored.")
    # extensions
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    attention: AttentionSpec | None = Field(None, description="What the model may attend to (docs/masks.md).")

    def _check_common(self, served: str) -> None:
        if self.model != served:
            raise InvalidRequest(f"this server serves the model {served!r}, not {self.model!r}", param="model")
        if self.n != 1:
            raise InvalidRequest("only n=1 is supported; send several requests instead", param="n")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise InvalidRequest(f"at most {MAX_STOP} stop sequences", param="stop")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequest(f"{name} is not supported (use repetition_penalty)", param=name)

    def _job(
        self,
        ids: list[int],
        settings: Settings,
        *,
        max_tokens: int | None,
        max_param: str,
        top_logprobs: int,
        json_schema: dict[str, Any] | None = None,
        json_object: bool = False,
        param_names: tuple[tuple[str, str], ...] = (),
    ) -> GenerationJob:
        spec = self.output_mask_spec(
            self.logit_bias, json_schema=json_schema, json_object=json_object, param_names=param_names
        )
        return make_job(
            ids,
            spec,
            settings,
            max_new_tokens=max_tokens,
            max_param=max_param,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop,
            top_logprobs=top_logprobs,
            stream=self.stream,
        )


# --- /v1/completions ----------------------------------------------------------------------------------------------


class CompletionRequest(OpenAIFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 8}]
        },
    )

    prompt: str | list[str] | list[int] = Field(description="Text, a list of one text, or token ids.")
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default is 16.")
    logprobs: int | None = Field(None, ge=0, le=5, description="Log probabilities of this many alternatives.")
    echo: bool = Field(False, description="Not supported (only false).")
    best_of: int | None = Field(None, ge=1, description="Only 1.")
    suffix: str | None = Field(None, description="Not supported.")

    def to_job(self, gen: GenerationScheduler, settings: Settings, served: str) -> GenerationJob:
        self._check_common(served)
        if self.echo:
            raise InvalidRequest("echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            raise InvalidRequest("only best_of=1 is supported", param="best_of")
        if self.suffix:
            raise InvalidRequest("suffix (insertion) is not supported", param="suffix")
        prompt = self.prompt
        attention = None
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            if self.attention is not None:
                raise InvalidRequest("attention spans need a text prompt, not token ids", param="attention")
            ids = [int(p) for p in prompt]
            vocab = gen.vocab.vocabulary.size
            for i, tid in enumerate(ids):
                if not 0 <= tid < vocab:
                    raise InvalidRequest(f"{tid} is not a token id (0..{vocab - 1})", param=f"prompt[{i}]")
            ids = gen.check_prompt(ids, "prompt")
        else:
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise InvalidRequest("send one prompt per request (a list of exactly one)", param="prompt")
                prompt = str(prompt[0])
            encoded = encode_prompt(gen, prompt=str(prompt), messages=None, attention=self.attention, param="prompt")
            ids, attention = encoded.ids, encoded.attention
        job = self._job(
            ids, settings, max_tokens=self.max_tokens, max_param="max_tokens", top_logprobs=self.logprobs or 0
        )
        job.attention = attention
        return job


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


def completion_logprobs(tokens: list[TokenInfo], with_logprobs: bool, start: int = 0) -> CompletionLogprobs | None:
    """OpenAI's legacy logprobs: texts, logprobs, top alternatives as {text: logprob}, character offsets."""
    if not with_logprobs:
        return None
    shown = [t for t in tokens if not t.special]  # end-of-sequence is not part of the text
    offsets, at = [], start
    for t in shown:
        offsets.append(at)
        at += len(t.text)
    return CompletionLogprobs(
        tokens=[t.text for t in shown],
        token_logprobs=[t.logprob for t in shown],
        top_logprobs=[{a.text: a.logprob for a in t.top_logprobs} for t in shown],
        text_offset=offsets,
    )


# --- /v1/chat/completions -----------------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatCompletionMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name", "refusal": harmless to drop

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class JSONSchemaFormat(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(OpenAIFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "SmolLM2-135M-Instruct",
                    "messages": [{"role": "user", "content": "Name a colour."}],
                    "max_completion_tokens": 8,
                    "bad_words": ["red"],
                }
            ]
        },
    )

    messages: list[ChatCompletionMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI; max_completion_tokens wins.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = Field(None, description="Not supported.")
    tool_choice: Any | None = Field(None, description="Not supported.")

    def to_job(self, gen: GenerationScheduler, settings: Settings, served: str) -> GenerationJob:
        self._check_common(served)
        if self.tools or self.tool_choice not in (None, "none"):
            raise InvalidRequest("tool calling is not supported", param="tools")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        schema: dict[str, Any] | None = None
        names: tuple[tuple[str, str], ...] = ()
        json_object = False
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            json_object, names = True, (("json_object", "response_format"),)
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise InvalidRequest("give response_format.json_schema.schema", param="response_format.json_schema")
            schema, names = fmt.json_schema.schema_, (("json_schema", "response_format.json_schema.schema"),)
        if (json_object or schema is not None) and (self.json_schema or self.regex or self.choice):
            raise InvalidRequest("give either response_format or json_schema/regex/choice", param="response_format")
        messages = [m.as_template_message() for m in self.messages]
        encoded = encode_prompt(gen, prompt=None, messages=messages, attention=self.attention, param="messages")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        job = self._job(
            encoded.ids,
            settings,
            max_tokens=limit,
            max_param="max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens",
            top_logprobs=(self.top_logprobs or 0) if self.logprobs else 0,
            json_schema=schema,
            json_object=json_object,
            param_names=names,
        )
        job.attention = encoded.attention
        return job


class TopLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


def chat_logprobs(tokens: list[TokenInfo], with_logprobs: bool) -> ChatLogprobs | None:
    if not with_logprobs:
        return None
    return ChatLogprobs(
        content=[
            TokenLogprobEntry(
                token=t.text,
                logprob=t.logprob,
                bytes=list(t.raw),
                top_logprobs=[
                    TopLogprobEntry(token=a.text, logprob=a.logprob, bytes=list(a.raw)) for a in t.top_logprobs
                ],
            )
            for t in tokens
            if not t.special
        ]
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: None = None
