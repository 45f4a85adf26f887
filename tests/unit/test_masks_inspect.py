from __future__ import annotations

import torch

from service.masks.attention import causal_mask
from service.masks.constraints import AttentionConstraints, TokenSpan, constrained_structure
from service.masks.inspect import dense_rows, render_heatmap_png, run_length_rows


def test_run_length_rows_exact() -> None:
    mask = constrained_structure(5, AttentionConstraints(exclude=(TokenSpan(1, 3),)))
    assert run_length_rows(mask) == [[[0, 1]], [[0, 2]], [[0, 3]], [[0, 1], [3, 4]], [[0, 1], [3, 5]]]
    assert run_length_rows(torch.zeros(1, 3, dtype=torch.bool)) == [[]]


def test_run_length_round_trip() -> None:
    mask = torch.rand(7, 9, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(dense_rows(run_length_rows(mask), 9), mask)


def test_heatmap_is_a_png() -> None:
    png = render_heatmap_png(causal_mask(4), query_labels=list("abcd"), key_labels=list("abcd"), title="causal")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 1000
