"""The OpenAI-compatible routes: request -> engine job, and results -> OpenAI's responses and stream chunks.

Fields OpenAI has and this server cannot honour are refused with a 400 naming them, never silently ignored.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from service.api.protocol.generate import MAX_STOP
from service.api.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    OpenAIFields,
    TokenLogprobEntry,
    TopLogprobEntry,
)
from service.api.serving.generate import check_prompt, encode_prompt, generation_job, output_mask_spec, usage
from service.config import Settings
from service.engine.generate import GenerationJob, GenerationResult, TokenInfo
from service.engine.params import FinishReason
from service.engine.scheduler import GenerationHandle, GenerationScheduler
from service.errors import InvalidRequest, ModelNotFound

OPENAI_FINISH = {
    FinishReason.LENGTH: "length",
    FinishReason.EOS: "stop",
    FinishReason.STOP: "stop",
    # The output masks left no token to continue with: the output was cut by our filters.
    FinishReason.CONSTRAINT: "content_filter",
}


def _check_common(req: OpenAIFields, served: str) -> None:
    if req.model != served:
        raise ModelNotFound(f"the model {req.model!r} does not exist here; this server serves {served!r}")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP:
        raise InvalidRequest(f"at most {MAX_STOP} stop sequences", param="stop")


def completion_job(body: CompletionRequest, gen: GenerationScheduler, settings: Settings, served: str) -> GenerationJob:
    _check_common(body, served)
    if body.echo:
        raise InvalidRequest("echo is not supported", param="echo")
    if body.best_of not in (None, 1, body.n):
        raise InvalidRequest("only best_of=1 (or equal to n) is supported", param="best_of")
    if body.suffix:
        raise InvalidRequest("suffix (insertion) is not supported", param="suffix")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        if body.attention is not None:
            raise InvalidRequest("attention spans need a text prompt, not token ids", param="attention")
        ids = [int(p) for p in prompt]
        vocab = gen.vocab.vocabulary.size
        for i, tid in enumerate(ids):
            if not 0 <= tid < vocab:
                raise InvalidRequest(f"{tid} is not a token id (0..{vocab - 1})", param=f"prompt[{i}]")
        encoded: Any = check_prompt(gen, ids, "prompt")
    else:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequest("send one prompt per request (a list of exactly one)", param="prompt")
            prompt = str(prompt[0])
        encoded = encode_prompt(gen, prompt=str(prompt), messages=None, attention=body.attention, param="prompt")
    return generation_job(
        body, encoded, output_mask_spec(body, body.logit_bias), settings, temperature=body.temperature,
        stop=body.stop, max_new_tokens=body.max_tokens, max_param="max_tokens", top_logprobs=body.logprobs or 0,
    )  # fmt: skip


def chat_max_param(body: ChatCompletionRequest) -> str:
    return "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"


def chat_job(body: ChatCompletionRequest, gen: GenerationScheduler, settings: Settings, served: str) -> GenerationJob:
    _check_common(body, served)
    if body.tools or body.tool_choice not in (None, "none"):
        raise InvalidRequest("tool calling is not supported", param="tools")
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    schema: dict[str, Any] | None = None
    names: tuple[tuple[str, str], ...] = ()
    json_object = False
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        json_object, names = True, (("json_object", "response_format"),)
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequest("give response_format.json_schema.schema", param="response_format.json_schema")
        schema, names = fmt.json_schema.schema_, (("json_schema", "response_format.json_schema.schema"),)
    if (json_object or schema is not None) and (body.json_schema or body.regex or body.choice):
        raise InvalidRequest("give either response_format or json_schema/regex/choice", param="response_format")
    messages = [m.as_template_message() for m in body.messages]
    encoded = encode_prompt(gen, prompt=None, messages=messages, attention=body.attention, param="messages")
    spec = output_mask_spec(body, body.logit_bias, json_schema=schema, json_object=json_object, param_names=names)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return generation_job(
        body, encoded, spec, settings, temperature=body.temperature, stop=body.stop, max_new_tokens=limit,
        max_param=chat_max_param(body), top_logprobs=(body.top_logprobs or 0) if body.logprobs else 0,
    )  # fmt: skip


# --- results -> responses -------------------------------------------------------------------------------------


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


def completion_response(results: list[GenerationResult], model: str, with_lp: bool) -> CompletionResponse:
    """One choice per sequence (``index`` 0..n-1)."""
    choices = [
        CompletionChoice(index=r.index, text=r.text, logprobs=completion_logprobs(list(r.tokens), with_lp),
                         finish_reason=OPENAI_FINISH[r.finish_reason])
        for r in results
    ]  # fmt: skip
    return CompletionResponse(id=f"cmpl-{results[0].request_id}", model=model, choices=choices, usage=usage(*results))


def chat_response(results: list[GenerationResult], model: str, with_lp: bool) -> ChatCompletionResponse:
    """One choice per sequence (``index`` 0..n-1)."""
    choices = [
        ChatChoice(
            index=r.index,
            message=AssistantMessage(content=r.text),
            logprobs=chat_logprobs(list(r.tokens), with_lp),
            finish_reason=OPENAI_FINISH[r.finish_reason],
        )
        for r in results
    ]
    request_id = results[0].request_id
    return ChatCompletionResponse(id=f"chatcmpl-{request_id}", model=model, choices=choices, usage=usage(*results))


async def completion_chunks(
    handle: GenerationHandle, model: str, with_lp: bool, with_usage: bool
) -> AsyncIterator[dict[str, Any] | str]:
    """Chunks of the n sequences, interleaved, each choice with its ``index``; after the last one's finish,
    the usage chunk (if asked) and ``[DONE]``."""
    chunk_id, created = f"cmpl-{handle.request_id}", int(time.time())
    offsets = [0] * handle.n
    results: list[GenerationResult] = []
    async for event in handle.events():
        if isinstance(event, GenerationResult):
            results.append(event)
            finish = OPENAI_FINISH[event.finish_reason]
            last = CompletionChoice(index=event.index, text=event.rest, finish_reason=finish)
            yield CompletionResponse(id=chunk_id, created=created, model=model, choices=[last]).model_dump()
            continue
        logprobs = completion_logprobs([event.token], with_lp, offsets[event.choice])
        if event.text or (logprobs is not None and logprobs.tokens):
            offsets[event.choice] += sum(len(t) for t in logprobs.tokens) if logprobs else 0
            choice = CompletionChoice(index=event.choice, text=event.text, logprobs=logprobs)
            yield CompletionResponse(id=chunk_id, created=created, model=model, choices=[choice]).model_dump()
    if with_usage:
        done = CompletionResponse(id=chunk_id, created=created, model=model, choices=[])
        done.usage = usage(*results)
        yield done.model_dump()
    yield "[DONE]"


async def chat_chunks(
    handle: GenerationHandle, model: str, with_lp: bool, with_usage: bool
) -> AsyncIterator[dict[str, Any] | str]:
    chunk_id, created = f"chatcmpl-{handle.request_id}", int(time.time())

    def chunk(choices: list[ChatChunkChoice], **kw: Any) -> dict[str, Any]:
        return ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=choices, **kw).model_dump()

    for index in range(handle.n):  # each choice opens with its role
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
    results: list[GenerationResult] = []
    async for event in handle.events():
        if isinstance(event, GenerationResult):
            results.append(event)
            yield chunk([ChatChunkChoice(index=event.index, delta=ChatDelta(content=event.rest or None),
                                         finish_reason=OPENAI_FINISH[event.finish_reason])])  # fmt: skip
            continue
        logprobs = chat_logprobs([event.token], with_lp)
        if event.text or (logprobs is not None and logprobs.content):
            yield chunk([ChatChunkChoice(index=event.choice, delta=ChatDelta(content=event.text), logprobs=logprobs)])
    if with_usage:
        yield chunk([], usage=usage(*results))
    yield "[DONE]"
