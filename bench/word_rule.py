"""What the whole-word rule (service/engine/lexicon.py) would remove, from an evaluation's saved predictions.

    maskserve eval fill-mask --mode whole_word --json preds.json     # the engine's top 5 of every item
    python bench/word_rule.py preds.json [--show 100]

The evaluator scores with the engine's search, which does not apply the rule (yet): every candidate of every
item's top 5 is a sample of what the search offers; the table counts those the rule would remove, and among
them the accepted cloze answers (wrongly removed). ``--show`` prints that many removed candidates, to judge by
eye which were words.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.engine.lexicon import is_word


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preds", type=Path)
    parser.add_argument("--show", type=int, default=100)
    args = parser.parse_args()
    rows = json.loads(args.preds.read_text())["whole_word"]["items"]
    seen = removed = answers_removed = 0
    shown: list[str] = []
    for row in rows:
        answers = {a.lower() for a in row["answers"]}
        for cand in row["predictions"]:
            seen += 1
            if is_word(cand) or is_word(cand.capitalize()):  # a sentence-initial fill may be capitalised
                continue
            removed += 1
            answers_removed += cand.lower() in answers
            shown.append(f"{cand!r} ({row['text']})")
    print(f"{len(rows)} items, {seen} candidates in the top 5")
    print(f"{'removed':>8} {'share':>7} {'accepted answers among them':>28}")
    print(f"{removed:>8} {removed / max(1, seen):>7.1%} {answers_removed:>28}")
    for line in shown[: args.show]:
        print("  " + line)


if __name__ == "__main__":
    main()
