"""Loss masks: exact targets and weights."""

from __future__ import annotations

import pytest
import torch

from service.masks.input import IGNORE_INDEX as X
from service.masks.loss import next_token_targets, prompt_loss_weights, shift_left, target_weights


def test_shift_left_fills_last_column() -> None:
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert shift_left(x, 0).tolist() == [[2, 3, 0], [5, 6, 0]]


def test_next_token_targets_read_one_position_early() -> None:
    labels = torch.tensor([[X, 7, X, 9]])
    # position 0 predicts the (masked) token at 1; position 2 predicts 3 (MNTP: token i read at i-1)
    assert next_token_targets(labels).tolist() == [[7, X, 9, X]]


def test_next_token_targets_never_cross_a_packed_boundary() -> None:
    labels = torch.tensor([[10, 11, 12, 20, 21, X]])
    segments = torch.tensor([[0, 0, 0, 1, 1, -1]])
    # 12 -> 20 would cross from example 0 into example 1; 21 -> padding is cut too
    assert next_token_targets(labels, segments).tolist() == [[11, 12, X, 21, X, X]]


def test_prompt_loss_weights_exact() -> None:
    targets = torch.tensor([[5, 6, 7, X]])
    is_prompt = torch.tensor([[True, True, False, False]])
    assert prompt_loss_weights(targets, is_prompt, 0.0).tolist() == [[0.0, 0.0, 1.0, 0.0]]
    assert prompt_loss_weights(targets, is_prompt, 0.25).tolist() == [[0.25, 0.25, 1.0, 0.0]]
    assert prompt_loss_weights(targets, is_prompt, 1.0).tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_prompt_loss_weight_out_of_range() -> None:
    with pytest.raises(ValueError, match="prompt_weight"):
        prompt_loss_weights(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), 1.5)


def test_target_weights() -> None:
    assert target_weights(torch.tensor([[X, 3, X]])).tolist() == [[0.0, 1.0, 0.0]]
