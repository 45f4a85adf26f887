"""Experiment 7 — repetition: does masking repeated n-grams (or penalizing repeats) stop a model repeating
itself, and does it keep the answer useful?

The bundled SmolLM2-135M-Instruct, greedy, through the project's own decode engine (service/engine/generate.py:
DecodeBatch, the loop and output masks the server runs), on list-style prompts ("List 8 fruits, separated by
commas."): a task where repeating is the typical failure of a small model, and where usefulness can be judged by
a program — the number of *distinct valid* items of the asked category (from a known set) among the first k
items of the answer, divided by k. Conditions: free; the ``no_repeat_ngram_size`` output mask (n = 2, 3);
OpenAI's ``frequency_penalty`` and ``presence_penalty``; and transformers' ``repetition_penalty`` for
comparison. The prompt is the same in every condition; only the mask or penalty changes.

Measured per output: the repeated 3-gram rate (the share of the output's token 3-grams that already occurred
earlier in the output), distinct-2 (distinct word bigrams / word bigrams, Li et al. 2016) and the list score.
Spread: 95% bootstrap intervals over prompts (2000 resamples).

    python -m bench.experiments.repetition            # full run, docs/interference/repetition.{md,png}
    python -m bench.experiments.repetition --smoke    # tiny model, seconds
    python -m bench.experiments.repetition --paired docs/interference/repetition.outputs.jsonl  # paired table
"""

from __future__ import annotations

import json
import random
import re
import sys
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

NAME = "repetition"

# Known members of each category (lower case): an item counts when it is one of these, once.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "banana", "orange", "mango", "pear", "grape", "grapes", "strawberry", "cherry", "peach",
               "pineapple", "kiwi", "watermelon", "lemon", "lime", "plum", "apricot", "blueberry", "raspberry",
               "papaya", "melon", "fig", "pomegranate", "coconut", "avocado", "grapefruit", "blackberry", "guava",
               "lychee", "cantaloupe", "nectarine", "tangerine", "date", "cranberry", "passion fruit"),
    "colours": ("red", "blue", "green", "yellow", "orange", "purple", "pink", "black", "white", "brown", "gray",
                "grey", "violet", "indigo", "cyan", "magenta", "turquoise", "beige", "maroon", "navy", "teal",
                "gold", "silver", "lavender", "crimson", "olive", "coral", "lime", "peach", "tan", "ivory"),
    "animals": ("dog", "cat", "lion", "tiger", "elephant", "giraffe", "zebra", "horse", "cow", "sheep", "goat",
                "pig", "rabbit", "bear", "wolf", "fox", "deer", "monkey", "kangaroo", "koala", "panda", "camel",
                "mouse", "rat", "squirrel", "dolphin", "whale", "shark", "eagle", "owl", "snake", "frog",
                "turtle", "crocodile", "hippo", "hippopotamus", "rhino", "rhinoceros", "cheetah", "leopard",
                "gorilla", "chimpanzee", "penguin", "bird", "fish", "duck", "chicken", "parrot"),
    "countries": ("france", "germany", "italy", "spain", "portugal", "china", "japan", "india", "brazil",
                  "canada", "mexico", "russia", "australia", "egypt", "nigeria", "kenya", "argentina", "chile",
                  "peru", "greece", "turkey", "sweden", "norway", "finland", "denmark", "poland", "ireland",
                  "netherlands", "belgium", "switzerland", "austria", "thailand", "vietnam", "indonesia",
                  "pakistan", "iran", "iraq", "israel", "south africa", "south korea", "united states", "usa",
                  "united kingdom", "uk", "england", "colombia", "new zealand", "philippines", "morocco"),
    "vegetables": ("carrot", "carrots", "potato", "potatoes", "tomato", "tomatoes", "onion", "onions", "garlic",
                   "broccoli", "cauliflower", "cabbage", "lettuce", "spinach", "kale", "pepper", "peppers",
                   "bell pepper", "cucumber", "zucchini", "eggplant", "celery", "pea", "peas", "corn", "beans",
                   "green beans", "pumpkin", "squash", "radish", "beet", "beets", "beetroot", "asparagus",
                   "mushroom", "mushrooms", "leek", "sweet potato", "artichoke", "turnip", "okra", "parsnip"),
    "sports": ("football", "soccer", "basketball", "tennis", "baseball", "cricket", "rugby", "golf", "hockey",
               "ice hockey", "volleyball", "swimming", "running", "cycling", "boxing", "wrestling", "skiing",
               "snowboarding", "surfing", "badminton", "table tennis", "handball", "gymnastics", "athletics",
               "rowing", "sailing", "archery", "fencing", "judo", "karate", "climbing", "bowling", "softball",
               "lacrosse", "polo", "marathon", "triathlon", "skating", "diving"),
    "musical instruments": ("piano", "guitar", "violin", "cello", "drums", "drum", "flute", "trumpet",
                            "saxophone", "clarinet", "harp", "bass", "double bass", "trombone", "tuba", "oboe",
                            "bassoon", "accordion", "banjo", "ukulele", "harmonica", "xylophone", "organ",
                            "viola", "mandolin", "keyboard", "synthesizer", "french horn", "horn", "bagpipes",
                            "sitar", "tambourine", "triangle", "cymbals", "recorder"),
    "jobs": ("doctor", "nurse", "teacher", "engineer", "lawyer", "chef", "cook", "farmer", "pilot", "police officer",
             "firefighter", "scientist", "artist", "writer", "musician", "actor", "dentist", "pharmacist",
             "accountant", "architect", "electrician", "plumber", "carpenter", "mechanic", "programmer",
             "software engineer", "developer", "designer", "journalist", "photographer", "baker", "butcher",
             "waiter", "cashier", "driver", "soldier", "librarian", "veterinarian", "vet", "salesperson",
             "manager", "secretary", "judge", "professor", "student", "painter", "banker"),
    "body parts": ("head", "hand", "hands", "arm", "arms", "leg", "legs", "foot", "feet", "eye", "eyes", "ear",
                   "ears", "nose", "mouth", "tooth", "teeth", "tongue", "neck", "shoulder", "shoulders", "chest",
                   "back", "knee", "knees", "elbow", "finger", "fingers", "toe", "toes", "heart", "lungs", "lung",
                   "brain", "stomach", "liver", "kidney", "kidneys", "skin", "hair", "lips", "chin", "wrist",
                   "ankle", "hip", "thumb", "face"),
    "birds": ("eagle", "sparrow", "robin", "owl", "parrot", "penguin", "crow", "raven", "pigeon", "dove", "swan",
              "duck", "goose", "chicken", "turkey", "ostrich", "emu", "flamingo", "peacock", "hawk", "falcon",
              "vulture", "hummingbird", "woodpecker", "seagull", "gull", "pelican", "stork", "heron", "crane",
              "kingfisher", "magpie", "blue jay", "cardinal", "finch", "canary", "swallow", "starling", "wren",
              "toucan", "albatross", "kiwi", "condor", "quail", "pheasant", "blackbird", "lark"),
}  # fmt: skip
TEMPLATES = (
    "List {k} {category}, separated by commas.",
    "Name {k} different {category}.",
    "Give me a list of {k} {category}.",
)


@dataclass(frozen=True)
class Condition:
    label: str
    no_repeat: int = 0
    frequency: float = 0.0
    presence: float = 0.0
    repetition: float = 1.0


CONDITIONS = (
    Condition("free"),
    Condition("no_repeat_ngram_size=3", no_repeat=3),
    Condition("no_repeat_ngram_size=2", no_repeat=2),
    Condition("frequency_penalty=0.5", frequency=0.5),
    Condition("presence_penalty=0.5", presence=0.5),
    Condition("frequency 0.5 + presence 0.5", frequency=0.5, presence=0.5),
    Condition("repetition_penalty=1.3", repetition=1.3),
)


@dataclass(frozen=True)
class Item:
    category: str
    k: int
    prompt: str


def make_items(n: int, rng: random.Random) -> list[Item]:
    """``n`` prompts: every (category, template, k) combination once (k in 5, 8, 10), then shuffled."""
    combos = [(c, t, k) for c in CATEGORIES for t in TEMPLATES for k in (5, 8, 10)]
    rng.shuffle(combos)
    return [Item(c, k, t.format(k=k, category=c)) for c, t, k in combos[:n]]


def list_items(text: str) -> list[str]:
    """Split an answer into items: by commas, new lines, numbering and bullets; lower case, trimmed."""
    parts = re.split(r",|\n|;|\band\b|\d+[.)]|^\s*[-*•]", text.lower(), flags=re.MULTILINE)
    items = [re.sub(r"[^a-z ]", " ", p) for p in parts]
    return [" ".join(i.split()) for i in items if i.strip()]


def list_score(item: Item, text: str) -> float:
    """Distinct valid items of the category among the answer's first k items, over k (1.0 = a perfect list)."""
    known = CATEGORIES[item.category]
    seen: set[str] = set()
    for part in list_items(text)[: item.k]:
        words = part.split()
        # an item is valid when it, or its last one or two words ("a red apple" -> "apple"), is a known member
        match = next((c for c in (part, " ".join(words[-2:]), words[-1] if words else "") if c in known), None)
        if match:
            seen.add(match.removesuffix("s") if match.removesuffix("s") in known else match)
    return len(seen) / item.k


def repeated_ngram_rate(ids: Sequence[int], n: int = 3) -> float:
    """Share of the sequence's n-grams that already occurred earlier in it (0 = no repeat)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct word n-grams / word n-grams (Li et al. 2016); 1.0 for an output too short to have one."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def paired_vs_free(
    outputs: Sequence[dict[str, object]], seed: int = 0
) -> list[tuple[str, float, float, float, int, int]]:
    """Per condition, the list score's paired difference to the free condition (same prompts): mean and 95%
    percentile-bootstrap interval in points, and on how many prompts it was better / worse."""
    by: dict[str, list[float]] = {}
    for o in outputs:
        by.setdefault(str(o["condition"]), []).append(float(o["list_score"]))  # type: ignore[arg-type]
    free = np.array(by.pop("free"))
    idx = np.random.default_rng(seed).integers(0, len(free), size=(2000, len(free)))  # (R, items)
    out = []
    for label, values in by.items():
        d = np.array(values) - free  # (items,)
        lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
        out.append((label, 100 * float(d.mean()), 100 * float(lo), 100 * float(hi), int((d > 0).sum()),
                    int((d < 0).sum())))  # fmt: skip
    return out


def paired_table(outputs: Sequence[dict[str, object]], seed: int = 0) -> str:
    rows = [[label, f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]", f"{better} / {worse}"]
            for label, m, lo, hi, better, worse in paired_vs_free(outputs, seed)]  # fmt: skip
    return markdown_table(["condition", "list score vs free, points (paired 95% CI)", "prompts better / worse"], rows)


def generate(loaded: LoadedModel, vocab: ModelVocab, items: Sequence[Item], cond: Condition, max_new: int,
             batch_size: int) -> list[tuple[str, list[int]]]:  # fmt: skip
    """Greedy outputs (text, token ids without end-of-sequence) through the engine's decode loop."""
    params = SamplingParams(max_new_tokens=max_new, repetition_penalty=cond.repetition,
                            frequency_penalty=cond.frequency, presence_penalty=cond.presence)  # fmt: skip
    spec = OutputMaskSpec(no_repeat_ngram_size=cond.no_repeat)
    seqs = greedy_chat(loaded, vocab, [(item.prompt, params, spec) for item in items], batch_size)
    eos = vocab.vocabulary.eos_ids
    return [(s.result().text, [t for t in s.generated if t not in eos]) for s in seqs]


def main(argv: Sequence[str] | None = None) -> Result:
    run = parse_args(NAME, __doc__, argv)
    clock = Clock()
    n, max_new, batch_size = (4, 12, 4) if run.smoke else (60, 64, 20)
    loaded = load_decoder(run.smoke)
    vocab = ModelVocab.build(loaded, grammar_cache_size=2)
    items = make_items(n, random.Random(run.seed))

    metrics: dict[str, np.ndarray] = {}  # condition -> (items, 3): repeated 3-gram rate, distinct-2, list score
    lengths: dict[str, float] = {}
    outputs = []
    for cond in CONDITIONS:
        results = generate(loaded, vocab, items, cond, max_new, batch_size)
        rows = [[repeated_ngram_rate(ids), distinct_n(text), list_score(it, text)]
                for it, (text, ids) in zip(items, results, strict=True)]  # fmt: skip
        metrics[cond.label] = np.array(rows, dtype=float)
        lengths[cond.label] = float(np.mean([len(ids) for _, ids in results]))
        outputs += [{"condition": cond.label, "prompt": it.prompt, "output": text,
                     "repeated_3gram_rate": r[0], "distinct_2": r[1], "list_score": r[2]}
                    for it, (text, _), r in zip(items, results, rows, strict=True)]  # fmt: skip
        print(f"  {cond.label} ({clock.seconds:.0f} s)", flush=True)

    def ci(values: np.ndarray) -> tuple[float, float, float]:
        return bootstrap_ci(values, seed=run.seed)

    headers = ["condition", "repeated 3-grams, % (95% CI)", "distinct-2 (95% CI)", "list score, % (95% CI)",
               "perfect lists, %", "tokens (mean)"]  # fmt: skip
    table_rows, records = [], []
    for cond in CONDITIONS:
        arr = metrics[cond.label]
        rep, dist, score = ci(arr[:, 0]), ci(arr[:, 1]), ci(arr[:, 2])
        table_rows.append([cond.label, f"{100 * rep[0]:.1f} [{100 * rep[1]:.1f}, {100 * rep[2]:.1f}]",
                           f"{dist[0]:.3f} [{dist[1]:.3f}, {dist[2]:.3f}]",
                           f"{100 * score[0]:.1f} [{100 * score[1]:.1f}, {100 * score[2]:.1f}]",
                           f"{100 * float((arr[:, 2] == 1.0).mean()):.0f}", f"{lengths[cond.label]:.1f}"])  # fmt: skip
        records.append({"condition": cond.label, "repeated_3gram_rate": rep[0], "distinct_2": dist[0],
                        "list_score": score[0]})  # fmt: skip
    table = markdown_table(headers, table_rows)

    fig, axes = new_figure(ncols=3, width=4.6, height=4.2)
    titles = ("repeated token 3-grams (lower is better)", "distinct-2 (higher is better)",
              "list score: distinct valid items / k")  # fmt: skip
    for j, (ax, title) in enumerate(zip(axes, titles, strict=True)):
        for c, cond in enumerate(CONDITIONS):
            mean, lo, hi = ci(metrics[cond.label][:, j])
            scale = 1.0 if j == 1 else 100.0
            ax.barh(
                c,
                scale * mean,
                xerr=[[scale * (mean - lo)], [scale * (hi - mean)]],
                capsize=3,
                color="tab:gray" if cond.label == "free" else ("tab:green" if cond.no_repeat else "tab:blue"),
            )
        ax.set_yticks(range(len(CONDITIONS)), [c.label for c in CONDITIONS] if j == 0 else [""] * len(CONDITIONS))
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("%" if j != 1 else "ratio")
    fig.suptitle(f"Repetition: output mask vs penalties, {loaded.name}, greedy, {n} list prompts (95% bootstrap CI)")
    examples = {c.label: next(o["output"] for o in outputs if o["condition"] == c.label) for c in CONDITIONS[:2]}
    notes = (f"{n} list prompts ({len(CATEGORIES)} categories x {len(TEMPLATES)} phrasings x k in 5/8/10, "
             f"shuffled with seed {run.seed}), chat template, greedy, at most {max_new} new tokens, model "
             f"{loaded.name} ({loaded.dtype}), generated by the project's DecodeBatch; the no-repeat mask counts "
             "the prompt's n-grams too (transformers' semantics). CIs: 2000 bootstrap resamples over prompts. "
             f"First prompt, `{items[0].prompt}` — free: `{examples['free'][:90]!r}`; no_repeat_ngram_size=3: "
             f"`{examples['no_repeat_ngram_size=3'][:90]!r}`.")  # fmt: skip
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / f"{NAME}.outputs.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outputs))
    notes += (
        f" Every output: `{NAME}.outputs.jsonl`.\n\nPaired with the free condition (same prompts, 2000 "
        f"bootstrap resamples of the prompts):\n\n{paired_table(outputs, run.seed)}"
    )
    return publish(run, NAME, "Experiment 7 — repetition: no-repeat output mask and penalties", table, fig,
                   notes=notes, rows=records, clock=clock)  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--paired"]:  # recompute the paired table from a run's outputs: --paired FILE
        with open(sys.argv[2]) as lines:
            print(paired_table([json.loads(line) for line in lines]))
    else:
        main()
