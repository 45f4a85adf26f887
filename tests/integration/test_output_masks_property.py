"""Property-based: whatever the constraints and the sampling, the tiny Llama's output never violates them.

Sampling at temperature 1 from a random-weight model is close to the worst case: it wanders through the whole
vocabulary, byte tokens and special tokens included. Every example runs through the real decode loop.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.engine.generate import DecodeBatch, GenerationJob, RunningRequest, compile_job
from service.engine.loading import LoadedModel
from service.engine.params import FinishReason, SamplingParams
from service.engine.vocab import ModelVocab
from service.masks.output import OutputMaskSpec

PROMPTS = ["the dog sees", "paris is", "a farmer finds some bread.", "<|im_start|>user\nhi<|im_end|>\n"]
WORDS = ["e", "the", " the", "a", "dog", "re", "in", " b", "es", "th", "s.", "ll"]
REGEXES = ["[a-z]+", "(yes|no)", "[0-9]{1,3}", "a+b*c?", "[a-z ]{0,8}\\.", "(the )+dog"]
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 4}, "ok": {"type": "boolean"}},
        "required": ["name", "ok"],
    },  # fmt: skip
    {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
]
PROPERTY = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def vocab(tiny_llama: LoadedModel) -> ModelVocab:
    return ModelVocab.build(tiny_llama, grammar_cache_size=16)


@pytest.fixture(scope="module")
def batch(tiny_llama: LoadedModel, vocab: ModelVocab) -> DecodeBatch:
    return DecodeBatch.serving(tiny_llama, vocab)


def run(
    tiny: LoadedModel, vocab: ModelVocab, batch: DecodeBatch, spec: OutputMaskSpec, prompt: str, n: int, seed: int
) -> RunningRequest:
    ids = list(tiny.tokenizer(prompt)["input_ids"])
    job = GenerationJob(ids, SamplingParams(max_new_tokens=n, temperature=1.0, seed=seed), spec)
    compile_job(job, vocab, dtype=torch.float32, dims=tiny.attention_dims)
    seq = RunningRequest(job, torch.device("cpu"))
    batch.add([seq])
    while batch.rows:
        batch.step()
    assert seq.finished
    return seq


common = {
    "prompt": st.sampled_from(PROMPTS),
    "n": st.integers(1, 12),
    "seed": st.integers(0, 2**32),
}


@PROPERTY
@given(bad=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4), **common)
def test_bad_words_never_appear(
    tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch, bad: list[str], prompt: str, n: int, seed: int
) -> None:
    seq = run(tiny_llama, vocab, batch, OutputMaskSpec(bad_words=tuple(bad)), prompt, n, seed)
    text = seq.result().text
    assert not any(w in text for w in bad), (bad, text)
    # the tokenizer's own decoding agrees: no bad word however the text is produced
    decoded = tiny_llama.tokenizer.decode(seq.generated, skip_special_tokens=True)
    assert not any(w in decoded for w in bad), (bad, decoded)


@PROPERTY
@given(
    allowed=st.lists(st.integers(20, 399), min_size=1, max_size=30),
    bad=st.lists(st.sampled_from(WORDS), max_size=2),
    min_tokens=st.integers(0, 4),
    **common,
)
def test_allowed_tokens_and_min_tokens(
    tiny_llama: LoadedModel,
    vocab: ModelVocab,
    batch: DecodeBatch,
    allowed: list[int],
    bad: list[str],
    min_tokens: int,
    prompt: str,
    n: int,
    seed: int,
) -> None:
    eos = vocab.vocabulary.eos_ids
    size = vocab.vocabulary.size
    allowed = [a for a in allowed if a < size and not any(w.encode() in vocab.vocabulary.token_bytes[a] for w in bad)]
    if not allowed:
        return  # compile rejects this combination (tested elsewhere)
    spec = OutputMaskSpec(allowed_token_ids=tuple(allowed), bad_words=tuple(bad), min_tokens=min(min_tokens, n))
    seq = run(tiny_llama, vocab, batch, spec, prompt, n, seed)
    assert set(seq.generated) <= set(allowed) | eos
    assert not any(w in seq.result().text for w in bad)
    if seq.finish_reason is FinishReason.EOS and not bad:
        assert len(seq.generated) > spec.min_tokens  # eos only after min_tokens (nothing could force it earlier)


@PROPERTY
@given(bias=st.dictionaries(st.integers(3, 399), st.sampled_from([-100.0, 100.0]), min_size=1, max_size=5), **common)
def test_logit_bias_extremes(
    tiny_llama: LoadedModel,
    vocab: ModelVocab,
    batch: DecodeBatch,
    bias: dict[int, float],
    prompt: str,
    n: int,
    seed: int,
) -> None:
    spec = OutputMaskSpec(logit_bias=tuple(bias.items()))
    seq = run(tiny_llama, vocab, batch, spec, prompt, n, seed)
    boosted = {t for t, v in bias.items() if v > 0}
    banned = {t for t, v in bias.items() if v < 0}
    assert not set(seq.generated) & banned
    if boosted:
        assert set(seq.generated) <= boosted


@PROPERTY
@given(
    kind=st.sampled_from(["choice", "regex", "json_schema"]),
    which=st.integers(0, 10),
    bad=st.lists(st.sampled_from(["e", "x", "no", "1"]), max_size=1),
    **common,
)
def test_grammars_hold(
    tiny_llama: LoadedModel,
    vocab: ModelVocab,
    batch: DecodeBatch,
    kind: str,
    which: int,
    bad: list[str],
    prompt: str,
    n: int,
    seed: int,
) -> None:
    n = n * 3  # room to finish
    options = ["yes", "no", "maybe so", "the dog"]
    spec: OutputMaskSpec
    if kind == "choice":
        if all(any(w in o for w in bad) for o in options):
            return
        spec = OutputMaskSpec(choice=tuple(options), bad_words=tuple(bad))
    elif kind == "regex":
        spec = OutputMaskSpec(regex=REGEXES[which % len(REGEXES)], bad_words=tuple(bad))
    else:
        spec = OutputMaskSpec(json_schema=json.dumps(SCHEMAS[which % len(SCHEMAS)]), bad_words=tuple(bad))
    seq = run(tiny_llama, vocab, batch, spec, prompt, n, seed)
    text = seq.result().text
    assert not any(w in text for w in bad)
    assert not set(seq.generated) & (vocab.vocabulary.special_ids - vocab.vocabulary.eos_ids)
    complete = seq.finish_reason is FinishReason.EOS
    if kind == "choice":
        allowed = [o for o in options if not any(w in o for w in bad)]
        assert text in allowed if complete else any(o.startswith(text) for o in allowed)
    elif kind == "regex" and complete:
        assert re.fullmatch(REGEXES[which % len(REGEXES)], text), text
    elif kind == "json_schema" and complete:
        jsonschema.validate(json.loads(text), SCHEMAS[which % len(SCHEMAS)])
    if not complete:
        assert seq.finish_reason in {FinishReason.LENGTH, FinishReason.CONSTRAINT}
