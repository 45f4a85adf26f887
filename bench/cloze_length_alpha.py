"""How the whole-word length penalty changes cloze accuracy: one beam search, several rankings.

    python bench/cloze_length_alpha.py [--adapter DIR|shipped] [--every 4]

Scores whole-word candidates once per item (service/training/eval.py), then ranks them by
``sum log p / n ** alpha`` for each alpha and prints top-1 / top-5 side by side. alpha 1 is the mean
log-probability per sub-token, alpha 0 the joint probability of the word.
"""

from __future__ import annotations

import argparse

from service.config import load_settings
from service.engine.loading import load_model
from service.training.eval import DEFAULT_CLOZE, rank_words, read_cloze, scorer_for

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="shipped")
    parser.add_argument("--every", type=int, default=1, help="score every n-th cloze item (1 = all)")
    args = parser.parse_args()
    items = read_cloze(DEFAULT_CLOZE)[:: args.every]
    scorer = scorer_for(load_model(load_settings(adapter=args.adapter)))
    hits = {a: [0, 0] for a in ALPHAS}
    for item in items:
        candidates = scorer.word_candidates(item.text)
        answers = {a.lower() for a in item.answers}
        for alpha in ALPHAS:
            words = [w for w, _ in rank_words(candidates, alpha)[:5]]
            hits[alpha][0] += bool(words) and words[0] in answers
            hits[alpha][1] += any(w in answers for w in words)
    print(f"adapter {args.adapter}, {len(items)} cloze items (every {args.every})")
    print(f"{'alpha':>6} {'top-1':>7} {'top-5':>7}")
    for alpha in ALPHAS:
        print(f"{alpha:>6.2f} {hits[alpha][0] / len(items):>7.1%} {hits[alpha][1] / len(items):>7.1%}")


if __name__ == "__main__":
    main()
