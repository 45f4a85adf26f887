"""The whole-word rule: lexicon words and names pass, the junk the issue reported does not."""

from __future__ import annotations

import pytest

from service.engine.lexicon import Lexicon, default_lexicon, is_word


@pytest.mark.parametrize(
    "text",
    ["dog", "Dogs", "hairdresser", "firefighters", "Jupiter", "Shakespeare", "NASA", "Parmesan",
     "don't", "I'm", "dog's", "42", "1990", "3.5", "5th", "I", "a", "echolocation"],
)  # fmt: skip
def test_words_pass(text: str) -> None:
    assert is_word(text)


@pytest.mark.parametrize(
    "text",
    ["acknowled", "ishigata", "aoiteo", "alejohn", "Alejohn", "son-of-", "new-fangled The", "", " dog", "dog ",
     "jUPITER", "-", "legs--eight", "sea-", "China-China", "Edo-d", "well-known"],
)  # fmt: skip
def test_non_words_fail(text: str) -> None:
    assert not is_word(text)


def test_an_unknown_capitalised_name_passes_only_as_one_sub_token() -> None:
    assert is_word("Alejohn", pieces=1)
    assert not is_word("Alejohn", pieces=2)
    assert not is_word("alejohn", pieces=1)  # lower case: the lexicon alone decides
    assert not is_word("AleJohn", pieces=1)  # not a well-formed name


def test_a_hyphenated_fill_passes_only_as_listed() -> None:
    lex = Lexicon(["well-known", "well", "known"])
    assert lex.is_word("well-known")
    assert not lex.is_word("known-well")  # listed parts do not make a listed compound


def test_a_small_lexicon_decides_case_exactly() -> None:
    lex = Lexicon(["dog", "Paris", "NASA"])
    assert len(lex) == 3
    words = ("dog", "Dog", "DOG", "Paris", "paris", "NASA", "nasa", "cat")
    assert [lex.is_word(w) for w in words] == [True, True, False, True, False, True, False, False]
    # an uncased model writes every name in lower case
    assert [lex.is_word(w, uncased=True) for w in words] == [True, True, False, True, True, True, True, False]
    assert not is_word("ven")
    assert is_word("Ven")
    assert not is_word("parmesan")
    assert is_word("parmesan", uncased=True)


def test_could_start_prunes_partial_words() -> None:
    lex = default_lexicon()
    assert lex.could_start("hairdr")
    assert lex.could_start("Jupi")
    assert not lex.could_start("aoit")
    assert len(lex) == 135_289
