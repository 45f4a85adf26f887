"""Output masks: which tokens may come next, per request and per decode step.

A request's :class:`OutputMaskSpec` is compiled once, before decoding (every problem is a ``MaskError`` naming the
request parameter), into a :class:`CompiledOutputMask`; each running request then holds an
:class:`OutputMaskState` that advances with every token it generates. :func:`apply_output_masks` applies a
batch's states to its ``(B, V)`` logits in place: blocked tokens become ``-inf``.

What each mask does (in this order):

- ``logit_bias``: adds a value in [-100, 100] to chosen tokens' logits (OpenAI semantics);
- ``allowed_token_ids`` / ``allowed_words``: only these tokens (the tokens of each word, with and without a
  leading space) and the end-of-sequence token may come next;
- ``bad_words``: the words never appear in the output text, however they would be spelt in tokens. Matching is
  on the bytes of the text, with an Aho-Corasick automaton (``service/masks/bad_words.py``): its state is
  the longest suffix of the output that is a prefix of some word, and a token is blocked when it would complete
  a word from any such suffix, or contains a whole word. So a word is blocked with or without a leading space,
  split into any tokens, and inside longer words too (``"cat"`` also blocks ``"concatenate"``); case matters.
  This is stronger than blocking token sequences (vLLM, transformers' ``bad_words_ids``), which a model can
  route around by spelling a word with other tokens;
- grammars (``choice``, ``regex``, ``json_schema``, ``json_object``), compiled with xgrammar and kept in a
  bounded LRU cache: the output is a prefix of a string in the language, and ends only where the language
  allows it. Special tokens other than end-of-sequence are blocked under a grammar (they do not print);
- ``no_repeat_ngram_size`` n: a token that would complete an n-gram already present in the prompt + output
  is blocked (transformers' ``no_repeat_ngram_size``). Each row keeps a table from every (n-1)-gram seen to
  the tokens that followed it, extended by one n-gram per generated token, so a step costs one lookup;
- ``min_tokens``: the end-of-sequence tokens are blocked until that many tokens were generated. It yields to
  the masks above: when they leave nothing else, end-of-sequence is allowed again.

Logits and bitmasks are tensors; no model is touched here. The vocabulary reaches this module as data
(:class:`Vocabulary`: the bytes each token adds to the text), the tokenizer only as an ``encode`` function.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import xgrammar as xgr
from torch import Tensor

from service.masks.bad_words import BadWords
from service.masks.errors import MaskError
from service.masks.grammar import GrammarCache, choice_grammar
from service.masks.kinds import MaskKind
from service.masks.vocabulary import Vocabulary

NEG_INF = float("-inf")
RECORD_TOP = 5  # removed tokens recorded per step when a request asks for its masks


@dataclass(frozen=True)
class OutputMaskSpec:
    """A request's output constraints, as the client gave them (already type-checked by the schema)."""

    bad_words: tuple[str, ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    allowed_words: tuple[str, ...] | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    choice: tuple[str, ...] | None = None
    regex: str | None = None
    json_schema: str | None = None  # JSON text of the schema
    json_object: bool = False  # any JSON object (OpenAI's response_format json_object)
    no_repeat_ngram_size: int = 0  # 0 = off; n: no n-gram of prompt + output appears twice
    # Where a field came from in the request, when not under its own name (e.g. the OpenAI routes' schema).
    param_names: tuple[tuple[str, str], ...] = ()

    def param(self, name: str) -> str:
        return dict(self.param_names).get(name, name)

    @property
    def empty(self) -> bool:
        return self == OutputMaskSpec(param_names=self.param_names)


@dataclass(frozen=True)
class CompiledOutputMask:
    """Everything a request's masks need at each step, computed before decoding."""

    blocked: Tensor | None  # (V,) bool: never allowed (outside the allowed set, containing a bad word, specials)
    bias_ids: Tensor | None  # (k,) long
    bias_values: Tensor | None  # (k,) float
    bad_words: BadWords | None
    grammar: xgr.CompiledGrammar | None
    min_tokens: int
    eos_ids: Tensor  # (e,) long
    kinds: tuple[MaskKind, ...]  # which masks are active, for metrics and inspection
    no_repeat_ngram: int = 0  # n of no_repeat_ngram_size (0 = off)

    def new_state(self, prompt_ids: Sequence[int] = ()) -> OutputMaskState:
        """A running request's state; ``prompt_ids`` seed the n-grams that must not repeat."""
        state = OutputMaskState(self)
        if self.no_repeat_ngram:
            state.ngrams = NgramTable(self.no_repeat_ngram, prompt_ids)
        return state


class NgramTable:
    """Every n-gram of a token sequence, as (n-1)-gram -> tokens that followed it; grows one token at a time."""

    def __init__(self, n: int, tokens: Sequence[int] = ()) -> None:
        self.n = n
        self.history: list[int] = []
        self.followers: dict[tuple[int, ...], set[int]] = {}
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> None:
        self.history.append(token)
        if len(self.history) >= self.n:
            gram = self.history[-self.n :]
            self.followers.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def banned(self) -> list[int]:
        """The tokens that would complete an n-gram already seen (none before n-1 tokens exist)."""
        if len(self.history) < self.n - 1:
            return []
        prefix = tuple(self.history[len(self.history) - self.n + 1 :])
        return sorted(self.followers.get(prefix, ()))


@dataclass
class OutputMaskState:
    """One running request's masks: the automaton node, the grammar matcher, the tokens generated so far."""

    mask: CompiledOutputMask
    node: int = 0
    generated: int = 0
    matcher: xgr.GrammarMatcher | None = field(default=None, repr=False)
    ngrams: NgramTable | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mask.grammar is not None and self.matcher is None:
            self.matcher = xgr.GrammarMatcher(self.mask.grammar, override_stop_tokens=self.mask.eos_ids.tolist())

    def advance(self, token_id: int, token_bytes: bytes) -> None:
        """Take the generated token into account for the next step."""
        self.generated += 1
        if self.mask.bad_words is not None:
            self.node = self.mask.bad_words.advance(self.node, token_bytes)
        if self.ngrams is not None:
            self.ngrams.add(token_id)
        matcher = self.matcher
        if matcher is not None and not matcher.is_terminated() and not matcher.accept_token(token_id):
            raise RuntimeError(f"grammar rejected token {token_id}, which its own mask allowed")


def compile_output_mask(
    spec: OutputMaskSpec,
    vocab: Vocabulary,
    *,
    encode: Callable[[str], list[int]],
    grammars: GrammarCache | None,
) -> CompiledOutputMask | None:
    """Validate and compile a spec (None when it asks for nothing). Raises MaskError naming the param."""
    if spec.empty:
        return None
    size = vocab.size
    kinds: list[MaskKind] = []
    eos = sorted(vocab.eos_ids)
    blocked = torch.zeros(size, dtype=torch.bool)  # (V,)

    # allowed set (plus end-of-sequence, so the output can end)
    if spec.allowed_token_ids is not None or spec.allowed_words is not None:
        allowed = torch.zeros(size, dtype=torch.bool)  # (V,)
        allowed[eos] = True
        for i, tid in enumerate(spec.allowed_token_ids or ()):
            if not 0 <= tid < size:
                raise MaskError(f"{spec.param('allowed_token_ids')}[{i}]", f"{tid} is not a token id (0..{size - 1})")
            allowed[tid] = True
        for i, word in enumerate(spec.allowed_words or ()):
            ids = {t for variant in (word, " " + word) for t in encode(variant)} if word.strip() else set()
            if not ids:
                raise MaskError(f"{spec.param('allowed_words')}[{i}]", "must contain a non-space character")
            allowed[sorted(ids)] = True
        blocked |= ~allowed
        kinds += [MaskKind.ALLOWED_TOKEN_IDS] if spec.allowed_token_ids is not None else []
        kinds += [MaskKind.ALLOWED_WORDS] if spec.allowed_words is not None else []

    # bad words
    bad: BadWords | None = None
    if spec.bad_words:
        for i, word in enumerate(spec.bad_words):
            if not word:
                raise MaskError(f"{spec.param('bad_words')}[{i}]", "must not be empty")
        bad = BadWords([w.encode() for w in dict.fromkeys(spec.bad_words)], vocab)
        blocked |= bad.always
        kinds.append(MaskKind.BAD_WORDS)
    open_ids = ~blocked
    open_ids[eos] = False
    if (spec.allowed_token_ids is not None or spec.allowed_words is not None) and not bool(open_ids.any()):
        name = "allowed_token_ids" if spec.allowed_token_ids else "allowed_words"
        raise MaskError(spec.param(name), "every allowed token contains a bad word (or is end-of-sequence)")

    # grammar
    grammar, grammar_kind = _compile_grammar(spec, grammars, bad)
    if grammar is not None and grammar_kind is not None:
        kinds.append(grammar_kind)
        specials = sorted(vocab.special_ids - vocab.eos_ids)
        blocked[specials] = True

    # logit bias
    bias_ids = bias_values = None
    if spec.logit_bias:
        for tid, _ in spec.logit_bias:
            if not 0 <= tid < size:
                raise MaskError(f"{spec.param('logit_bias')}.{tid}", f"{tid} is not a token id (0..{size - 1})")
        bias_ids = torch.tensor([t for t, _ in spec.logit_bias], dtype=torch.long)
        bias_values = torch.tensor([v for _, v in spec.logit_bias], dtype=torch.float32)
        kinds.append(MaskKind.LOGIT_BIAS)

    if spec.no_repeat_ngram_size < 0:
        raise MaskError(spec.param("no_repeat_ngram_size"), "must be 0 (off) or a positive n-gram size")
    if spec.no_repeat_ngram_size:
        kinds.append(MaskKind.NO_REPEAT_NGRAM)

    if spec.min_tokens:
        if not bool(open_ids.any()):
            raise MaskError(spec.param("min_tokens"), "the other masks allow no token but end-of-sequence")
        kinds.append(MaskKind.MIN_TOKENS)
    return CompiledOutputMask(
        blocked=blocked if bool(blocked.any()) else None,
        bias_ids=bias_ids,
        bias_values=bias_values,
        bad_words=bad,
        grammar=grammar,
        min_tokens=spec.min_tokens,
        eos_ids=torch.tensor(eos, dtype=torch.long),
        kinds=tuple(kinds),
        no_repeat_ngram=spec.no_repeat_ngram_size,
    )


def _compile_grammar(
    spec: OutputMaskSpec, grammars: GrammarCache | None, bad: BadWords | None
) -> tuple[xgr.CompiledGrammar | None, MaskKind | None]:
    given = [
        kind
        for kind, value in (
            (MaskKind.CHOICE, spec.choice is not None),
            (MaskKind.REGEX, spec.regex is not None),
            (MaskKind.JSON_SCHEMA, spec.json_schema is not None),
            (MaskKind.JSON_OBJECT, spec.json_object),
        )
        if value
    ]
    if not given:
        return None, None
    if len(given) > 1:
        names = [str(k) for k in given]
        raise MaskError(spec.param(given[1]), f"give only one of choice, regex, json_schema (got {names})")
    if grammars is None:
        raise MaskError(spec.param(given[0]), "structured outputs are not available for this model")
    kind, source, param = _grammar_source(spec, bad)
    try:
        return grammars.get(kind, source), given[0]
    except RuntimeError as exc:  # xgrammar reports invalid regexes and schemas as RuntimeError
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        reason = reason.split("] ", 1)[-1].split(": ", 1)[-1] if "] " in reason else reason
        raise MaskError(param, f"cannot be compiled: {reason}") from None


def grammar_source(spec: OutputMaskSpec) -> tuple[str, str, str] | None:
    """(kind, source, param) of a regex or JSON grammar, to compile ahead, off the compute thread; None for
    none, for a choice (its source depends on the bad words; small) or for several (compile reports that)."""
    if spec.choice is not None or sum((spec.regex is not None, spec.json_schema is not None, spec.json_object)) != 1:
        return None
    return _grammar_source(spec, None)


def _grammar_source(spec: OutputMaskSpec, bad: BadWords | None) -> tuple[str, str, str]:
    if spec.choice is not None:
        param = spec.param("choice")
        for i, option in enumerate(spec.choice):
            if not option:
                raise MaskError(f"{param}[{i}]", "options must not be empty")
        # An option containing a bad word could never be finished: it is dropped rather than started.
        options = [o for o in dict.fromkeys(spec.choice) if bad is None or not any(w in o.encode() for w in bad.words)]
        if not options:
            raise MaskError(param, "every option contains a bad word")
        return "ebnf", choice_grammar(options), param
    if spec.regex is not None:
        if not spec.regex:
            raise MaskError(spec.param("regex"), "must not be empty")
        return "regex", spec.regex, spec.param("regex")
    if spec.json_schema is not None:
        param = spec.param("json_schema")
        try:
            schema: Any = json.loads(spec.json_schema)
        except json.JSONDecodeError as exc:
            raise MaskError(param, f"is not valid JSON: {exc.msg}") from None
        if not isinstance(schema, dict):
            raise MaskError(param, "must be a JSON object (a JSON Schema)")
        # Keep the client's property order: xgrammar emits properties in schema order, and sorting them made
        # SmolLM2 write "age" before "name" and get it wrong (docs/interference.md, experiment 6).
        return "json_schema", json.dumps(schema), param
    return "json_schema", json.dumps({"type": "object"}), spec.param("json_object")


# --- applying a batch's masks to its logits --------------------------------------------------------------------


def apply_output_masks(logits: Tensor, states: Sequence[OutputMaskState | None]) -> list[int]:
    """Apply each row's masks to ``logits`` (B, V) in place; return the rows left with no token at all."""
    vocab = logits.shape[1]
    grammar_rows: list[int] = []
    bitmask: Tensor | None = None
    for b, state in enumerate(states):
        if state is None:
            continue
        mask, row = state.mask, logits[b]  # (V,)
        if mask.bias_ids is not None and mask.bias_values is not None:
            row.index_add_(0, mask.bias_ids.to(row.device), mask.bias_values.to(row.device, row.dtype))
        if mask.blocked is not None:
            row.masked_fill_(mask.blocked.to(row.device), NEG_INF)
        if mask.bad_words is not None:
            row.index_fill_(0, mask.bad_words.blocked(state.node).to(row.device), NEG_INF)
        if state.ngrams is not None and (banned := state.ngrams.banned()):
            row.index_fill_(0, torch.tensor(banned, dtype=torch.long, device=row.device), NEG_INF)
        if state.matcher is not None:
            if bitmask is None:
                bitmask = xgr.allocate_token_bitmask(len(states), vocab)
            if state.matcher.fill_next_token_bitmask(bitmask, b):
                grammar_rows.append(b)
    if bitmask is not None and grammar_rows:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=vocab, indices=grammar_rows)
    # min_tokens blocks the end tokens, but yields to the hard masks: a row left with nothing but an end token
    # keeps it. A row is alive while its largest logit beats -inf: one reduction over the rows concerned, not
    # an isfinite per row (that cost ~0.5 ms a row here, 15 ms a step at 32 rows).
    short = [b for b, st in enumerate(states) if st is not None and st.generated < st.mask.min_tokens]
    if short:
        eos_of = {b: states[b].mask.eos_ids.to(logits.device) for b in short}  # type: ignore[union-attr]
        kept = {b: logits[b, eos].clone() for b, eos in eos_of.items()}
        for b, eos in eos_of.items():
            logits[b, eos] = NEG_INF
        still = (logits[short].amax(dim=1) > NEG_INF).tolist()  # (len(short),)
        for b, alive in zip(short, still, strict=True):
            if not alive:
                logits[b, eos_of[b]] = kept[b]
    alive_rows = (logits.amax(dim=1) > NEG_INF).tolist()  # (B,) NaN rows count as dead, as with isfinite
    return [b for b, state in enumerate(states) if state is not None and not alive_rows[b]]


@dataclass(frozen=True)
class MaskEffect:
    """What the output mask did at one step: tokens left, and the model's preferred tokens it removed."""

    allowed: int
    removed_mass: float  # probability (under the unmasked distribution) of all removed tokens
    removed_top: tuple[tuple[int, float], ...]  # (token id, probability), most probable first


def mask_effect(raw: Tensor, masked: Tensor, top: int = RECORD_TOP) -> MaskEffect:
    """Compare a row's logits before (``raw``) and after (``masked``) the output masks.  (V,), (V,)"""
    probs = torch.softmax(raw.float(), dim=-1)  # (V,)
    allowed = torch.isfinite(masked)  # (V,)
    removed = probs.masked_fill(allowed, 0.0)  # (V,)
    values, ids = removed.topk(min(top, removed.numel()))
    return MaskEffect(
        allowed=int(allowed.sum()),
        removed_mass=float(removed.sum()),
        removed_top=tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True) if v > 0),
    )
