"""Cloze evaluation: the file reader, the accuracy arithmetic, and the one scorer: the evaluator's answers
are POST /v1/fill-mask's, on the served model and on a model in training."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM

from service.app import create_app
from service.config import Settings
from service.engine.fill.driver import FillDriver
from service.engine.fill.job import FillCandidate
from service.engine.loading import LoadedModel, ModelKind
from service.training.eval import (
    ClozeItem,
    EvalMode,
    answer_sample,
    evaluate,
    predict,
    read_cloze,
    score,
    training_model,
)

BUNDLED_CLOZE = Path(__file__).resolve().parents[2] / "service" / "data" / "cloze.tsv"


def test_bundled_cloze_set_is_broad() -> None:
    items = read_cloze(BUNDLED_CLOZE)
    counts = Counter(i.category for i in items)
    assert set(counts) == {"sentence_initial", "mid_sentence", "multi_token", "facts"}
    assert min(counts.values()) >= 40
    assert all(i.text.startswith("[MASK]") for i in items if i.category == "sentence_initial")
    assert all(i.text.count("[MASK]") == 1 and i.answers for i in items)
    assert len({i.text for i in items}) == len(items)  # no duplicates


def test_everyday_cloze_set_is_kept() -> None:
    items = read_cloze(BUNDLED_CLOZE.with_name("cloze_everyday.tsv"))
    assert len(items) == 166
    assert {i.category for i in items} == {"nature", "home", "food", "work", "travel", "school", "science",
                                           "numbers", "opposites"}  # fmt: skip


def test_read_cloze_formats_and_errors(tmp_path: Path) -> None:
    tsv = tmp_path / "c.tsv"
    tsv.write_text("# comment\nThe [MASK] barked.\tdog|puppy\n")
    assert read_cloze(tsv) == [ClozeItem("The [MASK] barked.", ("dog", "puppy"), "")]
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "A [MASK].", "answers": ["b"], "category": "x"}\n')
    assert read_cloze(jl) == [ClozeItem("A [MASK].", ("b",), "x")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("no mask here\tx\n")
    with pytest.raises(ValueError, match=r"exactly one \[MASK\]"):
        read_cloze(bad)


def fake(words: list[str]) -> list[FillCandidate]:
    return [FillCandidate(f"... {w} ...", 0.1, 0, f" {w}", (0,)) for w in words]


def test_score_counts_top1_and_top5_on_the_rendered_fill() -> None:
    items = [
        ClozeItem("a [MASK]", ("dog",), "x"),  # top-1 hit (case-insensitive, the fill's space dropped)
        ClozeItem("b [MASK]", ("cat",), "x"),  # top-5 hit only
        ClozeItem("c [MASK]", ("owl",), "y"),  # miss: 6th place does not count
    ]
    result = score(items, [fake(["Dog"]), fake(["x", "y", "cat"]), fake([*"abcde", "owl"])])
    assert result["top1"] == pytest.approx(1 / 3)
    assert result["top5"] == pytest.approx(2 / 3)
    assert result["categories"] == {"x": {"n": 2, "top1": 0.5, "top5": 1.0}, "y": {"n": 1, "top1": 0.0, "top5": 0.0}}
    assert result["items"][2]["predictions"] == list("abcde")  # per item, the top 5 as compared


def test_answer_sample_is_fixed_and_about_a_hundred_answers() -> None:
    items = [{"text": f"s{i} [MASK]", "predictions": [f"w{i}{j}" for j in range(5)]} for i in range(50)]
    result = {"whole_word": {"items": items}}
    text = answer_sample(result)
    assert text == answer_sample(result)  # a fixed seed
    assert len(text.splitlines()) == 1 + 20  # the heading, then 20 items of 5 answers


# --- one scorer: the evaluator answers what the server answers ---------------------------------------------

SENTENCES = ["the dog [MASK] the red ball.", "[MASK] cat likes some bread.", "my friend visits the old [MASK]."]


@pytest.fixture(scope="module")
def served(mntp_settings: Settings, tiny_mntp: LoadedModel) -> Iterator[TestClient]:
    with TestClient(create_app(mntp_settings, loaded=tiny_mntp)) as client:
        yield client


def server_answer(client: TestClient, text: str, mode: EvalMode) -> list[dict[str, Any]]:
    parameters = {"top_k": 5, "whole_word": mode is EvalMode.WHOLE_WORD}
    response = client.post("/v1/fill-mask", json={"inputs": text, "parameters": parameters})
    assert response.status_code == 200
    answer: list[dict[str, Any]] = response.json()
    return answer


def assert_same(ours: list[FillCandidate], theirs: list[dict[str, Any]], tol: float) -> None:
    assert [(c.token_str, c.token, c.sequence) for c in ours] == [
        (c["token_str"], c["token"], c["sequence"]) for c in theirs
    ]
    assert [c.score for c in ours] == pytest.approx([c["score"] for c in theirs], abs=tol)


@pytest.mark.parametrize("mode", list(EvalMode))
def test_the_evaluator_answers_what_the_server_answers(
    served: TestClient, tiny_mntp: LoadedModel, mntp_settings: Settings, mode: EvalMode
) -> None:
    items = [ClozeItem(s, ("x",)) for s in SENTENCES]
    ours = list(predict(FillDriver(tiny_mntp, mntp_settings), items, mode))  # the items' jobs batched together
    for text, cands in zip(SENTENCES, ours, strict=True):
        # whole-word: the lexicon drops a tiny random model's non-words, so there may be fewer than 5
        assert 0 < len(cands) <= 5 if mode is EvalMode.WHOLE_WORD else len(cands) == 5
        assert_same(cands, server_answer(served, text, mode), 1e-6)


def test_the_evaluator_reranks_as_the_server_does(mntp_settings: Settings, tiny_mntp: LoadedModel) -> None:
    settings = mntp_settings.model_copy(update={"fill_rerank": True})
    items = [ClozeItem(s, ("x",)) for s in SENTENCES]
    ours = list(predict(FillDriver(tiny_mntp, settings), items, EvalMode.WHOLE_WORD))
    plain = list(predict(FillDriver(tiny_mntp, mntp_settings), items, EvalMode.WHOLE_WORD))
    assert ours != plain  # the rerank changed the scores (shares of the top 5, not geometric means)
    with TestClient(create_app(settings, loaded=tiny_mntp)) as client:
        for text, cands in zip(SENTENCES, ours, strict=True):
            assert_same(cands, server_answer(client, text, EvalMode.WHOLE_WORD), 1e-6)


def test_a_model_in_training_is_scored_as_it_will_be_served(
    tiny_llama_dir: Path, tiny_mntp_adapter_dir: Path, tiny_mntp: LoadedModel, mntp_settings: Settings
) -> None:
    """The PEFT model, LoRA unmerged (as finetune evaluates it), against the loader's merged copy. Without the
    rerank: in training the base decoder is the model being trained (training_model has no generation model)."""
    mntp_settings = mntp_settings.model_copy(update={"fill_rerank": False})
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tiny_mntp_adapter_dir)
    training = training_model(net.eval(), tiny_mntp.tokenizer, ModelKind.DECODER, "<mask>", tiny_mntp_adapter_dir)
    items = [ClozeItem(s, ("x",)) for s in SENTENCES]
    for mode in EvalMode:
        ours = predict(FillDriver(training, mntp_settings), items, mode)
        served = predict(FillDriver(tiny_mntp, mntp_settings), items, mode)
        for a, b in zip(ours, served, strict=True):
            assert [c.token_str for c in a] == [c.token_str for c in b]
            assert [c.score for c in a] == pytest.approx([c.score for c in b], abs=1e-5)


def test_evaluate_reports_both_modes_with_words(tiny_mntp: LoadedModel, mntp_settings: Settings) -> None:
    items = [ClozeItem(s, ("ball", "the"), "c") for s in SENTENCES]
    result = evaluate(FillDriver(tiny_mntp, mntp_settings), items, list(EvalMode))
    for mode in EvalMode:
        rows = result[mode.value]["items"]
        assert all(0 < len(r["predictions"]) <= 5 for r in rows)
        if mode is EvalMode.PLAIN:
            assert [len(r["predictions"]) for r in rows] == [5, 5, 5]
        assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in rows)
    for row in result["whole_word"]["items"]:
        assert all(p and not any(ch.isspace() for ch in p) for p in row["predictions"])  # one word each
