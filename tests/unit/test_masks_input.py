"""service/masks/input.py: selection counts, seeds, whole words, spans, 80/10/10, labels."""

from __future__ import annotations

import pytest
import torch

from service.masks.input import (
    IGNORE_INDEX,
    InputMasking,
    MaskingStrategy,
    apply_input_mask,
    select_positions,
    select_spans,
    select_tokens,
    select_whole_words,
)

MASK = 99


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def runs(selected: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    out: list[tuple[int, int]] = []
    for i, v in enumerate(selected.tolist()):
        if v and (i == 0 or not selected[i - 1]):
            out.append((i, 1))
        elif v:
            out[-1] = (out[-1][0], out[-1][1] + 1)
    return out


@pytest.mark.parametrize(("n", "ratio", "expected"), [(20, 0.15, 3), (10, 0.15, 2), (3, 0.15, 1), (8, 1.0, 8)])
def test_token_selection_count_is_exact(n: int, ratio: float, expected: int) -> None:
    candidates = torch.ones(n, dtype=torch.bool)
    for seed in range(20):
        assert int(select_tokens(candidates, ratio, gen(seed)).sum()) == expected


def test_token_selection_only_candidates_and_none_without_candidates() -> None:
    candidates = torch.tensor([False, True, True, False, True, True, True, False, True, True])
    for seed in range(20):
        selected = select_tokens(candidates, 0.5, gen(seed))
        assert int(selected.sum()) == 4  # round(0.5 * 7) = 4 (banker's rounding of 3.5)
        assert not bool((selected & ~candidates).any())
    assert not bool(select_tokens(torch.zeros(5, dtype=torch.bool), 0.5, gen()).any())


def test_ratio_one_selects_every_candidate() -> None:
    candidates = torch.tensor([True, False, True, True])
    assert torch.equal(select_tokens(candidates, 1.0, gen()), candidates)


def test_same_seed_same_selection_other_seed_differs() -> None:
    candidates = torch.ones(50, dtype=torch.bool)
    for strategy in MaskingStrategy:
        masking = InputMasking(ratio=0.2, strategy=strategy)
        words = torch.arange(50) // 2
        a = select_positions(candidates, masking, gen(1), words)
        b = select_positions(candidates, masking, gen(1), words)
        c = select_positions(candidates, masking, gen(2), words)
        assert torch.equal(a, b), strategy
        assert not torch.equal(a, c), strategy


def test_whole_word_selects_whole_words_only() -> None:
    # words: 0 (3 tokens), 1 (1), 2 (2), 3 (4), -1 for the two specials
    words = torch.tensor([-1, 0, 0, 0, 1, 2, 2, 3, 3, 3, 3, -1])
    candidates = words >= 0
    for seed in range(30):
        selected = select_whole_words(candidates, words, 0.3, gen(seed))
        k = round(0.3 * 10)
        assert int(selected.sum()) >= k
        for w in range(4):
            in_word = selected[words == w]
            assert bool(in_word.all()) or not bool(in_word.any()), (seed, w, selected)
        assert not bool(selected[words < 0].any())
        # it stops as soon as the budget is met: removing the last word picked would fall short
        assert int(selected.sum()) - 4 < k


def test_whole_word_skips_words_partly_outside_candidates() -> None:
    words = torch.tensor([0, 0, 1, 1])
    candidates = torch.tensor([True, False, True, True])  # word 0 is only half a candidate
    for seed in range(10):
        assert torch.equal(
            select_whole_words(candidates, words, 1.0, gen(seed)), torch.tensor([False, False, True, True])
        )


def test_whole_word_needs_word_ids() -> None:
    with pytest.raises(ValueError, match="needs word_ids"):
        select_positions(torch.ones(4, dtype=torch.bool), InputMasking(strategy=MaskingStrategy.WHOLE_WORD), gen())


def test_span_count_is_exact_and_inside_candidates() -> None:
    candidates = torch.ones(40, dtype=torch.bool)
    candidates[[5, 17, 18, 30]] = False
    for seed in range(30):
        selected = select_spans(candidates, 0.25, 3.0, gen(seed))
        assert int(selected.sum()) == round(0.25 * 36)
        assert not bool((selected & ~candidates).any())


def test_span_is_contiguous_and_stops_at_non_candidates() -> None:
    # Mean span far above the budget: a span stops only at the budget, at the end of its candidate block, or
    # at a token already selected (and then merges with it). So at most one run (the last span's, cut by the
    # budget) ends anywhere but at a block end.
    candidates = torch.tensor([True] * 6 + [False] + [True] * 6)
    for seed in range(30):
        selected = select_spans(candidates, 4 / 12, 1e6, gen(seed))
        assert int(selected.sum()) == 4
        assert not bool(selected[6])
        loose_ends = [(s, n) for s, n in runs(selected) if s + n not in (6, 13)]
        assert len(loose_ends) <= 1, (seed, runs(selected))


def test_span_lengths_are_geometric_with_the_given_mean() -> None:
    # A long input and a small ratio: spans rarely touch, so run lengths show the span distribution
    # (clipped at the budget of 30 tokens).
    candidates = torch.ones(2000, dtype=torch.bool)
    lengths = [n for seed in range(40) for _, n in runs(select_spans(candidates, 0.015, 3.0, gen(seed)))]
    mean = sum(lengths) / len(lengths)
    assert 2.5 < mean < 3.6, mean
    assert min(lengths) == 1
    assert max(lengths) > 6


def test_mean_span_one_gives_single_tokens_or_touching_runs() -> None:
    candidates = torch.ones(100, dtype=torch.bool)
    selected = select_spans(candidates, 0.1, 1.0, gen(3))
    assert int(selected.sum()) == 10


def test_replace_prob_one_masks_every_selected() -> None:
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    selected = torch.tensor([[False, True, False, True, True]])
    masked, labels = apply_input_mask(ids, selected, MASK, 50, gen(), replace_prob=1.0, random_prob=0.0)
    assert torch.equal(masked, torch.tensor([[10, MASK, 12, MASK, MASK]]))
    assert torch.equal(labels, torch.tensor([[IGNORE_INDEX, 11, IGNORE_INDEX, 13, 14]]))


def test_random_prob_one_replaces_from_the_given_ids() -> None:
    ids = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17])
    selected = torch.tensor([True, True, False, True, True, True, True, False])
    pool = torch.tensor([3, 4])
    masked, labels = apply_input_mask(
        ids, selected, MASK, 50, gen(), replace_prob=0.0, random_prob=1.0, random_token_ids=pool
    )
    assert torch.equal(masked[~selected], ids[~selected])
    assert set(masked[selected].tolist()) <= {3, 4}
    assert torch.equal(labels, torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX)))


def test_random_prob_one_without_pool_draws_below_vocab_size() -> None:
    ids = torch.full((200,), 1000)
    selected = torch.ones(200, dtype=torch.bool)
    masked, _ = apply_input_mask(ids, selected, MASK, 7, gen(), replace_prob=0.0, random_prob=1.0)
    assert int(masked.max()) < 7
    assert int(masked.min()) >= 0


def test_keep_share_keeps_tokens_but_labels_them() -> None:
    ids = torch.tensor([10, 11, 12])
    selected = torch.tensor([True, False, True])
    masked, labels = apply_input_mask(ids, selected, MASK, 50, gen(), replace_prob=0.0, random_prob=0.0)
    assert torch.equal(masked, ids)
    assert torch.equal(labels, torch.tensor([10, IGNORE_INDEX, 12]))


def test_80_10_10_shares_and_reproducibility() -> None:
    n = 20_000
    ids = torch.full((n,), 1000)
    selected = torch.ones(n, dtype=torch.bool)
    pool = torch.arange(10, 20)
    masked, labels = apply_input_mask(ids, selected, MASK, 50, gen(5), random_token_ids=pool)
    again, _ = apply_input_mask(ids, selected, MASK, 50, gen(5), random_token_ids=pool)
    assert torch.equal(masked, again)
    share_mask = float((masked == MASK).float().mean())
    share_random = float(((masked >= 10) & (masked < 20)).float().mean())
    share_kept = float((masked == 1000).float().mean())
    assert abs(share_mask - 0.8) < 0.015
    assert abs(share_random - 0.1) < 0.01
    assert abs(share_kept - 0.1) < 0.01
    assert torch.equal(labels, ids)


def test_unselected_positions_never_change() -> None:
    ids = torch.arange(30).reshape(3, 10)
    selected = torch.zeros(3, 10, dtype=torch.bool)
    selected[0, 2] = selected[2, 9] = True
    masked, labels = apply_input_mask(ids, selected, MASK, 50, gen(), replace_prob=0.5, random_prob=0.5)
    assert torch.equal(masked[~selected], ids[~selected])
    assert bool((labels[~selected] == IGNORE_INDEX).all())
    assert torch.equal(labels[selected], ids[selected])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, "ratio must be in"),
        ({"ratio": 1.5}, "ratio must be in"),
        ({"replace_prob": 0.9, "random_prob": 0.2}, "sum to at most 1"),
        ({"random_prob": -0.1}, "must be >= 0"),
        ({"mean_span": 0.5}, "mean_span must be >= 1"),
    ],
)
def test_invalid_masking_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InputMasking(**kwargs)  # type: ignore[arg-type]
