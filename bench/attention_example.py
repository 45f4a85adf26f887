"""The worked example of docs/masks.md: a conflicting passage, the answer with and without masking it.

    .venv/bin/python bench/attention_example.py        # bundled SmolLM2-135M-Instruct, greedy

Prints the answers side by side and writes docs/img/attention-example.png (the attention mask of the request
that excludes the stale note) and docs/img/attention-example.json (its inspection report, shortened).
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


if __name__ == "__main__":
    main()
