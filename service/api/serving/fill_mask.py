"""``/v1/fill-mask``: request -> engine job (limits, tokenizing, attention spans) -> the Inference API's answer."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from service.api.protocol.attention import AttentionSpec
from service.api.protocol.fill_mask import FillMaskRequest
from service.api.serving.attention import to_constraints
from service.api.serving.limits import check_fill_cost, fill_rows
from service.config import Settings
from service.engine.fill.codec import FillMaskCodec
from service.engine.fill.job import FillCandidate, FillInput, FillMaskJob, FillMaskResult
from service.errors import InvalidRequest
from service.masks.fill import check_fill_constraints


def fill_mask_job(body: FillMaskRequest, codec: FillMaskCodec, settings: Settings) -> FillMaskJob:
    """Validate against the model and the limits; tokenize. Raises InvalidRequest naming the param."""
    p = body.parameters
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
    batched = isinstance(body.inputs, list)
    texts = body.inputs if isinstance(body.inputs, list) else [body.inputs]
    if body.attention is not None and batched:
        raise InvalidRequest(
            "attention spans are character ranges of one text; send 'inputs' as a single string",
            param="attention",
        )
    if len(texts) > settings.max_fill_inputs:
        raise InvalidRequest(
            f"'inputs' has {len(texts)} texts; at most {settings.max_fill_inputs} (MASKSERVE_MAX_FILL_INPUTS)",
            param="inputs",
            code="too_costly",
        )
    inputs = [codec.encode(t, f"inputs[{i}]" if batched else "inputs") for i, t in enumerate(texts)]
    if body.attention is not None:
        inputs = [constrain(inputs[0], body.attention, codec)]
    targets = None
    if p.targets is not None:
        if not p.targets:
            raise InvalidRequest(
                "'parameters.targets' is empty; give at least one word, or leave it out",
                param="parameters.targets",
            )
        if len(p.targets) > settings.max_targets:
            raise InvalidRequest(
                f"'parameters.targets' has {len(p.targets)} words; at most {settings.max_targets} "
                "(MASKSERVE_MAX_TARGETS)",
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
    top_k = min(p.top_k, len(targets)) if targets else p.top_k
    rows = fill_rows(
        inputs, top_k=top_k, targets=targets, whole_word=p.whole_word, max_pieces=max_words, reranks=codec.reranks
    )
    check_fill_cost(rows, settings, whole_word=p.whole_word, targets=targets is not None, n_inputs=len(inputs))
    return FillMaskJob(
        inputs=inputs,
        top_k=top_k,
        targets=targets,
        whole_word=p.whole_word,
        max_word_tokens=max_words if p.whole_word else 1,
        batched=batched,
        rows=rows,
    )


def constrain(inp: FillInput, spec: AttentionSpec, codec: FillMaskCodec) -> FillInput:
    """The input with its attention constraints, mapped to tokens and checked (InvalidRequest names the span)."""
    if not inp.offsets:
        raise InvalidRequest("this model's tokenizer gives no character offsets to map spans on", param="attention")
    constraints = to_constraints(spec, inp.offsets, len(inp.text), last_token_reads=False, dims=codec.attention_dims)
    check_fill_constraints(constraints, [s.index for s in inp.slots], mntp=codec.mntp)
    return replace(inp, attention=None if constraints.empty else constraints)


def candidate(c: FillCandidate) -> dict[str, Any]:
    """One answer in the Inference API's shape; ``tokens`` only for fills of several sub-tokens."""
    out: dict[str, Any] = {"sequence": c.sequence, "score": c.score, "token": c.token, "token_str": c.token_str}
    if len(c.pieces) > 1:
        out["tokens"] = list(c.pieces)
    return out


def render_response(job: FillMaskJob, result: FillMaskResult) -> list[Any]:
    """The Inference API shape: a mask's list alone when the input has one mask; one entry per input for lists."""
    per_input = [
        [candidate(c) for c in masks[0]] if len(masks) == 1 else [[candidate(c) for c in cands] for cands in masks]
        for masks in result
    ]
    return per_input if job.batched else per_input[0]
