"""The worked example of docs/masks.md: a conflicting passage, the answer with and without masking it.

    .venv/bin/python bench/attention_example.py        # bundled SmolLM2-135M-Instruct, greedy

Prints the answers side by side, then fill-mask answers with a distracting first sentence read and excluded
(the shipped MNTP adapter), then where the last prompt token's attention goes (its weights averaged
over heads and layers, from the dry run's ``attention_weights``), and writes docs/img/attention-example.png
(the attention mask of the request that excludes the stale note), docs/img/attention-example.json (its
inspection report, shortened) and docs/img/attention-weights-example.png (the weights under that mask).
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import load_settings

CONTENT = (
    "The team meeting was moved to Thursday. An old note says: the team meeting is on Monday. "
    "On which day is the team meeting? Answer with the day only."
)
STALE = "An old note says: the team meeting is on Monday."
CURRENT = "The team meeting was moved to Thursday."
OUT = Path(__file__).resolve().parent.parent / "docs" / "img"


def span(text: str) -> dict[str, int]:
    start = CONTENT.index(text)
    return {"start": start, "end": start + len(text), "message": 0}


def main() -> None:
    cases = {
        "no mask": None,
        "exclude the stale note": {"exclude": [span(STALE)]},
        "exclude the update": {"exclude": [span(CURRENT)]},
        "isolate the two passages": {"isolate": {"segments": [span(CURRENT), span(STALE)]}},
        "emphasis on the update (x5)": {"emphasis": {"spans": [span(CURRENT)], "factor": 5}},
        "emphasis x5, layers 0-9 only": {
            "emphasis": {"spans": [span(CURRENT)], "factor": 5, "layers": list(range(10))}
        },
    }
    with TestClient(create_app(load_settings(adapter="none"))) as client:
        print(f"{'attention':32} answer")
        for name, attention in cases.items():
            body: dict[str, object] = {"messages": [{"role": "user", "content": CONTENT}], "max_new_tokens": 10}
            if attention:
                body["attention"] = attention
            r = client.post("/v1/generate", json=body)
            r.raise_for_status()
            print(f"{name:32} {r.json()['generated_text']!r}")
        print("\nthe last prompt token's attention weight on each passage (mean over heads and layers):")
        print(f"{'attention':32} {'update':>8} {'stale note':>11}")
        for name, attention in cases.items():
            request = {
                "messages": [{"role": "user", "content": CONTENT}],
                **({"attention": attention} if attention else {}),
            }
            report = client.post(
                "/v1/masks", json={"endpoint": "generate", "request": request, "attention_weights": True}
            ).json()
            last = report["attention_weights"]["values"][-1]  # the query that produces the first answer token
            share = [sum(last[i] for i in token_range(report, text)) for text in (CURRENT, STALE)]
            print(f"{name:32} {share[0]:8.3f} {share[1]:11.3f}")
        request = {"messages": [{"role": "user", "content": CONTENT}], "attention": cases["exclude the stale note"]}
        OUT.mkdir(parents=True, exist_ok=True)
        png = client.post("/v1/masks?format=png", json={"endpoint": "generate", "request": request})
        (OUT / "attention-example.png").write_bytes(png.content)
        report = client.post("/v1/masks", json={"endpoint": "generate", "request": request}).json()
        report["attention"]["rows"] = report["attention"]["rows"][-3:]  # the last three query rows suffice
        report["tokens"] = report["tokens"][:4]
        report["attention"]["position_ids"] = "... 0..63"
        report["text"] = report["text"][:60] + "..."
        (OUT / "attention-example.json").write_text(json.dumps(report, indent=None) + "\n")
        weights = client.post(
            "/v1/masks?format=png&picture=weights",
            json={"endpoint": "generate", "request": request, "attention_weights": True},
        )
        (OUT / "attention-weights-example.png").write_bytes(weights.content)


FILL_CASES = [  # (a distracting first sentence, the sentence with the mask)
    ("My cat sleeps on the sofa all day.", " The [MASK] barked at the mailman."),
    ("I love my cat.", " The [MASK] barked loudly at night."),
    ("My neighbour owns a small brown dog.", " The [MASK] barked at the mailman."),
    ("Berlin is the capital of Germany.", " Paris is the [MASK] of France."),
]


def fill_mask_example() -> None:
    """Fill-mask (the shipped MNTP adapter) with the first sentence read, and excluded."""
    with TestClient(create_app(load_settings(adapter="shipped"))) as client:
        print(f"\n{'fill-mask input':72} {'top 3, unmasked':36} top 3, first sentence excluded")
        for first, second in FILL_CASES:
            tops = []
            for attention in (None, {"exclude": [{"start": 0, "end": len(first)}]}):
                body: dict[str, object] = {"inputs": first + second, "parameters": {"top_k": 3}}
                if attention:
                    body["attention"] = attention
                r = client.post("/v1/fill-mask", json=body)
                r.raise_for_status()
                tops.append(", ".join(f"{c['token_str'].strip()} {c['score']:.2f}" for c in r.json()))
            print(f"{first + second:72} {tops[0]:36} {tops[1]}")


def token_range(report: dict, text: str) -> range:
    """The prompt tokens that hold ``text`` (a passage of CONTENT) in the rendered chat prompt."""
    start = report["text"].index(CONTENT) + CONTENT.index(text)
    end = start + len(text)
    hits = [t["index"] for t in report["tokens"] if t["end"] > t["start"] and t["start"] < end and start < t["end"]]
    return range(hits[0], hits[-1] + 1)


if __name__ == "__main__":
    main()
    fill_mask_example()
