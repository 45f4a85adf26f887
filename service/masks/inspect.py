"""Masks as data and as pictures, for ``/v1/masks`` and ``return_masks``.

- :func:`run_length_rows` encodes a (T, S) bool mask as the allowed key ranges of each query row —
  compact for the block structures masks have (causal, excluded spans, segments);
- :func:`render_heatmap_png` draws a mask (or attention weights) with token labels: the emphasis bias as a
  colour scale, excluded / isolated / emphasized tokens marked on both axes, a legend;
- :func:`render_output_steps_png` draws what the output masks did at each decode step.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
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


# The heatmap's axes sit at a fixed place in the figure (fractions of its width and height: left, bottom,
# width, height), so that a cell's pixel is known from the picture's size alone (see :func:`cell_centre`).
HEATMAP_BOX = (0.2, 0.2, 0.58, 0.6)
COLORBAR_BOX = (0.82, 0.2, 0.03, 0.6)
# How the tokens of each attention constraint are marked on both axes (and named in the legend).
MARK_COLOURS = {"exclude": "#d62728", "isolate": "#1f77b4", "emphasis": "#ff7f0e"}
MARK_NAMES = {"exclude": "excluded", "isolate": "isolated", "emphasis": "emphasized"}


def cell_centre(width: int, height: int, row: int, col: int, n_rows: int, n_cols: int) -> tuple[int, int]:
    """The pixel (x, y) at the centre of cell (row, col) of a ``width`` x ``height`` heatmap PNG."""
    left, bottom, w, h = HEATMAP_BOX
    x = (left + w * (col + 0.5) / n_cols) * width
    y = (1 - bottom - h + h * (row + 0.5) / n_rows) * height
    return int(x), int(y)


def render_heatmap_png(
    values: Tensor,
    *,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    title: str = "",
    colorbar_label: str = "",
    key_bias: Sequence[float] | None = None,
    marks: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> bytes:
    """Draw a (T, S) bool mask or float matrix (e.g. head-averaged attention) as a PNG.

    A bool mask alone: attend = dark, blocked = white. With ``key_bias`` (S,) (the additive emphasis bias on
    each key), the keys a query may attend are coloured by their bias on a colour scale, blocked ones stay
    white. ``marks``: token spans ``[start, end)`` per constraint kind (``exclude``, ``isolate``,
    ``emphasis``), drawn as coloured bars along both axes. A legend names what each colour means.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in server threads
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    data = values.detach().float().cpu().numpy()
    t, s = data.shape
    is_mask = values.dtype == torch.bool
    biased = is_mask and key_bias is not None and any(b != 0 for b in key_bias)
    size = min(12.0, max(5.0, 0.22 * max(t, s) + 3))
    fig = plt.figure(figsize=(size, size))
    ax = fig.add_axes(HEATMAP_BOX)
    try:
        legend: list[Patch] = []
        if biased:
            assert key_bias is not None
            bias = np.broadcast_to(np.asarray(key_bias, dtype=np.float64)[None, :], (t, s))  # (T, S)
            shown = np.ma.masked_where(data == 0, bias)  # blocked cells masked: drawn white
            cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
            # emphasis lowers the other keys (bias -log factor) or raises the emphasized ones: both ends shown
            lo, hi = float(bias.min()), float(bias.max())
            image = ax.imshow(shown, cmap=cmap, aspect="auto", interpolation="nearest", vmin=lo, vmax=hi)
            fig.colorbar(image, cax=fig.add_axes(COLORBAR_BOX), label="additive key bias (emphasis), where attended")
            legend.append(Patch(facecolor=cmap(0.0), edgecolor="grey", label=f"may attend, bias {lo:.3g}"))
            legend.append(Patch(facecolor=cmap(1.0), edgecolor="grey", label=f"may attend, bias {hi:.3g}"))
        elif is_mask:
            ax.imshow(data, cmap="Greys", aspect="auto", interpolation="nearest", vmin=0, vmax=1)
            legend.append(Patch(facecolor="black", label="may attend"))
        else:
            image = ax.imshow(data, cmap="viridis", aspect="auto", interpolation="nearest", vmin=0)
            fig.colorbar(image, cax=fig.add_axes(COLORBAR_BOX), label=colorbar_label)
        if is_mask:
            legend.append(Patch(facecolor="white", edgecolor="grey", label="blocked"))
        # marks: a bar above the columns and left of the rows of every constrained token
        depth_x, depth_y = 0.025 * t, 0.025 * s  # bar thickness in data units (2.5% of the axes)
        for kind, spans in (marks or {}).items():
            colour = MARK_COLOURS.get(kind, "black")
            if not spans:
                continue
            legend.append(Patch(facecolor=colour, label=f"{MARK_NAMES.get(kind, kind)} tokens (axes)"))
            for start, end in spans:
                ax.add_patch(Rectangle((start - 0.5, -0.5 - depth_x), end - start, depth_x, color=colour,
                                       clip_on=False))  # fmt: skip
                ax.add_patch(Rectangle((-0.5 - depth_y, start - 0.5), depth_y, end - start, color=colour,
                                       clip_on=False))  # fmt: skip
        ax.set_xlim(-0.5, s - 0.5)
        ax.set_ylim(t - 0.5, -0.5)
        coloured = {i: MARK_COLOURS.get(kind, "black") for kind, spans in (marks or {}).items()
                    for a, b in spans for i in range(a, b)}  # fmt: skip
        for labels, set_ticks, set_labels, n, ticks in (
            (key_labels, ax.set_xticks, ax.set_xticklabels, s, ax.get_xticklabels),
            (query_labels, ax.set_yticks, ax.set_yticklabels, t, ax.get_yticklabels),
        ):
            if labels is not None and n <= MAX_LABELLED_TOKENS:
                set_ticks(range(n))
                set_labels([repr(x)[1:-1] for x in labels], fontsize=7)
                for i, label in enumerate(ticks()):
                    if i in coloured:
                        label.set_color(coloured[i])
        plt.setp(ax.get_xticklabels(), rotation=90)
        ax.set_xlabel("key (attended) position")
        ax.set_ylabel("query position")
        fig.suptitle(title, fontsize=10)
        if legend:
            fig.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.93), ncol=min(3, len(legend)),
                       fontsize=7, frameon=False)  # fmt: skip
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()
    finally:
        plt.close(fig)


def render_output_steps_png(steps: Sequence[Mapping[str, Any]], *, title: str = "") -> bytes:
    """Per decode step of a generation, what the output masks did: the tokens they left allowed (log scale)
    and the probability mass they removed (under the unmasked distribution), chosen tokens on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(steps)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(min(14.0, max(6.0, 0.3 * n + 3)), 6.0))
    try:
        x = np.arange(n)
        allowed = [st["allowed"] for st in steps]
        top.bar(x, allowed, color="tab:green")
        if max(allowed) > 10 * max(1, min(allowed)):  # a grammar's 1 token beside a whole vocabulary
            top.set_yscale("log")
        top.set_ylabel("tokens allowed")
        bottom.bar(x, [100 * st["removed_mass"] for st in steps], color="tab:red")
        bottom.set_ylim(0, 100)
        bottom.set_ylabel("probability removed, %")
        bottom.set_xlabel("decode step (chosen token)")
        if n <= MAX_LABELLED_TOKENS:
            bottom.set_xticks(x, [f"{st['step']} {repr(st.get('token', ''))[1:-1]}" for st in steps], fontsize=7,
                              rotation=90)  # fmt: skip
        top.set_title(title, fontsize=10)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()
    finally:
        plt.close(fig)
