"""Cloze evaluation: the file reader, word ranking, the accuracy arithmetic, the word-piece rules."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.engine.lexicon import is_word
from service.training.eval import ClozeItem, EvalMode, FillMaskScorer, evaluate, rank_words, read_cloze
from tests.tiny import token_id

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


def test_rank_words_length_penalty() -> None:
    candidates = [("dog", -2.0, 1), ("doggo", -3.0, 2), ("Dog", -2.5, 1)]
    # alpha 0: joint probability; alpha 1: mean per sub-token; each word keeps its best spelling
    assert rank_words(candidates, 0.0) == [("dog", -2.0), ("doggo", -3.0)]
    assert rank_words(candidates, 1.0) == [("doggo", -1.5), ("dog", -2.0)]
    assert rank_words(candidates, 0.5)[0][0] == "dog"  # -3 / sqrt(2) = -2.12 < -2.0


class FakeScorer:
    def __init__(self, predictions: dict[str, list[str]]) -> None:
        self.predictions = predictions

    def plain(self, text: str, k: int = 5) -> list[str]:
        return self.predictions[text][:k]

    def whole_word(self, text: str, k: int = 5) -> list[tuple[str, float]]:
        return [(w, 0.0) for w in self.predictions[text][:k]]

    def whole_word_both(self, text: str, k: int = 5) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        return self.whole_word(text, k), self.whole_word(text, k)


def test_evaluate_counts_top1_and_top5() -> None:
    items = [
        ClozeItem("a [MASK]", ("dog",), "x"),  # top-1 hit (case-insensitive)
        ClozeItem("b [MASK]", ("cat",), "x"),  # top-5 hit only
        ClozeItem("c [MASK]", ("owl",), "y"),  # miss: 6th place does not count
    ]
    scorer = FakeScorer({"a [MASK]": ["Dog"], "b [MASK]": ["x", "y", "cat"], "c [MASK]": list("abcde") + ["owl"]})
    result = evaluate(scorer, items, [EvalMode.PLAIN, EvalMode.WHOLE_WORD])  # type: ignore[arg-type]
    for mode in ("plain", "whole_word"):
        assert result[mode]["top1"] == pytest.approx(1 / 3)
        assert result[mode]["top5"] == pytest.approx(2 / 3)
        assert result[mode]["categories"] == {
            "x": {"n": 2, "top1": 0.5, "top5": 1.0},
            "y": {"n": 1, "top1": 0.0, "top5": 0.0},
        }


def test_whole_word_fills_are_single_words(tiny_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    scorer = FillMaskScorer(model, tok, token_id(tok, "<mask>"), mntp=True, prefix_id=tok.bos_token_id)
    candidates = scorer.word_candidates("the dog [MASK] the red ball.")
    assert {n for _, _, n in candidates} == {1, 2, 3, 4}
    for word, _, _ in candidates:
        assert word.isalnum()  # a word start then continuations: no spaces, no punctuation
    kept, seen = scorer.whole_word_both("the dog [MASK] the red ball.", k=5)
    assert len(seen) == 5
    assert kept == [ws for ws in seen if is_word(ws[0])][: len(kept)]  # the rule drops non-words, keeps the order
    assert all(is_word(w) for w, _ in kept)
    assert len(scorer.plain("the dog [MASK] the red ball.", k=3)) == 3
