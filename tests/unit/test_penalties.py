"""OpenAI's frequency and presence penalties on a small logit vector, against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from service.engine.generate import penalize_frequency_presence


def test_penalties_match_the_formula_by_hand() -> None:
    row = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0])
    # token 1 generated three times, token 4 once: c = [0, 3, 0, 0, 1]
    penalize_frequency_presence(row, [1, 4, 1, 1], frequency=0.5, presence=0.25)
    # 2.0 - 3 * 0.5 - 0.25 = 0.25;  3.0 - 1 * 0.5 - 0.25 = 2.25; the others untouched
    assert row.tolist() == [1.0, 0.25, -1.0, 0.5, 2.25]


@pytest.mark.parametrize(("frequency", "presence", "expected"), [
    (0.0, 1.0, [0.0, -1.0, -1.0]),  # presence: once per seen token, however often
    (1.0, 0.0, [0.0, -2.0, -1.0]),  # frequency: once per occurrence
    (-0.5, -0.5, [0.0, 1.5, 1.0]),  # negative values encourage repeats
])  # fmt: skip
def test_each_penalty_alone(frequency: float, presence: float, expected: list[float]) -> None:
    row = torch.zeros(3)
    penalize_frequency_presence(row, [1, 2, 1], frequency=frequency, presence=presence)
    assert row.tolist() == expected
