"""Experiment 4 — input masking ratio for masked language modelling: 15%, 30%, 40% or 60%?

BERT masks 15% of the tokens; Wettig et al. 2023 ("Should You Mask 15% in Masked Language Modeling?")
found 40% better for large models trained long, and less clear for small ones. Here a small BERT (tiny
test tokenizer) is trained from scratch with the project's MLM objective (service/training/objectives.py:
whole-word selection, 80/10/10 replacement, bidirectional attention), the same initialisation, data and
steps for every ratio, and evaluated with the project's cloze scorer (service/training/eval.py, top-1 and
top-5 of a single masked word).

Corpus: each example joins three "subject verb object." sentences in which every subject has its own
object (a seeded one-to-one map, e.g. "the dog" always with "a blue car") and the verb is random, so a
masked object word is predictable from the subject and a masked subject word from the object. Cloze items
come from (subject, verb) pairs held out of training: "the dog watches a blue [MASK]." -> car, and
"the [MASK] watches a blue car." -> dog.

    python -m bench.experiments.masking_ratio            # full run, docs/interference/masking_ratio.{md,png}
    python -m bench.experiments.masking_ratio --smoke    # seconds
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedModel

from bench.experiments.common import Clock, Result, fmt_pm, markdown_table, new_figure, parse_args, publish, t_ci
from bench.experiments.training import small_model, train
from service.config import load_settings
from service.engine.fill.driver import FillDriver
from service.engine.loading import ModelKind
from service.masks.input import InputMasking, MaskingStrategy
from service.training.eval import ClozeItem, EvalMode, evaluate, training_model
from service.training.objectives import MaskedObjective, non_special_ids
from tests.tiny import OBJECTS, SUBJECTS, VERBS

NAME = "masking_ratio"
RATIOS = (0.15, 0.3, 0.4, 0.6)


def make_data(n_train: int, rng: random.Random) -> tuple[list[str], list[ClozeItem]]:
    partner = dict(zip(SUBJECTS, rng.sample(OBJECTS, len(OBJECTS)), strict=True))
    pairs = list(itertools.product(SUBJECTS, VERBS))
    rng.shuffle(pairs)
    held_out, seen = pairs[: len(pairs) // 4], pairs[len(pairs) // 4 :]

    def sentence(subject: str, verb: str) -> str:
        return f"{subject} {verb} {partner[subject]}."

    texts = [" ".join(sentence(*rng.choice(seen)) for _ in range(3)) for _ in range(n_train)]
    cloze = []
    for subject, verb in held_out:
        obj_words, subj_words = partner[subject].split(), subject.split()
        cloze.append(ClozeItem(f"{subject} {verb} {' '.join(obj_words[:-1])} [MASK].".replace("  ", " "),
                               (obj_words[-1],), "object"))  # fmt: skip
        cloze.append(ClozeItem(" ".join([*subj_words[:-1], "[MASK]", verb, partner[subject]]) + ".",
                               (subj_words[-1],), "subject"))  # fmt: skip
    return texts, cloze


def main(argv: Sequence[str] | None = None) -> Result:
    run = parse_args(NAME, __doc__, argv)
    clock = Clock()
    seeds = [run.seed] if run.smoke else [run.seed + i for i in range(3)]
    n_train, steps, every, hidden = (64, 4, 2, 32) if run.smoke else (3000, 800, 100, 128)
    _, tok = small_model("encoder", hidden=hidden, layers=2, seed=0)
    mask_id = int(tok.mask_token_id)
    settings = load_settings(adapter="none")  # the serving limits the evaluator's requests are checked against
    checkpoints = list(range(every, steps + 1, every))

    # ratio -> (seeds, checkpoints, [top-1, top-5]) in %
    curves: dict[float, list[list[list[float]]]] = {r: [] for r in RATIOS}
    for seed in seeds:
        texts, cloze = make_data(n_train, random.Random(seed))
        for ratio in RATIOS:
            model, _ = small_model("encoder", hidden=hidden, layers=2, seed=seed)
            masking = InputMasking(ratio=ratio, strategy=MaskingStrategy.WHOLE_WORD)
            random_ids = non_special_ids(tok, model.config.vocab_size)
            obj = MaskedObjective(tok, masking, mask_id, random_ids, max_length=64, shift=False)
            curve: list[list[float]] = []

            def score(step: int, model: PreTrainedModel = model, curve: list[list[float]] = curve,
                      items: list[ClozeItem] = cloze) -> None:  # fmt: skip
                loaded = training_model(model, tok, ModelKind.ENCODER, str(tok.mask_token), None)
                plain = evaluate(FillDriver(loaded, settings), items, [EvalMode.PLAIN])["plain"]
                assert isinstance(plain, dict)
                curve.append([100 * plain["top1"], 100 * plain["top5"]])

            train(model, obj.collate, obj.encode(list(texts)), decoder=False, steps=steps, batch_size=16, lr=1e-3,
                  seed=seed, every=every, checkpoint=score)  # fmt: skip
            curves[ratio].append(curve)
            print(f"  seed {seed} ratio {ratio:.0%}: cloze top-1 by step {[round(c[0]) for c in curve]} "
                  f"({clock.seconds:.0f} s)", flush=True)  # fmt: skip

    shown = sorted({checkpoints[len(checkpoints) // 4 - 1], checkpoints[len(checkpoints) // 2 - 1],
                    checkpoints[3 * len(checkpoints) // 4 - 1], checkpoints[-1]})  # fmt: skip
    headers = ["masking ratio", *(f"top-1 at step {s}, %" for s in shown), f"top-5 at step {steps}, %",
               "first step with top-1 ≥ 90% (mean)"]  # fmt: skip
    rows, records = [], []
    for ratio in RATIOS:
        arr = np.array(curves[ratio])  # (seeds, checkpoints, 2)
        reached = [next((checkpoints[i] for i, v in enumerate(run_[:, 0]) if v >= 90), float("nan")) for run_ in arr]
        n_reached = sum(not np.isnan(r) for r in reached)
        first = f"{np.nanmean(reached):.0f} ({n_reached}/{len(reached)} seeds)" if n_reached else "never"
        rows.append([f"{ratio:.0%}", *(fmt_pm(*t_ci(arr[:, checkpoints.index(s), 0]), 1) for s in shown),
                     fmt_pm(*t_ci(arr[:, -1, 1]), 1), first])  # fmt: skip
        records.append({"ratio": ratio, "top1_final": float(arr[:, -1, 0].mean()), "first_90": reached})
    table = markdown_table(headers, rows)

    fig, (ax,) = new_figure(width=6.8, height=4.2)
    for ratio in RATIOS:
        arr = np.array(curves[ratio])[:, :, 0]  # (seeds, checkpoints)
        stats = [t_ci(arr[:, i]) for i in range(arr.shape[1])]
        mean = np.array([m for m, _ in stats])
        half = np.array([0 if np.isnan(h) else h for _, h in stats])
        ax.plot(checkpoints, mean, marker="o", label=f"{ratio:.0%} masked")
        ax.fill_between(checkpoints, mean - half, mean + half, alpha=0.15)
    ax.set_xlabel("training step (16 examples each)")
    ax.set_ylabel("held-out cloze top-1, % (mean ± 95% CI)")
    ax.set_ylim(-5, 105)
    ax.legend()
    ax.set_title(f"MLM masking ratio, {hidden}-wide 2-layer BERT from scratch")
    notes = (f"{len(seeds)} seeds (mean ± 95% t-interval); {n_train} training examples (three sentences each), "
             f"{steps} steps of 16, lr 1e-3, a {hidden}-wide 2-layer BERT from scratch, the cloze set scored every "
             f"{every} steps; {len(cloze)} held-out cloze items a seed (one masked word, the project's "
             "evaluator, which runs the server's fill-mask search; plain mode).")  # fmt: skip
    return publish(run, NAME, "Experiment 4 — input masking ratio for MLM", table, fig, notes=notes, rows=records,
                   clock=clock)  # fmt: skip


if __name__ == "__main__":
    main()
