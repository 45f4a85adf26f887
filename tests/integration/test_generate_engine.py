"""The decode loop on the tiny Llama: equal to transformers' greedy generate, and the same alone or batched."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, cast

import pytest
import torch
from transformers import GenerationMixin

from service.engine.generate import DecodeBatch, GenerationJob, RunningRequest, compile_job
from service.engine.loading import LoadedModel
from service.engine.params import FinishReason, SamplingParams
from service.engine.vocab import ModelVocab
from service.masks.constraints import AttentionConstraints, TokenSpan
from service.masks.kinds import MaskKind
from service.masks.output import OutputMaskSpec

PROMPTS = [
    "the dog sees the red ball.",
    "paris",
    "a farmer watches an apple and the tall mountain, then my friend visits the capital.",
    "the teacher paints",
    "jupiter is the largest planet.",
]


@pytest.fixture(scope="module")
def vocab(tiny_llama: LoadedModel) -> ModelVocab:
    return ModelVocab.build(tiny_llama, grammar_cache_size=8)


@pytest.fixture
def batch(tiny_llama: LoadedModel, vocab: ModelVocab) -> DecodeBatch:
    return DecodeBatch.serving(tiny_llama, vocab)


def make(
    tiny: LoadedModel, vocab: ModelVocab, prompt: str, n: int = 12, spec: OutputMaskSpec | None = None, **kw: Any
) -> RunningRequest:
    return RunningRequest(spec_job(tiny, vocab, prompt, n, spec, **kw), torch.device("cpu"))


def spec_job(
    tiny: LoadedModel,
    vocab: ModelVocab,
    prompt: str,
    n: int = 12,
    spec: OutputMaskSpec | None = None,
    constraints: AttentionConstraints | None = None,
    **kw: Any,
) -> GenerationJob:
    job = GenerationJob(
        list(tiny.tokenizer(prompt)["input_ids"]), SamplingParams(max_new_tokens=n, **kw), spec or OutputMaskSpec()
    )
    job.constraints = constraints or AttentionConstraints()
    compile_job(job, vocab, dtype=torch.float32, dims=tiny.attention_dims)
    return job


def drive(batch: DecodeBatch, arrivals: dict[int, Sequence[RunningRequest]]) -> None:
    """Add requests at the given step numbers and step until every request finished."""
    step = 0
    pending = dict(arrivals)
    while pending or batch.rows:
        if step in pending:
            batch.add(pending.pop(step))
        if batch.rows:
            batch.step()
        step += 1
        assert step < 500


def alone(batch: DecodeBatch, seq: RunningRequest) -> list[int]:
    drive(batch, {0: [seq]})
    assert not batch.rows
    return seq.generated


def test_greedy_matches_transformers_generate(tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch) -> None:
    model, tok = tiny_llama.generation_model, tiny_llama.tokenizer
    assert model is not None
    generator = cast(GenerationMixin, model)  # a causal LM class; PreTrainedModel has no generate()
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            ref = generator.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
        seq = make(tiny_llama, vocab, prompt, n=12)
        assert alone(batch, seq) == ref.tolist()


@pytest.mark.parametrize(
    "kw",
    [{}, {"temperature": 1.0, "seed": 7}, {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 1}],
    ids=["greedy", "sampled", "top-k-top-p"],
)
def test_same_output_alone_or_in_a_changing_batch(
    tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch, kw: dict[str, Any]
) -> None:
    lengths = [12, 5, 9, 16, 3]
    mk: Callable[[int], RunningRequest] = lambda i: make(tiny_llama, vocab, PROMPTS[i], n=lengths[i], **kw)  # noqa: E731
    solo = [alone(batch, mk(i)) for i in range(len(PROMPTS))]
    seqs = [mk(i) for i in range(len(PROMPTS))]
    # Staggered arrivals: rows join a running batch with longer or shorter caches, others leave meanwhile.
    drive(batch, {0: [seqs[0]], 2: [seqs[1], seqs[2]], 3: [seqs[3]], 9: [seqs[4]]})
    assert [s.generated for s in seqs] == solo
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)


def test_cache_shrinks_when_long_rows_leave(tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch) -> None:
    long, short = make(tiny_llama, vocab, PROMPTS[2], n=3), make(tiny_llama, vocab, PROMPTS[1], n=8)
    batch.add([long, short])
    width = batch.cache.width  # type: ignore[union-attr]
    batch.step()
    batch.step()  # the long prompt's request is done after 3 tokens (1 at prefill + 2 steps)
    assert long.finished
    assert batch.rows == [short]
    # Only the short row's keys remain: its prompt and the tokens it fed, no left padding.
    assert batch.cache.width == len(short.job.prompt_ids) + 2  # type: ignore[union-attr]
    assert batch.cache.width < width + 2  # type: ignore[union-attr]
    assert batch.mask is not None
    assert bool(batch.mask.keys.all())
    drive(batch, {})


def test_remove_cancelled_row_keeps_the_others(tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch) -> None:
    ref = alone(batch, make(tiny_llama, vocab, PROMPTS[0], n=10))
    a, b = make(tiny_llama, vocab, PROMPTS[0], n=10), make(tiny_llama, vocab, PROMPTS[2], n=10)
    batch.add([a, b])
    batch.step()
    batch.remove([b])
    drive(batch, {})
    assert a.generated == ref
    assert len(b.generated) == 2


def test_eos_and_finish_reasons(tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch) -> None:
    eos = tiny_llama.tokenizer.eos_token_id
    # A logit bias that makes end-of-sequence certain: the model stops at once, after min_tokens if given.
    seq = make(tiny_llama, vocab, PROMPTS[0], spec=OutputMaskSpec(logit_bias=((eos, 100.0),)))
    assert alone(batch, seq) == [eos]
    assert seq.finish_reason is FinishReason.EOS
    assert seq.result().text == ""
    seq = make(tiny_llama, vocab, PROMPTS[0], spec=OutputMaskSpec(logit_bias=((eos, 100.0),), min_tokens=3))
    out = alone(batch, seq)
    assert len(out) == 4
    assert out[-1] == eos
    assert eos not in out[:3]


def test_stop_sequence_cuts_text(tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch) -> None:
    free = make(tiny_llama, vocab, PROMPTS[0], n=12, temperature=1.0, seed=5)
    alone(batch, free)
    text = free.result().text
    stop = text[3:5]
    assert stop
    assert stop not in text[:4]
    seq = make(tiny_llama, vocab, PROMPTS[0], n=12, temperature=1.0, seed=5, stop=(stop,))
    alone(batch, seq)
    result = seq.result()
    assert result.finish_reason is FinishReason.STOP
    assert result.text == text[: text.index(stop)]


def test_records_mask_effect_only_when_asked(tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch) -> None:
    spec = OutputMaskSpec(allowed_words=("the", "dog"))
    plain = make(tiny_llama, vocab, PROMPTS[0], n=4, spec=spec)
    alone(batch, plain)
    assert plain.result().mask_steps is None
    seq = make(tiny_llama, vocab, PROMPTS[0], n=4, spec=spec)
    seq.mask_steps = []
    alone(batch, seq)
    steps = seq.result().mask_steps
    assert steps is not None
    assert len(steps) == 4
    allowed = {t for w in ("the", "dog", " the", " dog") for t in vocab.encode(w)} | set(vocab.vocabulary.eos_ids)
    for i, step in enumerate(steps):
        assert step.step == i
        assert step.allowed == len(allowed)
        assert 0.0 < step.removed_mass < 1.0
        assert all(tid not in allowed for tid, _ in step.removed_top)
        assert [p for _, p in step.removed_top] == sorted((p for _, p in step.removed_top), reverse=True)


def test_masked_rows_are_the_same_alone_or_batched(
    tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch
) -> None:
    specs = [
        OutputMaskSpec(bad_words=("e", "the")),
        OutputMaskSpec(regex="[a-z ]+\\."),
        OutputMaskSpec(json_schema='{"type": "object", "properties": {"n": {"type": "integer"}}}'),
        OutputMaskSpec(),
        OutputMaskSpec(allowed_words=("dog", "cat", "the"), min_tokens=4),
    ]

    def mk(i: int) -> RunningRequest:
        return make(tiny_llama, vocab, PROMPTS[i], n=10, spec=specs[i], temperature=1.0, seed=i)

    solo = [alone(batch, mk(i)) for i in range(len(specs))]
    seqs = [mk(i) for i in range(len(specs))]
    drive(batch, {0: seqs[:2], 1: [seqs[2]], 4: seqs[3:]})
    assert [s.generated for s in seqs] == solo


def test_grammar_cache_is_bounded(tiny_llama: LoadedModel) -> None:
    vocab = ModelVocab.build(tiny_llama, grammar_cache_size=2)
    cache = vocab.grammars
    first = cache.get("regex", "a+")
    cache.get("regex", "b+")
    assert cache.get("regex", "a+") is first  # a hit, and now the most recent
    cache.get("regex", "c+")  # evicts b+, the least recently used
    assert len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 3)
    cache.get("regex", "b+")
    assert cache.misses == 4


def constrained(tiny: LoadedModel, vocab: ModelVocab, prompt: str, c: AttentionConstraints) -> RunningRequest:
    return RunningRequest(spec_job(tiny, vocab, prompt, n=8, constraints=c), torch.device("cpu"))


def logprobs(seq: RunningRequest) -> list[float]:
    return [t.logprob for t in seq.result().tokens]


def test_emphasis_on_chosen_layers_and_heads(tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch) -> None:
    check_emphasis_on_chosen_layers_and_heads(tiny_llama, vocab, batch)


def check_emphasis_on_chosen_layers_and_heads(
    tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch, tolerance: float = 1e-5
) -> None:
    """Scoped to every layer and head it equals the bias in the shared mask (the steering path adds exactly
    the same bias); scoped to one layer or head it is a different steer; and it is the same alone or batched.
    ``tolerance``: on logprobs (tests/integration/test_precision.py passes a wider one for int8 GEMM)."""
    assert tiny_llama.steerable
    n_layers, n_heads = tiny_llama.attention_dims
    prompt = PROMPTS[2]

    def emph(layers: tuple[int, ...] | None = None, heads: tuple[int, ...] | None = None) -> AttentionConstraints:
        return AttentionConstraints(
            emphasis=(TokenSpan(0, 4),), emphasis_factor=20.0, emphasis_layers=layers, emphasis_heads=heads
        )

    every = constrained(tiny_llama, vocab, prompt, emph())
    alone(batch, every)
    scoped_all = constrained(tiny_llama, vocab, prompt, emph(tuple(range(n_layers)), tuple(range(n_heads))))
    alone(batch, scoped_all)
    assert scoped_all.attention.bias_scope is not None
    assert scoped_all.generated == every.generated
    assert logprobs(scoped_all) == pytest.approx(logprobs(every), abs=tolerance)

    plain = make(tiny_llama, vocab, prompt, n=8)
    alone(batch, plain)
    one_layer = constrained(tiny_llama, vocab, prompt, emph(layers=(1,)))
    alone(batch, one_layer)
    one_head = constrained(tiny_llama, vocab, prompt, emph(heads=(0,)))
    alone(batch, one_head)
    for scoped in (one_layer, one_head):
        assert logprobs(scoped)[0] != pytest.approx(logprobs(plain)[0], abs=1e-6)
        assert logprobs(scoped)[0] != pytest.approx(logprobs(every)[0], abs=1e-6)

    # batched with unconstrained and all-layer rows, joining mid-way: each row as alone
    seqs = [
        make(tiny_llama, vocab, PROMPTS[0], n=8),
        constrained(tiny_llama, vocab, prompt, emph(layers=(1,))),
        constrained(tiny_llama, vocab, prompt, emph()),
        constrained(tiny_llama, vocab, prompt, emph(heads=(0,))),
    ]
    drive(batch, {0: seqs[:2], 2: seqs[2:]})
    assert seqs[1].generated == one_layer.generated
    assert seqs[2].generated == every.generated
    assert seqs[3].generated == one_head.generated
    assert logprobs(seqs[1]) == pytest.approx(logprobs(one_layer), abs=tolerance)
    assert logprobs(seqs[3]) == pytest.approx(logprobs(one_head), abs=tolerance)


def ngram_counts(ids: Sequence[int], n: int) -> Counter[tuple[int, ...]]:
    return Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))


def test_no_repeat_ngram_alone_and_in_a_batch_with_other_rows(
    tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch
) -> None:
    """The tiny model repeats itself freely; with no_repeat_ngram_size=k no k-gram of prompt + output repeats,
    whether the row runs alone or beside rows with another k or none, and the step records what was removed."""
    sizes = [2, 3, 0, 1, 4]

    def mk(i: int) -> RunningRequest:
        spec = OutputMaskSpec(no_repeat_ngram_size=sizes[i]) if sizes[i] else None
        seq = make(tiny_llama, vocab, PROMPTS[i], n=24, spec=spec)
        seq.mask_steps = []
        return seq

    free = make(tiny_llama, vocab, PROMPTS[0], n=24)
    alone(batch, free)
    assert max(ngram_counts(free.job.prompt_ids + free.generated, 2).values()) > 1  # it does repeat unmasked
    solo = [alone(batch, mk(i)) for i in range(len(sizes))]
    seqs = [mk(i) for i in range(len(sizes))]
    drive(batch, {0: seqs[:2], 1: [seqs[2]], 3: seqs[3:]})
    assert [s.generated for s in seqs] == solo
    for seq, k in zip(seqs, sizes, strict=True):
        if not k:
            continue
        counts = ngram_counts(seq.job.prompt_ids + seq.generated, k)
        prompt_counts = ngram_counts(seq.job.prompt_ids, k)
        # any k-gram seen twice was already twice in the prompt (the mask prevents only new repeats)
        assert all(c == 1 or prompt_counts[g] == c for g, c in counts.items()), (k, seq.generated)
    masked = seqs[0].mask_steps
    assert masked is not None
    assert any(step.removed_mass > 0 for step in masked)  # inspection sees the tokens it removed
    assert seqs[0].job.compiled_output is not None
    assert seqs[0].job.compiled_output.kinds == (MaskKind.NO_REPEAT_NGRAM,)


@torch.inference_mode()
def test_frequency_and_presence_penalties_match_a_reference_loop(
    tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch
) -> None:
    """Greedy under the penalties equals a plain loop (a full forward each step, the formula on the last logits,
    argmax), for rows with different penalties in one batch; and they change what the tiny model says."""
    model = tiny_llama.generation_model
    assert model is not None
    settings = [(0.0, 0.0), (1.5, 0.0), (0.0, 2.0), (0.7, 0.7)]

    def reference(prompt: list[int], frequency: float, presence: float, n: int) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            logits = model(input_ids=torch.tensor([prompt + out])).logits[0, -1].float()  # (V,)
            for tid in set(out):
                logits[tid] -= out.count(tid) * frequency + presence
            out.append(int(logits.argmax()))
        return out

    seqs = [make(tiny_llama, vocab, PROMPTS[0], n=16, frequency_penalty=f, presence_penalty=p) for f, p in settings]
    drive(batch, {0: seqs[:2], 2: seqs[2:]})
    for seq, (f, p) in zip(seqs, settings, strict=True):
        assert seq.generated == reference(seq.job.prompt_ids, f, p, len(seq.generated)), (f, p)
    assert len({tuple(s.generated) for s in seqs}) > 1


def test_n_sequences_share_one_prefill_and_each_follow_their_own_seed(
    tiny_llama: LoadedModel, vocab: ModelVocab, batch: DecodeBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n rows of one job: one prefill row (its KV copied to the n rows), sequence i equal to the same request
    run alone with seed + i, beside a row of another request."""
    job = spec_job(tiny_llama, vocab, PROMPTS[0], 10, temperature=1.0, seed=40)
    group = object()
    siblings = [RunningRequest(job, torch.device("cpu"), index=i, group=group) for i in range(3)]
    other = make(tiny_llama, vocab, PROMPTS[2], n=6)
    widths: list[int] = []  # rows of each transformers forward (the prefill; decode steps too without the fused step)
    stepped: list[int] = []  # rows of each decode step
    original_forward, original_step = DecodeBatch._forward, DecodeBatch.step

    def counting(self: DecodeBatch, ids: torch.Tensor, *args: object) -> torch.Tensor:
        widths.append(ids.shape[0])
        return original_forward(self, ids, *args)  # type: ignore[arg-type]

    def stepping(self: DecodeBatch) -> list[RunningRequest]:
        stepped.append(len(self.rows))
        return original_step(self)

    monkeypatch.setattr(DecodeBatch, "_forward", counting)
    monkeypatch.setattr(DecodeBatch, "step", stepping)
    drive(batch, {0: [*siblings, other]})
    assert widths[0] == 2  # the prefill: one row for the three siblings, one for the other request
    assert stepped[0] == 4  # then four rows decode
    assert [s.seed for s in siblings] == [40, 41, 42]
    for i, s in enumerate(siblings):
        again = make(tiny_llama, vocab, PROMPTS[0], n=10, temperature=1.0, seed=40 + i)
        assert alone(batch, again) == s.generated
    assert len({tuple(s.generated) for s in siblings}) > 1
