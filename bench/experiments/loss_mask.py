"""Experiment 3 — loss masks in SFT: should prompt tokens count in the loss (weight 0, 0.1 or 1)?

The usual recipe masks the prompt out of the loss (weight 0); Shi et al. 2024 ("Instruction Tuning With
Loss Over Instructions") found that keeping it can help, most when prompts are long, responses short and
training data scarce. This run sits in that regime on purpose, and reports what it measures.

Task: a chat prompt holds one or two sentences ("the dog sees the red ball. a farmer paints the old
house.") and a question word — "who", "what" or "does" — about the last sentence; the response is its
subject, object or verb. Held-out prompts are sentences (subject-verb-object triples) never seen in
training. A small Llama (tiny test tokenizer) is trained from scratch with the project's SFT objective
(service/training/objectives.py, packed with the block-diagonal mask), the same initialisation, data and
steps for every weight; only ``prompt_weight`` changes.

    python -m bench.experiments.loss_mask            # full run, docs/interference/loss_mask.{md,png}
    python -m bench.experiments.loss_mask --smoke    # seconds
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Sequence

import numpy as np

from bench.experiments.common import Clock, Result, fmt_pm, markdown_table, new_figure, parse_args, publish, t_ci
from bench.experiments.packing import response_logits
from bench.experiments.training import small_model, train, weighted_loss
from service.training.data import ChatExample
from service.training.objectives import SftObjective
from tests.tiny import OBJECTS, SUBJECTS, VERBS

NAME = "loss_mask"
WEIGHTS = (0.0, 0.1, 1.0)
QUESTIONS = {"who": 0, "does": 1, "what": 2}  # question word -> which part of the sentence answers it


def make_split(n_train: int, n_test: int, rng: random.Random) -> tuple[list[ChatExample], list[ChatExample]]:
    """Train and test examples whose asked sentences never share a subject-verb-object triple."""
    triples = list(itertools.product(SUBJECTS, VERBS, OBJECTS))
    rng.shuffle(triples)
    cut = len(triples) * 3 // 4
    pools = triples[:cut], triples[cut:]

    def example(pool: list[tuple[str, str, str]]) -> ChatExample:
        asked = rng.choice(pool)
        context = [" ".join(rng.choice(triples)) + "."] if rng.random() < 0.5 else []
        word = rng.choice(sorted(QUESTIONS))
        prompt = " ".join([*context, " ".join(asked) + ".", f"{word}?"])
        return ChatExample([{"role": "user", "content": prompt}], asked[QUESTIONS[word]])

    return [example(pools[0]) for _ in range(n_train)], [example(pools[1]) for _ in range(n_test)]


def main(argv: Sequence[str] | None = None) -> Result:
    run = parse_args(NAME, __doc__, argv)
    clock = Clock()
    seeds = [run.seed] if run.smoke else [run.seed + i for i in range(3)]
    n_train, n_test, steps, hidden = (48, 16, 4, 32) if run.smoke else (300, 300, 300, 64)
    _, tok = small_model("decoder", hidden=hidden, layers=2, seed=0)

    results: dict[float, list[list[float]]] = {w: [] for w in WEIGHTS}
    curves: dict[float, list[list[float]]] = {w: [] for w in WEIGHTS}
    for seed in seeds:
        train_ex, test_ex = make_split(n_train, n_test, random.Random(seed))
        for weight in WEIGHTS:
            obj = SftObjective(tok, 256, prompt_weight=weight)
            data = obj.encode(train_ex)
            model, _ = small_model("decoder", hidden=hidden, layers=2, seed=seed)
            curves[weight].append(train(model, obj.collate, data, decoder=True, steps=steps, batch_size=16,
                                        lr=3e-3, seed=seed))  # fmt: skip
            # evaluation always scores the response only (weight 0), one example a row
            scorer = SftObjective(tok, 256, prompt_weight=0.0)
            judge = dataclasses.replace(scorer, pack_length=1)  # collate only: encode() truncates to pack_length
            test = scorer.encode(test_ex)
            _, exact = response_logits(model, judge, test)
            _, exact_train = response_logits(model, judge, scorer.encode(train_ex))
            loss = weighted_loss(model, judge.collate(test), decoder=True)
            results[weight].append([100 * float(np.mean(exact)), loss, 100 * float(np.mean(exact_train))])
            print(f"  seed {seed} prompt weight {weight}: held-out exact {100 * np.mean(exact):.1f}%, "
                  f"loss {loss:.3f} ({clock.seconds:.0f} s)", flush=True)  # fmt: skip

    headers = ["prompt-loss weight", "held-out exact match, %", "held-out response loss",
               "training-set exact match, %"]  # fmt: skip
    rows, records = [], []
    for weight in WEIGHTS:
        arr = np.array(results[weight])  # (seeds, 3)
        rows.append([f"{weight:g}", fmt_pm(*t_ci(arr[:, 0]), 1), fmt_pm(*t_ci(arr[:, 1]), 3),
                     fmt_pm(*t_ci(arr[:, 2]), 1)])  # fmt: skip
        records.append({"weight": weight, "exact": float(arr[:, 0].mean()), "loss": float(arr[:, 1].mean())})
    table = markdown_table(headers, rows)

    fig, (ax,) = new_figure(width=6.4, height=4.0)
    for i, weight in enumerate(WEIGHTS):
        arr = np.array(results[weight])[:, 0]
        ax.scatter(np.full(len(arr), i), arr, alpha=0.6)
        m, h = t_ci(arr)
        ax.errorbar([i + 0.15], [m], yerr=[0 if np.isnan(h) else h], fmt="s", capsize=4, color="black")
    ax.set_xticks(range(len(WEIGHTS)), [f"weight {w:g}" for w in WEIGHTS])
    ax.set_ylabel("held-out exact match, % (seeds; mean ± 95% CI)")
    ax.set_title("Prompt-loss weight in SFT, small Llama from scratch")
    notes = (f"{len(seeds)} seeds (mean ± 95% t-interval); {n_train} training and {n_test} held-out examples a "
             f"seed, {steps} steps of 16 examples (about {steps * 16 // max(1, n_train)} epochs), a {hidden}-wide "
             "2-layer Llama from scratch; exact match = every response token is the argmax, "
             "teacher-forced.")  # fmt: skip
    return publish(run, NAME, "Experiment 3 — prompt-loss weight in SFT", table, fig, notes=notes, rows=records,
                   clock=clock)  # fmt: skip


if __name__ == "__main__":
    main()
