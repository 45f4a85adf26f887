"""Mask reports: every mask a request caused, as JSON-ready data (``/v1/masks``, ``return_masks``).

Reports are assembled from what the job already holds (the engine's own masks, built by ``service/masks``),
never re-derived: the attention rows are the request's own structure, the output steps what the decode
loop recorded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch

from service.engine.fill_mask import FillMaskJob
from service.engine.generate import GenerationJob, GenerationResult
from service.masks.attention import (
    AttentionConstraints,
    TokenSpan,
    bidirectional_mask,
    causal_mask,
    request_attention,
)
from service.masks.inspect import run_length_rows

DENSE_LIMIT = 512
Decode = Callable[[list[int]], str]


def token_decoder(tokenizer: Any) -> Decode:
    """Token ids -> text, special tokens kept (inspection shows exactly what the model saw)."""
    return lambda ids: str(tokenizer.decode(ids))  # the dense matrix is offered only up to this many tokens


def _spans(spans: tuple[TokenSpan, ...]) -> list[list[int]]:
    return [[s.start, s.end] for s in spans]


def constraints_report(c: AttentionConstraints) -> dict[str, Any]:
    return {
        "exclude": _spans(c.exclude),
        "isolate": _spans(c.isolate),
        "restart_positions": c.restart_positions,
        "emphasis": _spans(c.emphasis),
        "emphasis_factor": c.emphasis_factor,
        "emphasis_layers": list(c.emphasis_layers) if c.emphasis_layers is not None else None,
        "emphasis_heads": list(c.emphasis_heads) if c.emphasis_heads is not None else None,
    }


def attention_report(
    structure: torch.Tensor, kind: str, positions: torch.Tensor, *, dense: bool, **extra: Any
) -> dict[str, Any]:
    """(T, S) bool structure -> run-length rows (and the dense matrix when asked and small enough)."""
    t, s = structure.shape
    return {
        "type": kind,
        "query_length": t,
        "key_length": s,
        "rows": run_length_rows(structure),
        "dense": structure.int().tolist() if dense and max(t, s) <= DENSE_LIMIT else None,
        "position_ids": positions.tolist(),
        **extra,
    }


def output_kinds(job: GenerationJob) -> list[str]:
    spec = job.output_mask
    return [
        f.name for f in fields(spec) if f.name != "param_names" and getattr(spec, f.name) not in (None, (), 0, False)
    ]


def generate_report(
    request_id: str,
    text: str,
    offsets: list[tuple[int, int]],
    constraints: AttentionConstraints,
    job: GenerationJob,
    decode: Decode,
    *,
    dense: bool,
    result: GenerationResult | None = None,
) -> dict[str, Any]:
    n = len(job.prompt_ids)
    att = job.attention
    structure = att.structure if att is not None and att.structure is not None else causal_mask(n)  # (T, T)
    positions = att.positions if att is not None and att.positions is not None else torch.arange(n)  # (T,)
    decode_keys = (
        att.decode_keys if att is not None and att.decode_keys is not None else torch.ones(n, dtype=torch.bool)
    )
    steps = None
    if result is not None and result.mask_steps is not None:
        steps = [
            {
                "step": st.step,
                "token_id": st.token_id,
                "token": decode([st.token_id]),
                "allowed": st.allowed,
                "removed_mass": st.removed_mass,
                "removed_top": [{"id": i, "text": decode([i]), "prob": p} for i, p in st.removed_top],
            }
            for st in result.mask_steps
        ]
    return {
        "request_id": request_id,
        "endpoint": "generate",
        "text": text,
        "tokens": [
            {"index": i, "id": tid, "text": decode([tid]), "start": a, "end": b}
            for i, (tid, (a, b)) in enumerate(zip(job.prompt_ids, offsets, strict=True))
        ],
        "input": None,  # generation replaces no input tokens
        "attention": attention_report(
            structure,
            "causal",
            positions,
            dense=dense,
            decode_keys=run_length_rows(decode_keys[None, :])[0],
            key_bias=att.key_bias.tolist() if att is not None and att.key_bias is not None else None,
            constraints=constraints_report(constraints),
        ),
        "output": {"kinds": output_kinds(job), "steps": steps},
    }


def fill_mask_report(
    request_id: str,
    job: FillMaskJob,
    mask_token: str,
    decode: Decode,
    mntp: bool,
    *,
    dense: bool,
    dims: tuple[int, int],
) -> dict[str, Any]:
    """``dims``: the model's (layers, heads), which size the scope of emphasis on chosen layers/heads."""
    inputs = []
    for fi in job.inputs:
        n = len(fi.ids)
        constraints = fi.attention or AttentionConstraints()
        # the same builder the forward uses (service/masks/fill.py); padding is not part of a request
        att = request_attention(n, constraints, torch.float32, causal=False, n_layers=dims[0], n_heads=dims[1])
        structure = att.structure if att is not None and att.structure is not None else bidirectional_mask(n)
        positions = att.positions if att is not None and att.positions is not None else torch.arange(n)
        offsets: Sequence[tuple[int | None, int | None]] = fi.offsets or [(None, None)] * n  # slow tokenizer
        inputs.append(
            {
                "text": fi.text,
                "tokens": [
                    {"index": i, "id": t, "text": decode([t]), "start": a, "end": b}
                    for i, (t, (a, b)) in enumerate(zip(fi.ids, offsets, strict=True))
                ],
                "input": {"masked": [{"index": s.index, "token": mask_token, "written": s.written} for s in fi.slots]},
                "attention": attention_report(
                    structure,  # (T, T)
                    "bidirectional",
                    positions,  # (T,)
                    dense=dense,
                    # MNTP reads the prediction for position i from the output at i-1 (LLM2Vec)
                    read_offset=-1 if mntp else 0,
                    key_bias=att.key_bias.tolist() if att is not None and att.key_bias is not None else None,
                    constraints=constraints_report(constraints),
                ),
            }
        )
    first = inputs[0]
    return {
        "request_id": request_id,
        "endpoint": "fill-mask",
        "text": first["text"],
        "tokens": first["tokens"],
        "input": first["input"],
        "attention": first["attention"],
        "output": {
            "kinds": [m.name for m in job.applied_masks if m.kind == "output"] if job.applied_masks else [],
            "steps": None,
        },
        "inputs": inputs,
    }


class MaskStore:
    """The most recent requests' mask reports (built lazily: only what GET /v1/masks/{id} asks for is computed)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Callable[[bool], dict[str, Any]]] = OrderedDict()

    def put(self, request_id: str, build: Callable[[bool], dict[str, Any]]) -> None:
        if self.capacity <= 0:
            return
        self._items[request_id] = build
        self._items.move_to_end(request_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, request_id: str) -> Callable[[bool], dict[str, Any]] | None:
        return self._items.get(request_id)
