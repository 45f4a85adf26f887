"""Experiment 5 — attention exclusion, isolation and emphasis at inference, on a distractor task.

Each item is a chat prompt with two short documents and a question whose answer is in one of them (the
relevant one); the other is a distractor of one of two kinds, half the items each:
- *other person*: the same attributes of a different person ("Who plays which instrument" binding);
- *conflicting record*: the same person, a different value, labelled as an outdated record.
Names, attributes, values, which attribute is asked and the documents' order are drawn from a seed; nothing
is tuned to make a mask win. The instruct model's answer is scored without decoding: the log-likelihood of
each candidate answer (the right value, the distractor's value, two values from neither document) after the
assistant turn starts; the highest one is its answer (chance 25%).

Conditions: the prompt without the distractor (the ceiling), the distractor with no mask, the distractor
excluded, the two documents isolated (Parallel Context Windows, Ratner et al. 2023; with and without position
restarts), emphasis on the relevant document (PASTA-style key bias, Zhang et al. 2023, factors 3 and 10 on
all layers and heads, the service's default), and a control that excludes the *relevant* document.
All masks and position ids come from service/masks/ (constrained_structure,
constrained_position_ids, emphasis_key_bias, to_4d), as in the service.

Scoring shares the prompt between candidates: one forward per item and condition over the prompt followed
by all candidates, the candidates isolated from one another and each continuing at the position after the
prompt. That equals one forward per candidate (checked in tests/integration/test_experiments_smoke.py) at
about a third of the cost.

    python -m bench.experiments.distractors            # full run, docs/interference/distractors.{md,png}
    python -m bench.experiments.distractors --smoke    # tiny model, seconds
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from bench.experiments.common import (
    Clock,
    Result,
    bootstrap_ci,
    load_decoder,
    markdown_table,
    new_figure,
    parse_args,
    publish,
    seed_all,
)
from service.masks.attention import padding_mask, to_4d, to_additive
from service.masks.constraints import (
    AttentionConstraints,
    TokenSpan,
    constrained_position_ids,
    constrained_structure,
    emphasis_key_bias,
    next_position,
    validate_constraints,
)
from service.masks.spans import char_span_to_tokens

NAME = "distractors"
FIRST = ["Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chen", "Nora", "Ravi", "Elena",
         "Tom", "Yuki", "Omar", "Greta", "Lucas", "Amara", "Ivan", "Sofia", "Daniel", "Mei", "Hugo",
         "Leila"]  # fmt: skip
LAST = ["Lopez", "Smith", "Khan", "Tanaka", "Petrova", "Silva", "Haddad", "Murphy", "Wang", "Berg", "Patel",
        "Rossi", "Novak", "Sato", "Farah", "Fischer", "Moreau", "Okafor", "Ivanov", "Garcia", "Cohen",
        "Lin"]  # fmt: skip


@dataclass(frozen=True)
class Attribute:
    values: tuple[str, ...]
    clause: str  # "{}" takes the value
    question: str  # "{name}" takes the person


ATTRIBUTES = {
    "city": Attribute(("Lisbon", "Oslo", "Paris", "Berlin", "Madrid", "Rome", "Tokyo", "Cairo", "Dublin", "Vienna",
                       "Prague", "Athens", "Warsaw", "Toronto"), "lives in {}", "In which city does {name} live?"),
    "job": Attribute(("baker", "pilot", "teacher", "farmer", "nurse", "lawyer", "painter", "chef", "dentist",
                      "plumber", "doctor", "writer"), "works as a {}", "What is {name}'s job?"),
    "pet": Attribute(("dog", "cat", "parrot", "rabbit", "horse", "turtle", "goat", "hamster"), "has a pet {}",
                     "What pet does {name} have?"),
    "instrument": Attribute(("piano", "guitar", "violin", "drums", "flute", "trumpet", "cello", "harp"),
                            "plays the {}", "Which instrument does {name} play?"),
    "color": Attribute(("red", "blue", "green", "yellow", "black", "white", "orange", "purple"), "drives a {} car",
                       "What color is {name}'s car?"),
}  # fmt: skip
INSTRUCTION = "Answer the question using the documents. Reply with one word."


@dataclass
class Item:
    kind: str  # "other person" | "conflicting record"
    relevant: str  # the relevant document's line
    distractor: str
    question: str
    relevant_first: bool
    answer: str
    distractor_value: str
    candidates: list[str]  # answer first, then the distractor's value, then two values in neither document

    def user_message(self, with_distractor: bool = True) -> tuple[str, dict[str, tuple[int, int]]]:
        """The user turn, and each document's character range in it (its "Document k" label included)."""
        docs = [("relevant", self.relevant), ("distractor", self.distractor)]
        if not self.relevant_first:
            docs.reverse()
        if not with_distractor:
            docs = [("relevant", self.relevant)]
        text, ranges = f"{INSTRUCTION}\n\n", {}
        for i, (role, doc) in enumerate(docs):
            line = f"Document {i + 1}{doc}"
            ranges[role] = (len(text), len(text) + len(line))
            text += line + "\n\n"
        return text + f"Question: {self.question}", ranges


def passage(name: str, values: dict[str, str], order: Sequence[str]) -> str:
    clauses = [ATTRIBUTES[a].clause.format(values[a]) for a in order]
    return f"{name} {clauses[0]}, {clauses[1]} and {clauses[2]}."


def make_items(n: int, rng: random.Random) -> list[Item]:
    items = []
    for i in range(n):
        kind = "other person" if i % 2 == 0 else "conflicting record"
        attrs = rng.sample(sorted(ATTRIBUTES), k=3)
        asked = attrs[0]
        order = rng.sample(attrs, k=3)  # where the asked clause sits in the sentence
        first, last = rng.sample(FIRST, k=2), rng.sample(LAST, k=2)
        name = f"{first[0]} {last[0]}"
        pools = {a: rng.sample(ATTRIBUTES[a].values, k=4) for a in attrs}  # distinct values per attribute
        mine = {a: pools[a][0] for a in attrs}
        if kind == "other person":
            other = {a: pools[a][1] for a in attrs}
            relevant = f": {passage(name, mine, order)}"
            distractor = f": {passage(f'{first[1]} {last[1]}', other, rng.sample(attrs, k=3))}"
            question = ATTRIBUTES[asked].question.format(name=name)
        else:
            other = dict(mine, **{asked: pools[asked][1]})
            relevant = f" (current record): {passage(name, mine, order)}"
            distractor = f" (outdated record): {passage(name, other, rng.sample(attrs, k=3))}"
            q = ATTRIBUTES[asked].question.format(name=name)
            question = f"According to the current record, {q[0].lower()}{q[1:]}"
        items.append(Item(kind, relevant, distractor, question, rng.random() < 0.5, answer=pools[asked][0],
                          distractor_value=pools[asked][1], candidates=pools[asked][:4]))  # fmt: skip
    return items


@dataclass
class Prompt:
    ids: list[int]
    relevant: TokenSpan  # the relevant document, label included
    distractor: TokenSpan | None


def build_prompt(tok: PreTrainedTokenizerBase, item: Item, with_distractor: bool = True) -> Prompt:
    """The chat-templated prompt's ids and the documents' token spans (character ranges -> tokens)."""
    user, ranges = item.user_message(with_distractor)
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    base = text.index(user)
    spans = {role: char_span_to_tokens(enc.offset_mapping, base + a, base + b, len(text), role)
             for role, (a, b) in ranges.items()}  # fmt: skip
    return Prompt(list(enc.input_ids), spans["relevant"], spans.get("distractor"))


@dataclass(frozen=True)
class Condition:
    label: str
    with_distractor: bool
    constraints: Callable[[Prompt], AttentionConstraints] = field(default=lambda p: AttentionConstraints())


def _distractor(p: Prompt) -> TokenSpan:
    assert p.distractor is not None
    return p.distractor


def _isolated(p: Prompt, restart: bool) -> AttentionConstraints:
    docs = tuple(sorted((p.relevant, _distractor(p)), key=lambda s: s.start))
    return AttentionConstraints(isolate=docs, restart_positions=restart)


def _emphasis(factor: float) -> Callable[[Prompt], AttentionConstraints]:
    return lambda p: AttentionConstraints(emphasis=(p.relevant,), emphasis_factor=factor)


CONDITIONS = (
    Condition("no distractor in the prompt (ceiling)", with_distractor=False),
    Condition("distractor, no mask", with_distractor=True),
    Condition("distractor excluded", True, lambda p: AttentionConstraints(exclude=(_distractor(p),))),
    Condition("documents isolated", True, lambda p: _isolated(p, restart=False)),
    Condition("isolated + restart positions", True, lambda p: _isolated(p, restart=True)),
    Condition("emphasis on relevant ×3", True, _emphasis(3.0)),
    Condition("emphasis on relevant ×10", True, _emphasis(10.0)),
    Condition("control: relevant excluded", True, lambda p: AttentionConstraints(exclude=(p.relevant,))),
)


@dataclass
class Layout:
    """One item's scoring sequence: prompt then every candidate, each candidate seeing only the prompt."""

    ids: list[int]
    structure: Tensor  # (T, T) bool
    positions: Tensor  # (T,) long
    key_bias: Tensor | None  # (T,) float, emphasis only
    candidates: list[TokenSpan]


def layout(prompt_ids: Sequence[int], cand_ids: Sequence[Sequence[int]], c: AttentionConstraints) -> Layout:
    n = len(prompt_ids)
    validate_constraints(n, c)
    spans, at = [], n
    for ids in cand_ids:
        spans.append(TokenSpan(at, at + len(ids)))
        at += len(ids)
    structure = constrained_structure(at, c)  # (T, T) the request's own constraints, candidates included
    if len(spans) > 1:  # candidates are alternatives: isolate them from one another
        structure &= constrained_structure(at, AttentionConstraints(isolate=tuple(spans)))
    prompt_pos = constrained_position_ids(n, c)  # (n,)
    start = next_position(prompt_pos)  # where the answer's first token goes, as when decoding
    positions = torch.cat([prompt_pos, *(torch.arange(start, start + len(ids)) for ids in cand_ids)])  # (T,)
    bias = emphasis_key_bias(at, c, torch.float32) if c.emphasis else None
    return Layout([*prompt_ids, *(t for ids in cand_ids for t in ids)], structure, positions, bias, spans)


@torch.inference_mode()
def score(model: torch.nn.Module, batch: Sequence[Layout], pad_id: int) -> list[list[float]]:
    """Sum of log-probabilities of each candidate's tokens, for a batch of layouts (right-padded)."""
    lengths = [len(x.ids) for x in batch]
    width = max(lengths)
    ids = torch.full((len(batch), width), pad_id)  # (B, T)
    structure = torch.zeros(len(batch), width, width, dtype=torch.bool)  # (B, T, T)
    positions = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T)
    bias = torch.zeros(len(batch), width)  # (B, S)
    for b, x in enumerate(batch):
        n = len(x.ids)
        ids[b, :n] = torch.tensor(x.ids)
        structure[b, :n, :n] = x.structure
        positions[b, :n] = x.positions
        if x.key_bias is not None:
            bias[b, :n] = x.key_bias
    mask = to_additive(to_4d(padding_mask(lengths, width), structure), torch.float32)  # (B, 1, T, S)
    mask = mask + bias[:, None, None, :]  # emphasis: a per-key log-bias, zero elsewhere
    logp = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().log_softmax(-1)
    out = []
    for b, x in enumerate(batch):
        n_prompt = x.candidates[0].start
        row = []
        for span in x.candidates:
            # token j of a candidate is predicted by the token before it: the prompt's last for j = 0
            readers = [n_prompt - 1, *range(span.start, span.end - 1)]
            targets = range(span.start, span.end)
            row.append(float(sum(logp[b, r, ids[b, t]] for r, t in zip(readers, targets, strict=True))))
        out.append(row)
    return out


def main(argv: Sequence[str] | None = None) -> Result:
    run = parse_args(NAME, __doc__, argv)
    clock = Clock()
    seed_all(run.seed)
    n_items, batch_size = (4, 4) if run.smoke else (160, 4)
    loaded = load_decoder(run.smoke)
    model, tok = loaded.generation_model, loaded.tokenizer
    assert model is not None
    assert tok.pad_token_id is not None
    items = make_items(n_items, random.Random(run.seed))
    cand_ids = [[tok(c, add_special_tokens=False).input_ids for c in it.candidates] for it in items]

    correct: dict[str, np.ndarray] = {}
    chose_distractor: dict[str, np.ndarray] = {}
    p_correct: dict[str, np.ndarray] = {}
    for cond in CONDITIONS:
        layouts = []
        for it, cids in zip(items, cand_ids, strict=True):
            prompt = build_prompt(tok, it, cond.with_distractor)
            layouts.append(layout(prompt.ids, cids, cond.constraints(prompt)))
        scores = np.array([s for i in range(0, len(layouts), batch_size)
                           for s in score(model, layouts[i : i + batch_size], tok.pad_token_id)])  # fmt: skip
        # (items, candidates): candidate 0 is the answer, 1 the distractor's value
        correct[cond.label] = (scores.argmax(1) == 0).astype(float)
        chose_distractor[cond.label] = (scores.argmax(1) == 1).astype(float)
        z = np.exp(scores - scores.max(1, keepdims=True))
        p_correct[cond.label] = z[:, 0] / z.sum(1)
        print(f"  {cond.label}: accuracy {correct[cond.label].mean():.3f} ({clock.seconds:.0f} s)", flush=True)

    kinds = np.array([it.kind for it in items])
    base = correct["distractor, no mask"]
    headers = ["condition", "accuracy (95% CI)", "Δ vs no mask (paired 95% CI)", "other person", "conflicting record",
               "chose distractor's value", "P(answer) among candidates"]  # fmt: skip
    rows, records = [], []
    for i, cond in enumerate(CONDITIONS):
        acc = correct[cond.label]
        m, lo, hi = bootstrap_ci(acc, seed=run.seed + i)
        dm, dlo, dhi = bootstrap_ci(acc - base, seed=run.seed + 100 + i)
        by_kind = [acc[kinds == k].mean() for k in ("other person", "conflicting record")]
        rows.append([cond.label, f"{m:.3f} [{lo:.3f}, {hi:.3f}]", f"{dm:+.3f} [{dlo:+.3f}, {dhi:+.3f}]",
                     f"{by_kind[0]:.3f}", f"{by_kind[1]:.3f}", f"{chose_distractor[cond.label].mean():.3f}",
                     f"{p_correct[cond.label].mean():.3f}"])  # fmt: skip
        records.append({"condition": cond.label, "accuracy": m, "ci": (lo, hi), "delta": dm})
    table = markdown_table(headers, rows)

    fig, (ax,) = new_figure(width=9.0, height=4.4)
    labels = [c.label for c in CONDITIONS]
    for k, (kind, color) in enumerate((("other person", "tab:blue"), ("conflicting record", "tab:orange"))):
        sel = kinds == kind
        stats = [bootstrap_ci(correct[lab][sel], seed=run.seed + j) for j, lab in enumerate(labels)]
        x = np.arange(len(labels)) + (k - 0.5) * 0.35
        means = np.array([s[0] for s in stats])
        err = np.array([[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]])
        ax.bar(x, means, width=0.35, yerr=err, capsize=3, color=color, label=kind)
    ax.axhline(0.25, color="gray", linestyle=":", label="chance (4 candidates)")
    ax.set_xticks(range(len(labels)), [lab.replace(" ", "\n", 2) for lab in labels], fontsize=7)
    ax.set_ylabel("answer accuracy (95% bootstrap CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Distractor task, {n_items} items, {loaded.name}")
    notes = (f"{n_items} items ({(kinds == 'other person').sum()} other-person, "
             f"{(kinds == 'conflicting record').sum()} conflicting-record), 4 candidate answers each, "
             f"model {loaded.name} ({loaded.dtype}); CIs: 2000 bootstrap resamples over items.")  # fmt: skip
    return publish(run, NAME, "Experiment 5 — attention exclusion, isolation and emphasis on a distractor task",
                   table, fig, notes=notes, rows=records, clock=clock)  # fmt: skip


if __name__ == "__main__":
    main()
