"""``/v1/generate`` (and the OpenAI routes' shared part): request -> engine job -> response.

Tokenizing (a prompt as it is, or chat messages through the model's chat template), mapping attention spans,
the limits that need the settings, and the one place that turns sampling fields into ``SamplingParams``.
The job's masks are compiled by the engine when it is submitted (``GenerationScheduler.compile``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.api.protocol.attention import AttentionSpec
from service.api.protocol.generate import (
    GenerateChoice,
    GenerateChoicesResponse,
    GenerateRequest,
    GenerateResponse,
    GenerateStreamEvent,
    OutputMaskFields,
    SamplingFields,
    TokenDetail,
    TopLogprobDetail,
    Usage,
)
from service.api.serving.attention import message_spans, to_constraints
from service.api.serving.limits import check_grammar_cost
from service.config import Settings
from service.engine.generate import GenerationJob, GenerationResult, TokenEvent, TokenInfo
from service.engine.params import SamplingParams
from service.engine.scheduler import GenerationScheduler
from service.errors import InvalidRequest
from service.masks.constraints import AttentionConstraints
from service.masks.output import OutputMaskSpec


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt as the engine will see it, with what inspection needs: text, ids, character offsets."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    constraints: AttentionConstraints


def render_chat(gen: GenerationScheduler, messages: Sequence[dict[str, str]], param: str) -> str:
    tok = gen.vocab.tokenizer
    if not getattr(tok, "chat_template", None):
        raise InvalidRequest("this model has no chat template: send a plain 'prompt' instead", param=param)
    try:
        return str(tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False))
    except Exception as exc:  # a template may reject a conversation (e.g. roles out of order)
        raise InvalidRequest(f"the chat template rejected these messages: {exc}", param=param) from None


def check_prompt(gen: GenerationScheduler, ids: list[int], param: str) -> list[int]:
    if not ids:
        raise InvalidRequest("the prompt is empty (no tokens)", param=param)
    if len(ids) > gen.loaded.max_length:
        raise InvalidRequest(
            f"the prompt has {len(ids)} tokens; at most {gen.loaded.max_length} are accepted", param=param
        )
    return ids


def encode_prompt(
    gen: GenerationScheduler,
    *,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    attention: AttentionSpec | None,
    param: str,
) -> EncodedPrompt:
    """Tokenize ``prompt`` (as it is) or ``messages`` (chat template) and map the attention spans onto it."""
    chat = messages is not None
    text = render_chat(gen, messages, param) if messages is not None else prompt or ""
    enc = gen.vocab.tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    ids = check_prompt(gen, list(enc["input_ids"]), param)
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    if attention is None:
        return EncodedPrompt(text, ids, offsets, AttentionConstraints())
    starts = message_spans(text, [m["content"] for m in messages]) if messages is not None else None
    dims = gen.loaded.attention_dims if gen.loaded.steerable else None
    return EncodedPrompt(text, ids, offsets, to_constraints(attention, offsets, len(text), starts, dims=dims))


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


def output_mask_spec(
    fields: OutputMaskFields,
    logit_bias: dict[str, float] | None,
    *,
    json_schema: dict[str, Any] | None = None,
    json_object: bool = False,
    param_names: tuple[tuple[str, str], ...] = (),
) -> OutputMaskSpec:
    """The output masks a request asks for (``json_schema``/``json_object``: OpenAI's response_format)."""
    schema = json_schema if json_schema is not None else fields.json_schema
    return OutputMaskSpec(
        bad_words=tuple(fields.bad_words or ()),
        allowed_token_ids=tuple(fields.allowed_token_ids) if fields.allowed_token_ids is not None else None,
        allowed_words=tuple(fields.allowed_words) if fields.allowed_words is not None else None,
        logit_bias=parse_logit_bias(logit_bias),
        min_tokens=fields.min_tokens,
        choice=tuple(fields.choice) if fields.choice is not None else None,
        regex=fields.regex,
        json_schema=json.dumps(schema) if schema is not None else None,
        json_object=json_object,
        no_repeat_ngram_size=fields.no_repeat_ngram_size,
        param_names=param_names,
    )


def generation_job(
    req: SamplingFields,
    encoded: EncodedPrompt | list[int],
    spec: OutputMaskSpec,
    settings: Settings,
    *,
    temperature: float,
    stop: Sequence[str] | str | None,
    max_new_tokens: int | None,
    max_param: str,
    top_logprobs: int,
) -> GenerationJob:
    """The engine job of any generation route: the limits that need the settings, then ``SamplingParams``
    from the fields both APIs share (``temperature`` and ``stop`` differ in default and type by route)."""
    max_new = max_new_tokens if max_new_tokens is not None else settings.default_max_new_tokens
    if max_new > settings.max_new_tokens:
        raise InvalidRequest(
            f"{max_param} is {max_new}; this server allows at most {settings.max_new_tokens} "
            "(MASKSERVE_MAX_NEW_TOKENS)",
            param=max_param,
        )
    if req.n > settings.max_n:
        raise InvalidRequest(f"n is {req.n}; this server allows at most {settings.max_n} (MASKSERVE_MAX_N)", param="n")
    if req.n > settings.max_running_requests:
        raise InvalidRequest(
            f"n is {req.n}, more sequences than can run at once ({settings.max_running_requests}, "
            "MASKSERVE_MAX_RUNNING_REQUESTS)",
            param="n",
        )
    check_grammar_cost(spec, settings)
    if spec.min_tokens > max_new:
        raise InvalidRequest(f"min_tokens ({spec.min_tokens}) exceeds {max_param} ({max_new})", param="min_tokens")
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        repetition_penalty=req.repetition_penalty,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        seed=req.seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        top_logprobs=top_logprobs,
        n=req.n,
    )
    ids, constraints = (encoded.ids, encoded.constraints) if isinstance(encoded, EncodedPrompt) else (encoded, None)
    return GenerationJob(ids, params, spec, constraints or AttentionConstraints(), stream=req.stream)


def generate_job(
    body: GenerateRequest, gen: GenerationScheduler, settings: Settings
) -> tuple[GenerationJob, EncodedPrompt]:
    """``POST /v1/generate``'s job, and its encoded prompt (mask reports show its text and offsets)."""
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("give either 'prompt' or 'messages' (exactly one)", param="prompt")
    messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
    param = "messages" if messages is not None else "prompt"
    encoded = encode_prompt(gen, prompt=body.prompt, messages=messages, attention=body.attention, param=param)
    job = generation_job(
        body,
        encoded,
        output_mask_spec(body, body.logit_bias),
        settings,
        temperature=body.temperature,
        stop=body.stop,
        max_new_tokens=body.max_new_tokens,
        max_param="max_new_tokens",
        top_logprobs=body.top_logprobs,
    )
    job.record_masks = body.return_masks
    return job, encoded


# --- results -> responses -------------------------------------------------------------------------------------


def usage(*results: GenerationResult) -> Usage:
    """Token counts of one request: its prompt once (prefilled once for all n), every sequence's tokens."""
    prompt = results[0].prompt_tokens
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def token_detail(t: TokenInfo, with_top: bool) -> TokenDetail:
    top = [TopLogprobDetail(id=a.id, text=a.text, logprob=a.logprob) for a in t.top_logprobs] if with_top else None
    return TokenDetail(id=t.id, text=t.text, logprob=t.logprob, special=t.special, top_logprobs=top)


def generate_response(r: GenerationResult, model: str, with_top: bool) -> GenerateResponse:
    return GenerateResponse(
        id=r.request_id,
        model=model,
        generated_text=r.text,
        finish_reason=r.finish_reason,
        tokens=[token_detail(t, with_top) for t in r.tokens],
        usage=usage(r),
        seed=r.seed,
    )


def generate_choices_response(results: list[GenerationResult], model: str, with_top: bool) -> GenerateChoicesResponse:
    """The answer to a request with n > 1: one choice per sequence, by index."""
    choices = [
        GenerateChoice(index=r.index, generated_text=r.text, finish_reason=r.finish_reason,
                       tokens=[token_detail(t, with_top) for t in r.tokens], seed=r.seed)
        for r in results
    ]  # fmt: skip
    return GenerateChoicesResponse(id=results[0].request_id, model=model, choices=choices, usage=usage(*results))


def stream_event(event: GenerateStreamEvent, n: int) -> dict[str, Any]:
    """An event as sent: ``choice`` only when the request asked for n > 1 (n = 1 events keep their shape)."""
    return event.model_dump(mode="json", exclude={"choice"} if n == 1 else None)


def token_event(request_id: str, e: TokenEvent, with_top: bool) -> GenerateStreamEvent:
    return GenerateStreamEvent(
        id=request_id, index=e.index, token=token_detail(e.token, with_top), text=e.text, choice=e.choice
    )


def result_event(r: GenerationResult) -> GenerateStreamEvent:
    return GenerateStreamEvent(
        choice=r.index,
        id=r.request_id,
        index=r.completion_tokens,
        token=None,
        text=r.rest,
        generated_text=r.text,
        finish_reason=r.finish_reason,
        usage=usage(r),
        seed=r.seed,
    )
