"""Masks as data and as pictures, for ``/v1/masks`` and ``return_masks``.

- :func:`run_length_rows` encodes a (T, S) bool mask as the allowed key ranges of each query row —
  compact for the block structures masks have (causal, excluded spans, segments);
- :func:`render_heatmap_png` draws a mask (or attention weights) with token labels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from torch import Tensor

MAX_LABELLED_TOKENS = 64  # beyond this, tick labels would overlap


def run_length_rows(mask: Tensor) -> list[list[list[int]]]:
    """(T, S) bool -> per query row, the half-open ranges ``[start, end)`` of keys it may attend to."""
    if mask.dim() != 2:
        raise ValueError("expected a (T, S) mask")
    padded = torch.nn.functional.pad(mask.to(torch.int8), (1, 1))  # (T, S + 2): a closed border on both sides
    edges = padded[:, 1:] - padded[:, :-1]  # (T, S + 1): +1 where a run starts, -1 one past where it ends
    rows: list[list[list[int]]] = []
    for row in edges:
        starts = (row == 1).nonzero().flatten().tolist()
        ends = (row == -1).nonzero().flatten().tolist()
        rows.append([[s, e] for s, e in zip(starts, ends, strict=True)])
    return rows


def dense_rows(rows: Sequence[Sequence[Sequence[int]]], n_keys: int) -> Tensor:
    """Inverse of :func:`run_length_rows`.  -> (T, S) bool"""
    mask = torch.zeros(len(rows), n_keys, dtype=torch.bool)
    for t, ranges in enumerate(rows):
        for start, end in ranges:
            mask[t, start:end] = True
    return mask


def render_heatmap_png(
    values: Tensor,
    *,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    title: str = "",
    colorbar_label: str = "",
) -> bytes:
    """Draw a (T, S) bool mask (attend = dark) or float matrix (e.g. head-averaged attention) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in server threads
    import matplotlib.pyplot as plt

    data = values.detach().float().cpu().numpy()
    t, s = data.shape
    size = min(12.0, max(4.0, 0.22 * max(t, s) + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        image = ax.imshow(data, cmap="Greys" if values.dtype == torch.bool else "viridis", aspect="auto",
                          interpolation="nearest", vmin=0)  # fmt: skip
        if values.dtype != torch.bool:
            fig.colorbar(image, ax=ax, label=colorbar_label)
        for labels, set_ticks, set_labels, n in (
            (key_labels, ax.set_xticks, ax.set_xticklabels, s),
            (query_labels, ax.set_yticks, ax.set_yticklabels, t),
        ):
            if labels is not None and n <= MAX_LABELLED_TOKENS:
                set_ticks(range(n))
                set_labels([repr(x)[1:-1] for x in labels], fontsize=7)
        plt.setp(ax.get_xticklabels(), rotation=90)
        ax.set_xlabel("key (attended) position")
        ax.set_ylabel("query position")
        ax.set_title(title)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()
    finally:
        plt.close(fig)
