"""Experiment 1 — padding: does batching change a model's answer, with and without a padding mask?

Batches of sentences of mixed lengths go through the bundled SmolLM2-135M-Instruct padded to the longest,
on the left and on the right, with and without the padding mask (and, for left padding, with and without
shifting position ids past the padding). Every real token's next-token distribution is compared with the
same sentence run alone, unpadded: the largest logit and probability differences, and how often the top-1
token changes. Masks come from service/masks/attention.py, as in the engine.

    python -m bench.experiments.padding            # full run, writes docs/interference/padding.{md,png}
    python -m bench.experiments.padding --smoke    # tiny model, seconds
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bench.experiments.common import (
    Clock,
    Result,
    RunArgs,
    fmt_pm,
    fmt_sci,
    load_decoder,
    markdown_table,
    mean_std,
    new_figure,
    parse_args,
    publish,
    seed_all,
    t_ci,
)
from service.masks.attention import PaddingSide, causal_mask, padding_mask, position_ids, to_4d

NAME = "padding"
# Everyday sentences; a text joins 1-4 of them, so lengths in a batch range from ~8 to ~70 tokens.
SENTENCES = [
    "The train to the coast leaves at seven in the morning.",
    "She planted tomatoes, beans and a row of sunflowers behind the house.",
    "Water boils at a lower temperature on a high mountain.",
    "Our teacher asked us to read two chapters before Friday.",
    "The bakery on the corner sells fresh bread until noon.",
    "He forgot his umbrella and walked home in the rain.",
    "A triangle has three sides and three angles.",
    "The museum is closed on Mondays.",
    "My grandmother keeps her recipes in a small blue notebook.",
    "Bees carry pollen from one flower to the next.",
    "The meeting was moved to the large room on the second floor.",
    "Please turn off the lights when you leave.",
    "The river froze early this winter, so the children went skating.",
    "Seven plus five equals twelve.",
    "The old bridge was repaired last summer after the flood.",
    "Cats sleep for most of the day.",
    "The library lends books, films and even tools.",
    "He added a pinch of salt to the soup and tasted it again.",
    "The moon looked huge as it rose over the hills.",
    "Remember to water the plants while I am away.",
    "The store opens at nine.",
    "Our flight was delayed by two hours because of fog.",
    "Metal expands when it is heated.",
    "She wrote the answer on the board and underlined it twice.",
]


@dataclass(frozen=True)
class Variant:
    label: str
    side: PaddingSide
    masked: bool  # pass the padding mask
    shift_positions: bool  # positions count real tokens only (matters for left padding)


VARIANTS = (
    Variant("left, no mask", "left", masked=False, shift_positions=False),
    Variant("left, mask, positions not shifted", "left", masked=True, shift_positions=False),
    Variant("left, mask + shifted positions", "left", masked=True, shift_positions=True),
    Variant("right, no mask", "right", masked=False, shift_positions=False),
    Variant("right, mask", "right", masked=True, shift_positions=True),
)


def make_texts(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.sample(SENTENCES, k=rng.randint(1, 4))) for _ in range(n)]


@torch.inference_mode()
def alone(model: torch.nn.Module, ids: Sequence[int]) -> Tensor:
    """Logits of one sequence run by itself.  # -> (T, V)"""
    x = torch.tensor([list(ids)])  # (1, T)
    return model(input_ids=x, position_ids=torch.arange(len(ids))[None]).logits[0].float()


@torch.inference_mode()
def batched(model: torch.nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, v: Variant) -> list[Tensor]:
    """Logits of each sequence's real tokens when run padded in one batch.  # -> [(T_i, V)]"""
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    rows = [([pad_id] * (width - len(s)) + list(s)) if v.side == "left" else (list(s) + [pad_id] * (width - len(s)))
            for s in seqs]  # fmt: skip
    real = padding_mask(lengths, width, side=v.side)  # (B, S) True = real token
    keys = real if v.masked else torch.ones_like(real)  # without the mask, padding is attended like text
    mask = to_4d(keys, causal_mask(width))  # (B, 1, T, S)
    pos = position_ids(real) if v.shift_positions else torch.arange(width).expand(len(seqs), width)  # (B, T)
    logits = model(input_ids=torch.tensor(rows), attention_mask=mask, position_ids=pos).logits.float()  # (B, T, V)
    return [logits[i][real[i]] for i in range(len(seqs))]


def compare(ref: Tensor, got: Tensor) -> tuple[float, float, float]:
    """Largest |Δ logit|, largest |Δ probability| and the share of positions whose top-1 token is unchanged."""
    d_logit = float((got - ref).abs().max())
    d_prob = float((got.softmax(-1) - ref.softmax(-1)).abs().max())
    same_top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return d_logit, d_prob, same_top1


def main(argv: Sequence[str] | None = None) -> Result:
    run: RunArgs = parse_args(NAME, __doc__, argv)
    clock = Clock()
    seed_all(run.seed)
    n_batches, batch_size = (3, 4) if run.smoke else (20, 6)
    loaded = load_decoder(run.smoke)
    model, tok = loaded.generation_model, loaded.tokenizer
    assert model is not None
    assert tok.pad_token_id is not None
    rng = random.Random(run.seed)

    # per variant: one (max Δlogit, max Δprob, top-1 agreement) per batch, over all real tokens of the batch
    per_batch: dict[str, list[tuple[float, float, float]]] = {v.label: [] for v in VARIANTS}
    lengths_seen: list[int] = []
    for _ in range(n_batches):
        seqs = [tok(t).input_ids for t in make_texts(batch_size, rng)]
        lengths_seen += [len(s) for s in seqs]
        refs = [alone(model, s) for s in seqs]
        for v in VARIANTS:
            outs = batched(model, seqs, tok.pad_token_id, v)
            ref_all, out_all = torch.cat(refs), torch.cat(outs)  # (N, V) every real token of the batch
            per_batch[v.label].append(compare(ref_all, out_all))
        print(f"  batch {len(per_batch[VARIANTS[0].label])}/{n_batches} ({clock.seconds:.0f} s)", flush=True)

    headers = ["padding", "max abs Δ logit (mean ± std over batches)", "worst batch",
               "max abs Δ prob (mean ± std)", "worst batch", "top-1 unchanged, % (mean ± 95% CI)"]  # fmt: skip
    rows, records = [], []
    for v in VARIANTS:
        arr = np.array(per_batch[v.label])  # (batches, 3)
        dl, dp, top1 = arr[:, 0], arr[:, 1], arr[:, 2] * 100
        m_dl, s_dl = mean_std(dl)
        m_dp, s_dp = mean_std(dp)
        m_t, h_t = t_ci(top1)
        rows.append([v.label, f"{fmt_sci(m_dl)} ± {fmt_sci(s_dl)}", fmt_sci(dl.max()),
                     f"{fmt_sci(m_dp)} ± {fmt_sci(s_dp)}", fmt_sci(dp.max()), fmt_pm(m_t, h_t, 2)])  # fmt: skip
        records.append({"variant": v.label, "max_dlogit": float(dl.max()), "max_dprob": float(dp.max()),
                        "top1_same_pct": m_t})  # fmt: skip
    table = markdown_table(headers, rows)

    fig, (ax,) = new_figure(width=8.0, height=4.2)
    for i, v in enumerate(VARIANTS):
        ys = np.maximum(np.array(per_batch[v.label])[:, 1], 1e-9)  # log scale: keep exact zeros visible
        ax.scatter(np.full(len(ys), i) + np.linspace(-0.15, 0.15, len(ys)), ys, s=14, alpha=0.7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(VARIANTS)), [v.label.replace(", ", ",\n") for v in VARIANTS], fontsize=8)
    ax.set_ylabel("max |Δ probability| vs. unbatched (per batch)")
    ax.set_title(f"Padding: {n_batches} batches of {batch_size} sentences, {loaded.name}")
    notes = (f"{n_batches} batches of {batch_size} texts ({min(lengths_seen)}–{max(lengths_seen)} tokens, "
             f"median {int(np.median(lengths_seen))}), model {loaded.name} ({loaded.dtype}); every real token's "
             "next-token distribution compared with the same text run alone.")  # fmt: skip
    return publish(run, NAME, "Experiment 1 — padding masks and batched inference", table, fig,
                   notes=notes, rows=records, clock=clock)  # fmt: skip


if __name__ == "__main__":
    main()
