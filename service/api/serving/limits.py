"""The price of a request's work, decided at admission: refused with a 400 naming the field before any work.

Fill-mask: the sequences a request will forward in all (:func:`fill_rows`), against MASKSERVE_MAX_FILL_ROWS.
Generation: a grammar's size (schema bytes and properties, regex length), which bounds its compile.
Prompt tokens, ``max_new_tokens``, ``top_k``, ``inputs`` and ``targets`` have limits of their own, checked where
the request is turned into a job.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from service.config import Settings
from service.engine.fill.job import FillInput, Target
from service.engine.fill.search import MIN_BEAMS
from service.errors import InvalidRequest
from service.masks.output import OutputMaskSpec


def whole_word_rows(top_k: int, max_pieces: int, *, rerank: bool = False) -> int:
    """Rows one mask's whole-word search forwards: step 0 reads one row per length, step j >= 1 reads
    ``beam`` rows for each length still growing (``max_pieces - j`` of them): P + B * P(P-1)/2; the rerank
    reads one causal row per answer: top_k more."""
    beam = max(top_k, MIN_BEAMS)
    return max_pieces + beam * max_pieces * (max_pieces - 1) // 2 + (top_k if rerank else 0)


def fill_rows(
    inputs: Sequence[FillInput],
    *,
    top_k: int,
    targets: Sequence[Target] | None,
    whole_word: bool,
    max_pieces: int,
    reranks: Callable[[FillInput], bool] = lambda inp: False,
) -> int:
    """Every sequence a fill-mask job forwards, all rounds together (its worst case: searches stop no earlier).
    ``reranks``: whether the model reranks an input's whole-word fills (``FillMaskCodec.reranks``)."""
    if whole_word and targets is None:
        return sum(whole_word_rows(top_k, max_pieces, rerank=reranks(inp)) * len(inp.slots) for inp in inputs)
    # one row per target sub-token, or one per mask
    per_mask = sum(max(len(t.spaced), len(t.bare)) for t in targets) if targets is not None else 1
    return per_mask * sum(len(inp.slots) for inp in inputs)


def check_fill_cost(rows: int, settings: Settings, *, whole_word: bool, targets: bool, n_inputs: int) -> None:
    if rows <= settings.max_fill_rows:
        return
    if targets:
        param, change = "parameters.targets", "fewer or shorter targets"
    elif whole_word:
        param, change = "parameters.top_k", "a smaller top_k or max_word_tokens, or fewer masks"
    else:
        param, change = "inputs", "fewer masks"
    if n_inputs > 1:
        change += ", or fewer inputs"
    raise InvalidRequest(
        f"this request would forward {rows} sequences (masks x beams x widths); this server allows "
        f"{settings.max_fill_rows} (MASKSERVE_MAX_FILL_ROWS): ask for {change}",
        param=param,
        code="too_costly",
    )


def count_properties(schema: Any) -> int:
    """Properties declared anywhere in a JSON schema (every nesting level, definitions included)."""
    count = 0
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in ("properties", "patternProperties"):
                if isinstance(node.get(key), dict):
                    count += len(node[key])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def check_grammar_cost(spec: OutputMaskSpec, settings: Settings) -> None:
    """Refuse a grammar too large to compile in bounded time (400 naming the field)."""
    if spec.regex is not None and len(spec.regex) > settings.max_regex_chars:
        raise InvalidRequest(
            f"the regex has {len(spec.regex)} characters; at most {settings.max_regex_chars} "
            "(MASKSERVE_MAX_REGEX_CHARS)",
            param=spec.param("regex"),
            code="too_costly",
        )
    if spec.json_schema is None:
        return
    size = len(spec.json_schema.encode("utf-8"))
    if size > settings.max_json_schema_bytes:
        raise InvalidRequest(
            f"the JSON schema is {size} bytes; at most {settings.max_json_schema_bytes} "
            "(MASKSERVE_MAX_JSON_SCHEMA_BYTES)",
            param=spec.param("json_schema"),
            code="too_costly",
        )
    properties = count_properties(json.loads(spec.json_schema))
    if properties > settings.max_json_schema_properties:
        raise InvalidRequest(
            f"the JSON schema declares {properties} properties; at most {settings.max_json_schema_properties} "
            "(MASKSERVE_MAX_JSON_SCHEMA_PROPERTIES)",
            param=spec.param("json_schema"),
            code="too_costly",
        )
