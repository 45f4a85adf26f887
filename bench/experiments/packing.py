"""Experiment 2 — packing: does an example see its neighbours when sequences are packed, and does it matter?

Task (built so that leakage across examples can hurt): a chat prompt lists 2-4 facts ("the dog likes the
red ball. a bird finds an apple.") and the response is the object of the *first* fact. In a packed row
without a mask, "first" is ambiguous: the row's first fact belongs to another example.

A small Llama (tiny test tokenizer) is trained from scratch, every variant from the same initialisation,
data order and budget (steps x examples), with the project's SFT objective (service/training/objectives.py,
prompt tokens out of the loss):
- *unpacked*: one example per row, padded (the baseline);
- *packed, block-diagonal mask + position restarts*: the project's packing;
- *packed, block-diagonal mask, positions not restarted*;
- *packed, no mask*: a plain causal mask across the row and running positions (naive packing).
Each trained model is then evaluated on held-out examples alone, and inside packed rows, with and
without the block-diagonal mask: the response loss and exact match, and the largest change of a response
logit between an example run alone and the same example inside a pack.

    python -m bench.experiments.packing            # full run, docs/interference/packing.{md,png}
    python -m bench.experiments.packing --smoke    # seconds
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from bench.experiments.common import (
    Clock,
    Result,
    fmt_pm,
    markdown_table,
    new_figure,
    parse_args,
    publish,
    t_ci,
)
from bench.experiments.training import small_model, train, weighted_loss
from service.masks.attention import causal_mask, padding_mask, position_ids, to_4d
from service.training.data import ChatExample
from service.training.objectives import Batch, Encoded, SftObjective
from tests.tiny import OBJECTS, SUBJECTS, VERBS

NAME = "packing"
PACK_LENGTH = 256


@dataclasses.dataclass
class NaivePacking(SftObjective):
    """Packing as if no one had thought of the mask: the project's rows, targets and loss weights (a
    target never crosses into the next example), but a causal mask across the whole row and running
    position ids, so each example attends to the examples packed before it."""

    restart_positions: bool = False
    block_diagonal: bool = False

    def collate(self, items: list[Encoded], generator: torch.Generator | None = None) -> Batch:
        batch = super().collate(items, generator)
        if self.block_diagonal:  # only the positions change
            return dataclasses.replace(batch, position_ids=position_ids(_row_keys(self, items, batch)))
        key = _row_keys(self, items, batch)  # (B, T)
        width = batch.input_ids.shape[1]
        positions = batch.position_ids if self.restart_positions else position_ids(key)
        return dataclasses.replace(batch, attention_mask=to_4d(key, causal_mask(width)), position_ids=positions)


def _row_keys(obj: SftObjective, items: list[Encoded], batch: Batch) -> Tensor:
    lengths = [sum(len(items[i].ids) for i in row) for row in obj.pack(items)]
    return padding_mask(lengths, batch.input_ids.shape[1])  # (B, T)


def make_examples(n: int, rng: random.Random) -> list[ChatExample]:
    out = []
    for _ in range(n):
        k = rng.randint(2, 4)
        subjects, objects = rng.sample(SUBJECTS, k), rng.sample(OBJECTS, k)
        facts = " ".join(f"{s} {rng.choice(VERBS)} {o}." for s, o in zip(subjects, objects, strict=True))
        out.append(ChatExample([{"role": "user", "content": facts}], objects[0]))
    return out


def slices(obj: SftObjective, items: Sequence[Encoded]) -> list[tuple[int, int, int]]:
    """(row, start, end) of each item in the rows ``obj.collate`` builds."""
    where: list[tuple[int, int, int]] = [(0, 0, 0)] * len(items)
    for r, row in enumerate(obj.pack(list(items))):
        at = 0
        for i in row:
            where[i] = (r, at, at + len(items[i].ids))
            at += len(items[i].ids)
    return where


@torch.no_grad()
def response_logits(model: torch.nn.Module, obj: SftObjective, items: list[Encoded]) -> tuple[list[Tensor], list[bool]]:
    """Each item's logits at its response positions (those with a loss weight) under ``obj``'s rows and
    masks, and whether every response token is the argmax (exact match)."""
    batch = obj.collate(items)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids).logits.float()  # fmt: skip
    out, exact = [], []
    for r, a, b in slices(obj, items):
        sel = batch.weights[r, a:b] > 0
        assert bool(sel.any()), "an example without response tokens (truncated?)"
        lg = logits[r, a:b][sel]  # (n, V)
        out.append(lg)
        exact.append(bool((lg.argmax(-1) == batch.targets[r, a:b][sel]).all()))
    return out, exact


def main(argv: Sequence[str] | None = None) -> Result:
    run = parse_args(NAME, __doc__, argv)
    clock = Clock()
    seeds = [run.seed] if run.smoke else [run.seed + i for i in range(3)]
    n_train, n_val, steps, hidden = (64, 16, 4, 32) if run.smoke else (2000, 200, 300, 64)
    _, tok = small_model("decoder", hidden=hidden, layers=2, seed=0)
    sft = SftObjective(tok, PACK_LENGTH, prompt_weight=0.0)
    variants = {
        # pack_length 1 puts each example in its own row; only collate() reads it (encode() would truncate)
        "unpacked (one example a row, padded)": dataclasses.replace(sft, pack_length=1),
        "packed, block-diagonal + position restarts": sft,
        "packed, block-diagonal, running positions": NaivePacking(tok, PACK_LENGTH, 0.0, block_diagonal=True),
        "packed, no mask (causal across the row)": NaivePacking(tok, PACK_LENGTH, 0.0),
    }
    alone, project_pack, naive_pack = variants["unpacked (one example a row, padded)"], sft, NaivePacking(
        tok, PACK_LENGTH, 0.0)  # fmt: skip

    metrics: dict[str, list[list[float]]] = {v: [] for v in variants}
    curves: dict[str, list[list[float]]] = {v: [] for v in variants}
    for seed in seeds:
        rng = random.Random(seed)
        train_set, val_set = sft.encode(make_examples(n_train, rng)), sft.encode(make_examples(n_val, rng))
        for label, obj in variants.items():
            model, _ = small_model("decoder", hidden=hidden, layers=2, seed=seed)  # same init for every variant
            curves[label].append(train(model, obj.collate, train_set, decoder=True, steps=steps, batch_size=16,
                                       lr=3e-3, seed=seed))  # fmt: skip
            ref, exact_alone = response_logits(model, alone, val_set)
            in_pack, _ = response_logits(model, project_pack, val_set)
            in_naive, exact_naive = response_logits(model, naive_pack, val_set)
            d_pack = max(float((a - b).abs().max()) for a, b in zip(ref, in_pack, strict=True))
            d_naive = max(float((a - b).abs().max()) for a, b in zip(ref, in_naive, strict=True))
            val_loss = weighted_loss(model, alone.collate(val_set), decoder=True)
            metrics[label].append([val_loss, 100 * np.mean(exact_alone), 100 * np.mean(exact_naive), d_pack, d_naive])
            print(f"  seed {seed} {label}: val loss {val_loss:.4f}, exact {100 * np.mean(exact_alone):.1f}% "
                  f"({clock.seconds:.0f} s)", flush=True)  # fmt: skip

    headers = ["training", "val loss, alone", "exact match alone, %", "exact match in a pack without mask, %",
               "max abs Δ logit: pack with mask vs alone", "max abs Δ logit: pack without mask vs alone"]  # fmt: skip
    rows, records = [], []
    for label in variants:
        arr = np.array(metrics[label])  # (seeds, 5)
        cells = [fmt_pm(*t_ci(arr[:, 0]), 4), fmt_pm(*t_ci(arr[:, 1]), 1), fmt_pm(*t_ci(arr[:, 2]), 1),
                 f"{arr[:, 3].max():.1e}", f"{arr[:, 4].mean():.2f}"]  # fmt: skip
        rows.append([label, *cells])
        records.append({"variant": label, "val_loss": float(arr[:, 0].mean()), "exact": float(arr[:, 1].mean()),
                        "d_pack": float(arr[:, 3].max()), "d_naive": float(arr[:, 4].mean())})  # fmt: skip
    table = markdown_table(headers, rows)

    fig, (ax1, ax2) = new_figure(ncols=2, width=6.0, height=4.0)
    for label in variants:
        c = np.array(curves[label]).mean(0)
        window = max(1, len(c) // 20)
        ax1.plot(np.convolve(c, np.ones(window) / window, mode="valid"), label=label)
        m, h = t_ci(np.array(metrics[label])[:, 0])
        tick = label.split(" (")[0].replace("packed, ", "packed,\n")
        ax2.errorbar([tick], [m], yerr=[0 if np.isnan(h) else h], fmt="o", capsize=4)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"training loss (mean of {len(seeds)} seeds, smoothed)")
    ax1.legend(fontsize=7)
    ax2.set_ylabel("held-out response loss, alone (95% CI)")
    ax2.tick_params(axis="x", labelsize=6)
    fig.suptitle("Packing: first-fact task, small Llama from scratch")
    notes = (f"{len(seeds)} seeds (mean ± 95% t-interval; the Δ-logit columns: worst case / mean over seeds); "
             f"{n_train} training and {n_val} held-out examples a seed, {steps} steps of 16 examples, "
             f"a {hidden}-wide 2-layer Llama from scratch, rows of up to {PACK_LENGTH} tokens. Held-out packs "
             "put the validation examples together in the same row order for every model.")  # fmt: skip
    return publish(run, NAME, "Experiment 2 — packing with and without the block-diagonal mask", table, fig,
                   notes=notes, rows=records, clock=clock)  # fmt: skip


if __name__ == "__main__":
    main()
