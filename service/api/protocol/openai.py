"""Wire models of the OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions``.

The official ``openai`` client works against them. Beyond OpenAI's fields, the output masks of
``/v1/generate`` (``bad_words``, ``allowed_words``, ``allowed_token_ids``, ``min_tokens``, ``choice``,
``regex``, ``json_schema``, ``no_repeat_ngram_size``) and ``top_k`` / ``repetition_penalty`` are accepted as
extra body fields (``extra_body=`` in the client); ``n``, ``frequency_penalty`` and ``presence_penalty`` are
OpenAI's own. Fields OpenAI has and this server cannot honour are refused with a 400 naming
them, never silently ignored; unknown fields are a 422.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.protocol.generate import SamplingFields, Usage, Word
from service.engine.params import MAX_TOP_LOGPROBS


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIFields(SamplingFields):
    """What both routes share (``top_k``, ``repetition_penalty``, ``attention`` and the output masks are
    extensions). OpenAI's defaults: temperature 1, top_p 1."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The served model's id (GET /v1/models).")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    stream_options: StreamOptions | None = None
    stop: Word | list[Word] | None = Field(None)
    user: str | None = Field(None, description="Accepted and ignored.")
    # Sent by OpenAI clients; they change nothing here (no stored completions, one service tier, no tools).
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored (nothing is stored).")
    store: bool | None = Field(None, description="Accepted and ignored (nothing is stored).")
    service_tier: str | None = Field(None, description="Accepted and ignored (one tier).")
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored (no tool calling).")


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


class TopLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprobEntry):
    top_logprobs: list[TopLogprobEntry]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


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
