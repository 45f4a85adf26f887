"""Output masks as pure functions, on a hand-made vocabulary: exact tensors and exact errors."""

from __future__ import annotations

import pytest
import torch

from service.masks.bad_words import BadWords
from service.masks.errors import MaskError
from service.masks.grammar import choice_grammar
from service.masks.kinds import MaskKind
from service.masks.output import NgramTable, OutputMaskSpec, apply_output_masks, compile_output_mask, mask_effect
from service.masks.vocabulary import Vocabulary

INF = float("-inf")
# id:       0      1     2     3     4      5      6       7        8     9         10
TOKENS = [b"", b"d", b"o", b"g", b"do", b"og", b"dog", b" dog", b"x", b"hotdo", b"gs"]
VOCAB = Vocabulary(token_bytes=tuple(TOKENS), eos_ids=frozenset({0}), special_ids=frozenset({0}))


def encode(text: str) -> list[int]:
    """A toy tokenizer: longest match first."""
    pieces = sorted(((t, i) for i, t in enumerate(TOKENS) if t), key=lambda p: -len(p[0]))
    data, out = text.encode(), []
    while data:
        tok, i = next((t, i) for t, i in pieces if data.startswith(t))
        out.append(i)
        data = data[len(tok) :]
    return out


def compiled(**kw: object) -> object:
    return compile_output_mask(OutputMaskSpec(**kw), VOCAB, encode=encode, grammars=None)  # type: ignore[arg-type]


def test_ids_starting_with_is_a_prefix_range() -> None:
    assert sorted(VOCAB.ids_starting_with(b"do")) == [4, 6]
    assert sorted(VOCAB.ids_starting_with(b"g")) == [3, 10]
    assert VOCAB.ids_starting_with(b"z") == []


def test_bad_words_automaton_blocks_every_spelling() -> None:
    bad = BadWords([b"dog"], VOCAB)
    assert bad.always.nonzero().flatten().tolist() == [6, 7]  # tokens containing the whole word
    root = 0
    assert bad.blocked(root).tolist() == []
    after_d = bad.advance(root, b"d")
    assert bad.blocked(after_d).tolist() == [5]  # "og" would finish it
    after_do = bad.advance(after_d, b"o")
    assert bad.blocked(after_do).tolist() == [3, 10]  # "g", "gs"
    assert bad.advance(root, b"hotdo") == after_do  # inside a longer token too
    assert bad.advance(after_do, b"x") == root
    assert bad.advance(after_d, b"d") == after_d  # "dd": the last "d" may still start the word


def test_bad_words_overlapping_words_follow_failure_links() -> None:
    vocab = Vocabulary(token_bytes=(b"", b"a", b"b", b"c", b"ab", b"bc"), eos_ids=frozenset({0}),
                       special_ids=frozenset({0}))  # fmt: skip
    bad = BadWords([b"abc", b"bd"], vocab)
    node = bad.advance(0, b"ab")  # "ab" is a prefix of "abc", and its suffix "b" a prefix of "bd"
    assert bad.blocked(node).tolist() == [3]  # "c" (finishes "abc"); no token starts with "d"
    assert bad.blocked(bad.advance(0, b"a")).tolist() == [5]  # "bc"


def test_apply_masks_bias_allowed_bad_words_min_tokens() -> None:
    mask = compiled(allowed_token_ids=(1, 2, 3, 8), bad_words=("dog",), logit_bias=((8, 2.0),), min_tokens=1)
    state = mask.new_state()  # type: ignore[attr-defined]
    logits = torch.zeros(2, len(TOKENS))
    dead = apply_output_masks(logits, [state, None])
    assert dead == []
    #                            eos  d    o    g    do   og   dog  _dog x    hotdo gs
    assert torch.equal(logits[0], torch.tensor([INF, 0.0, 0.0, 0.0, INF, INF, INF, INF, 2.0, INF, INF]))
    assert torch.equal(logits[1], torch.zeros(len(TOKENS)))  # a row without masks is untouched
    state.advance(1, b"d")
    state.advance(2, b"o")  # "do": now "g" would finish the bad word; min_tokens is met, eos is back
    logits = torch.zeros(1, len(TOKENS))
    apply_output_masks(logits, [state])
    assert torch.equal(logits[0], torch.tensor([0.0, 0.0, 0.0, INF, INF, INF, INF, INF, 2.0, INF, INF]))


def test_min_tokens_yields_when_nothing_else_is_left() -> None:
    mask = compiled(allowed_token_ids=(3,), bad_words=("dog",), min_tokens=5)
    state = mask.new_state()  # type: ignore[attr-defined]
    state.advance(4, b"do")
    logits = torch.zeros(1, len(TOKENS))
    assert apply_output_masks(logits, [state]) == []
    assert logits[0].isfinite().nonzero().flatten().tolist() == [0]  # only end-of-sequence remains


def test_dead_row_is_reported() -> None:
    mask = compiled(bad_words=("dog",))
    state = mask.new_state()  # type: ignore[attr-defined]
    state.advance(4, b"do")
    logits = torch.full((1, len(TOKENS)), INF)
    logits[0, 3] = 1.0  # only "g" would be possible, and it finishes "dog"
    assert apply_output_masks(logits, [state]) == [0]


def test_rows_of_a_batch_are_judged_each_on_its_own() -> None:
    """Dead rows and min_tokens are decided for the whole batch at once; each row as if alone."""
    yielding = compiled(allowed_token_ids=(3,), bad_words=("dog",), min_tokens=5).new_state()  # type: ignore[attr-defined]
    yielding.advance(4, b"do")  # only eos is left: min_tokens yields
    dying = compiled(bad_words=("dog",)).new_state()  # type: ignore[attr-defined]
    dying.advance(4, b"do")
    waiting = compiled(min_tokens=2).new_state()  # type: ignore[attr-defined]  # eos blocked, the rest open
    logits = torch.zeros(4, len(TOKENS))
    logits[1] = INF
    logits[1, 3] = 1.0  # row 1 may only say "g", which finishes "dog"
    assert apply_output_masks(logits, [yielding, dying, None, waiting]) == [1]
    assert logits[0].isfinite().nonzero().flatten().tolist() == [0]
    assert torch.equal(logits[2], torch.zeros(len(TOKENS)))
    assert logits[3, 0] == INF
    assert bool(logits[3, 1:].isfinite().all())


@pytest.mark.parametrize(
    ("kw", "param", "message"),
    [
        ({"bad_words": ("dog", "")}, "bad_words[1]", "must not be empty"),
        ({"allowed_token_ids": (1, 11)}, "allowed_token_ids[1]", "11 is not a token id (0..10)"),
        ({"allowed_words": ("  ",)}, "allowed_words[0]", "non-space"),
        ({"allowed_token_ids": (6, 7), "bad_words": ("dog",)}, "allowed_token_ids", "every allowed token contains"),
        ({"allowed_token_ids": (0,), "min_tokens": 2}, "allowed_token_ids", "every allowed token"),
        ({"logit_bias": ((12, 1.0),)}, "logit_bias.12", "12 is not a token id"),
        ({"choice": ("a",), "regex": "b"}, "regex", "only one of"),
        ({"choice": ("a",)}, "choice", "not available"),
    ],
)
def test_invalid_specs_name_the_param(kw: dict[str, object], param: str, message: str) -> None:
    with pytest.raises(MaskError) as err:
        compiled(**kw)
    assert err.value.param == param
    assert message in err.value.message


def test_param_names_follow_the_request() -> None:
    spec = OutputMaskSpec(json_schema="[1]", param_names=(("json_schema", "response_format.json_schema.schema"),))
    assert spec.param("json_schema") == "response_format.json_schema.schema"
    assert spec.param("regex") == "regex"


def test_empty_spec_compiles_to_nothing() -> None:
    assert compiled() is None
    assert OutputMaskSpec().empty
    assert not OutputMaskSpec(min_tokens=1).empty


def test_allowed_words_take_both_space_variants() -> None:
    mask = compiled(allowed_words=("dog",))
    open_ids = (~mask.blocked).nonzero().flatten().tolist()  # type: ignore[attr-defined]
    assert open_ids == [0, 6, 7]  # eos, "dog", " dog"


def test_choice_grammar_quotes_options() -> None:
    assert choice_grammar(['say "hi"', "a\\b"]) == 'root ::= "say \\"hi\\"" | "a\\\\b"'


def test_mask_effect_reports_removed_mass() -> None:
    raw = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    masked = torch.tensor([INF, 0.0, INF, 0.0])
    effect = mask_effect(raw, masked, top=5)
    assert effect.allowed == 2
    assert effect.removed_mass == pytest.approx(0.65)
    assert [i for i, _ in effect.removed_top] == [0, 2]
    assert [p for _, p in effect.removed_top] == pytest.approx([0.5, 0.15])


def test_no_repeat_ngram_bans_what_would_complete_a_seen_ngram() -> None:
    """transformers' semantics: prompt + output; the last n-1 tokens, and every token that followed them."""
    mask = compiled(no_repeat_ngram_size=2)
    state = mask.new_state([1, 2, 1, 3])  # type: ignore[attr-defined]  # bigrams 1-2, 2-1, 1-3
    logits = torch.zeros(1, len(TOKENS))
    apply_output_masks(logits, [state])
    assert logits[0].isinf().nonzero().flatten().tolist() == []  # after 3 nothing was seen
    state.advance(1, b"d")  # ... 3 1: after 1 came 2 and 3
    logits = torch.zeros(1, len(TOKENS))
    apply_output_masks(logits, [state])
    assert logits[0].isinf().nonzero().flatten().tolist() == [2, 3]
    assert mask.kinds == (MaskKind.NO_REPEAT_NGRAM,)  # type: ignore[attr-defined]


def test_no_repeat_ngram_rows_with_different_n_in_one_batch() -> None:
    tokens = [4, 5, 4, 5, 4]
    tri = compiled(no_repeat_ngram_size=3).new_state(tokens)  # type: ignore[attr-defined]  # 5 4 -> 5 was seen
    uni = compiled(no_repeat_ngram_size=1).new_state(tokens)  # type: ignore[attr-defined]  # every seen token
    big = compiled(no_repeat_ngram_size=6).new_state(tokens)  # type: ignore[attr-defined]  # too short to ban
    logits = torch.zeros(4, len(TOKENS))
    assert apply_output_masks(logits, [tri, uni, None, big]) == []
    banned = [row.isinf().nonzero().flatten().tolist() for row in logits]
    assert banned == [[5], [4, 5], [], []]
    assert NgramTable(3, [7, 8, 7, 8]).followers == {(7, 8): {7}, (8, 7): {8}}


def test_no_repeat_ngram_can_leave_a_dead_row() -> None:
    state = compiled(allowed_token_ids=(1,), no_repeat_ngram_size=2).new_state([1, 1])  # type: ignore[attr-defined]
    logits = torch.zeros(1, len(TOKENS))
    logits[0, 0] = INF  # end-of-sequence is out too
    assert apply_output_masks(logits, [state]) == [0]
