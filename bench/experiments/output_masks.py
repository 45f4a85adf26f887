"""Experiment 6 — output masks: does constraining what the model may say fix the format, and the answer?

Two small tasks on the bundled SmolLM2-135M-Instruct, through the project's own decode engine
(service/engine/generate.py: DecodeBatch, the same loop and output masks the server runs), greedy:
- *extraction*: a sentence about a person -> JSON with "name", "age" (integer) and "city"; free generation
  against generation under a ``json_schema`` output mask (xgrammar);
- *classification*: a short review -> "positive" or "negative"; free against a ``choice`` output mask.
The instruction in the prompt is the same in both conditions; the mask is the only difference.
Compliance: the output is valid JSON matching the schema (a JSON object is searched for anywhere in a free
output, so fences and chatter around it are forgiven), or exactly one of the two labels (case and a final
period forgiven). Accuracy: every field right / the right label — for free outputs also counted leniently
(the first label word that appears anywhere).

    python -m bench.experiments.output_masks            # full run, docs/interference/output_masks.{md,png}
    python -m bench.experiments.output_masks --smoke    # tiny model, seconds
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.experiments.common import (
    Clock,
    Result,
    bootstrap_ci,
    greedy_chat,
    load_decoder,
    markdown_table,
    new_figure,
    parse_args,
    publish,
)
from service.engine.loading import LoadedModel
from service.engine.params import SamplingParams
from service.engine.vocab import ModelVocab
from service.masks.output import OutputMaskSpec

NAME = "output_masks"
LABELS = ("positive", "negative")
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
FIRST = ["Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chen", "Nora", "Ravi", "Elena",
         "Tom", "Yuki", "Omar", "Greta"]  # fmt: skip
LAST = ["Lopez", "Smith", "Khan", "Tanaka", "Petrova", "Silva", "Haddad", "Murphy", "Wang", "Berg", "Patel",
        "Rossi", "Novak", "Sato", "Farah", "Fischer"]  # fmt: skip
CITIES = ["Lisbon", "Oslo", "Paris", "Berlin", "Madrid", "Rome", "Tokyo", "Cairo", "Dublin", "Vienna", "Prague",
          "Athens", "Warsaw", "Toronto", "Chicago", "Sydney"]  # fmt: skip
JOBS = ["baker", "pilot", "teacher", "farmer", "nurse", "lawyer", "painter", "chef"]
PERSON_TEMPLATES = [
    "{name} is {age} years old and lives in {city}, where they work as a {job}.",
    "At {age}, {name} moved to {city} to work as a {job}.",
    "{name} ({age}) is a {job} in {city}.",
    "In {city}, {age}-year-old {name} has worked as a {job} for years.",
    "The {job} {name}, aged {age}, was born and raised in {city}.",
]
GOOD = ["delicious", "wonderful", "friendly", "excellent", "comfortable", "fast", "beautiful", "helpful"]
BAD = ["terrible", "awful", "rude", "broken", "cold", "dirty", "slow", "disappointing"]
THINGS = ["food", "staff", "room", "service", "delivery", "coffee", "hotel", "phone"]
REVIEW_TEMPLATES = [
    "The {thing} was {adj}.",
    "Honestly, the {thing} was {adj} and I would say so again.",
    "We tried the {thing} last week: {adj}.",
    "I found the {thing} {adj}, as my friends had told me.",
]


@dataclass
class Item:
    task: str  # "extraction" | "classification"
    prompt: str
    gold: dict[str, object] | str


def make_items(n: int, rng: random.Random) -> list[Item]:
    items = []
    for _ in range(n):
        person = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 79),
                  "city": rng.choice(CITIES)}  # fmt: skip
        text = rng.choice(PERSON_TEMPLATES).format(job=rng.choice(JOBS), **person)
        items.append(Item("extraction", 'Extract the person\'s name, age and city from the text as JSON with the '
                          f'keys "name", "age" and "city".\n\nText: {text}', person))  # fmt: skip
    for _ in range(n):
        label = rng.choice(LABELS)
        adj = rng.choice(GOOD if label == "positive" else BAD)
        review = rng.choice(REVIEW_TEMPLATES).format(thing=rng.choice(THINGS), adj=adj)
        items.append(Item("classification", "Is the sentiment of this review positive or negative? Answer with "
                          f"one word.\n\nReview: {review}", label))  # fmt: skip
    return items


def mask_for(item: Item) -> OutputMaskSpec:
    if item.task == "extraction":
        return OutputMaskSpec(json_schema=json.dumps(SCHEMA))
    return OutputMaskSpec(choice=LABELS)


def find_json(text: str) -> object | None:
    """The first JSON value that starts at a "{" in the text (a free answer may wrap it in fences or prose)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            return decoder.raw_decode(text[m.start() :])[0]
        except json.JSONDecodeError:
            continue
    return None


def judge(item: Item, text: str) -> tuple[bool, bool, bool]:
    """(complies with the format, right answer in that format, right answer read leniently)."""
    if item.task == "extraction":
        gold = item.gold
        assert isinstance(gold, dict)
        value = find_json(text)
        complies = (isinstance(value, dict) and set(value) == set(gold) and isinstance(value.get("name"), str)
                    and isinstance(value.get("city"), str) and type(value.get("age")) is int)  # fmt: skip
        right = complies and isinstance(value, dict) and all(
            str(value[k]).strip().lower() == str(gold[k]).lower() for k in gold
        )  # fmt: skip
        return complies, right, right
    answer = text.strip().lower().rstrip(".")
    complies = answer in LABELS
    found = re.findall("|".join(LABELS), text.lower())
    return complies, complies and answer == item.gold, bool(found) and found[0] == item.gold


def generate(loaded: LoadedModel, vocab: ModelVocab, items: Sequence[Item], masked: bool, max_new: int,
             batch_size: int) -> list[str]:  # fmt: skip
    """Greedy outputs through the engine's decode loop, ``batch_size`` requests at a time."""
    params = SamplingParams(max_new_tokens=max_new)
    requests = [(item.prompt, params, mask_for(item) if masked else OutputMaskSpec()) for item in items]
    return [s.result().text for s in greedy_chat(loaded, vocab, requests, batch_size)]


def main(argv: Sequence[str] | None = None) -> Result:
    run = parse_args(NAME, __doc__, argv)
    clock = Clock()
    n, max_new, batch_size = (2, 8, 4) if run.smoke else (60, 48, 20)
    loaded = load_decoder(run.smoke)
    vocab = ModelVocab.build(loaded, grammar_cache_size=8)
    items = make_items(n, random.Random(run.seed))

    scores: dict[tuple[str, bool], np.ndarray] = {}  # (task, masked) -> (items, 3)
    lengths: dict[tuple[str, bool], float] = {}
    examples: dict[tuple[str, bool], str] = {}
    outputs = []
    for masked in (False, True):
        texts = generate(loaded, vocab, items, masked, max_new, batch_size)
        outputs += [{"task": it.task, "masked": masked, "prompt": it.prompt, "gold": it.gold, "output": t,
                     "judged": dict(zip(("complies", "right", "lenient"), judge(it, t), strict=True))}
                    for it, t in zip(items, texts, strict=True)]  # fmt: skip
        for task in ("extraction", "classification"):
            idx = [i for i, it in enumerate(items) if it.task == task]
            scores[task, masked] = np.array([judge(items[i], texts[i]) for i in idx], dtype=float)
            lengths[task, masked] = float(np.mean([len(loaded.tokenizer(texts[i])["input_ids"]) for i in idx]))
            examples[task, masked] = texts[idx[0]]
        print(f"  {'with' if masked else 'without'} output masks ({clock.seconds:.0f} s)", flush=True)

    headers = ["task", "output mask", "format compliance, % (95% CI)", "right answer, strict, % (95% CI)",
               "right answer, lenient, %", "tokens generated (mean)"]  # fmt: skip
    rows, records = [], []
    for task in ("extraction", "classification"):
        for masked in (False, True):
            arr = scores[task, masked]
            comp, strict = bootstrap_ci(arr[:, 0], seed=run.seed), bootstrap_ci(arr[:, 1], seed=run.seed)
            mask_name = ("json_schema" if task == "extraction" else "choice") if masked else "none"
            rows.append([task, mask_name, f"{100 * comp[0]:.1f} [{100 * comp[1]:.1f}, {100 * comp[2]:.1f}]",
                         f"{100 * strict[0]:.1f} [{100 * strict[1]:.1f}, {100 * strict[2]:.1f}]",
                         f"{100 * arr[:, 2].mean():.1f}", f"{lengths[task, masked]:.1f}"])  # fmt: skip
            records.append({"task": task, "masked": masked, "compliance": comp[0], "strict": strict[0],
                            "lenient": float(arr[:, 2].mean())})  # fmt: skip
    table = markdown_table(headers, rows)

    fig, axes = new_figure(ncols=2, width=5.0, height=4.0)
    for ax, task in zip(axes, ("extraction", "classification"), strict=True):
        for j in range(3):  # compliance, right (strict), right (lenient)
            for m, masked in enumerate((False, True)):
                mean, lo, hi = bootstrap_ci(scores[task, masked][:, j], seed=run.seed)
                ax.bar(j + (m - 0.5) * 0.38, 100 * mean, width=0.38, yerr=[[100 * (mean - lo)], [100 * (hi - mean)]],
                       capsize=3, color="tab:green" if masked else "tab:gray",
                       label=("with output mask" if masked else "free") if j == 0 else None)  # fmt: skip
        ax.set_xticks(range(3), ["compliance", "right (strict)", "right (lenient)"])
        ax.set_ylim(0, 105)
        ax.set_title(f"{task} ({n} items)")
        ax.set_ylabel("% of items (95% bootstrap CI)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Output masks, {loaded.name}, greedy")
    notes = (f"{n} items per task, greedy, at most {max_new} new tokens, model {loaded.name} ({loaded.dtype}), "
             "generated by the project's DecodeBatch; CIs: 2000 bootstrap resamples over items. First outputs — "
             + "; ".join(f"{t}, {'masked' if m else 'free'}: `{examples[t, m][:80]!r}`"
                         for t in ("extraction", "classification") for m in (False, True)))  # fmt: skip
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / f"{NAME}.outputs.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outputs))
    notes += f" Every output: `{NAME}.outputs.jsonl`."
    return publish(run, NAME, "Experiment 6 — output masks (structured outputs)", table, fig, notes=notes,
                   rows=records, clock=clock)  # fmt: skip


if __name__ == "__main__":
    main()
