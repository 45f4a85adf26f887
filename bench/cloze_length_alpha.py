"""How the whole-word length normalisation changes cloze accuracy: one search, several rankings.

    python bench/cloze_length_alpha.py [--adapter DIR|shipped] [--every 4] [--pool 20]

The engine ranks whole-word fills by the geometric mean of their sub-token probabilities, ``sum log p / n``
(alpha 1; service/engine/fill/search.py). This asks for each item's best ``--pool`` fills through the
evaluator (service/training/eval.py: the server's search, ``top_k = pool``, so a beam of ``pool``), then
re-ranks that pool by ``sum log p / n ** alpha`` for each alpha and prints top-1 / top-5 side by side;
alpha 0 is the joint probability of the word. alpha 1 is the engine's own order (but from a wider beam
than a top_k-5 request's); the other rows only see fills the geometric mean put in the pool.
"""

from __future__ import annotations

import argparse
import math

from service.config import load_settings
from service.engine.fill.driver import FillDriver
from service.engine.fill.job import FillCandidate
from service.engine.loading import load_model
from service.training.eval import DEFAULT_CLOZE, EvalMode, answer_text, predict, read_cloze

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def rerank(pool: list[FillCandidate], alpha: float) -> list[str]:
    """The pool's words (lower case, each once) by ``sum log p / n ** alpha``, best first."""

    def key(c: FillCandidate) -> float:
        n = len(c.pieces)
        return n * math.log(c.score) / n**alpha  # the engine's score is exp(sum log p / n)

    return list(dict.fromkeys(answer_text(c).lower() for c in sorted(pool, key=key, reverse=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="shipped")
    parser.add_argument("--every", type=int, default=1, help="score every n-th cloze item (1 = all)")
    parser.add_argument("--pool", type=int, default=20, help="fills asked for per item (top_k), re-ranked")
    args = parser.parse_args()
    items = read_cloze(DEFAULT_CLOZE)[:: args.every]
    settings = load_settings(adapter=args.adapter)
    driver = FillDriver(load_model(settings), settings)
    hits = {a: [0, 0] for a in ALPHAS}
    for item, pool in zip(items, predict(driver, items, EvalMode.WHOLE_WORD, top_k=args.pool), strict=True):
        answers = {a.lower() for a in item.answers}
        for alpha in ALPHAS:
            words = rerank(pool, alpha)[:5]
            hits[alpha][0] += bool(words) and words[0] in answers
            hits[alpha][1] += any(w in answers for w in words)
    print(f"adapter {args.adapter}, {len(items)} cloze items (every {args.every}), pools of {args.pool}")
    print(f"{'alpha':>6} {'top-1':>7} {'top-5':>7}")
    for alpha in ALPHAS:
        print(f"{alpha:>6.2f} {hits[alpha][0] / len(items):>7.1%} {hits[alpha][1] / len(items):>7.1%}")


if __name__ == "__main__":
    main()
