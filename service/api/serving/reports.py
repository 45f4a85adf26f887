"""Mask reports: every mask a request caused, as JSON-ready data (``/v1/masks``, ``return_masks``).

Reports are assembled from what the job already holds (the masks the engine compiled once, when the job was
submitted), never re-derived: the attention rows are the request's own compiled structure, the output kinds
its compiled output mask's, the output steps what the decode loop recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from service.api.serving.generate import EncodedPrompt
from service.engine.fill.job import FillMaskJob
from service.engine.generate import GenerationJob, GenerationResult
from service.masks.attention import bidirectional_mask, causal_mask
from service.masks.constraints import AttentionConstraints, TokenSpan
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


def generate_report(
    job: GenerationJob, encoded: EncodedPrompt, decode: Decode, *, dense: bool, result: GenerationResult | None = None
) -> dict[str, Any]:
    """``job`` must be compiled (``GenerationScheduler.compile``): the report shows the compiled masks."""
    assert job.compiled, "mask reports read the compiled masks"
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
        "request_id": job.request_id,
        "endpoint": "generate",
        "text": encoded.text,
        "tokens": [
            {"index": i, "id": tid, "text": decode([tid]), "start": a, "end": b}
            for i, (tid, (a, b)) in enumerate(zip(job.prompt_ids, encoded.offsets, strict=True))
        ],
        "input": None,  # generation replaces no input tokens
        "attention": attention_report(
            structure,
            "causal",
            positions,
            dense=dense,
            decode_keys=run_length_rows(decode_keys[None, :])[0],
            key_bias=att.key_bias.tolist() if att is not None and att.key_bias is not None else None,
            constraints=constraints_report(job.constraints),
        ),
        "output": {"kinds": list(job.compiled_output.kinds) if job.compiled_output else [], "steps": steps},
    }


def fill_mask_report(job: FillMaskJob, mask_token: str, decode: Decode, mntp: bool, *, dense: bool) -> dict[str, Any]:
    """``job`` must be compiled (``FillMaskWorker.compile``): the report shows each input's compiled masks."""
    inputs = []
    for fi in job.inputs:
        n = len(fi.ids)
        att = fi.compiled.base if fi.compiled is not None else None  # padding is not part of a request
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
                    constraints=constraints_report(fi.attention or AttentionConstraints()),
                ),
            }
        )
    first = inputs[0]
    return {
        "request_id": job.request_id,
        "endpoint": "fill-mask",
        "text": first["text"],
        "tokens": first["tokens"],
        "input": first["input"],
        "attention": first["attention"],
        "output": {"kinds": [job.output_kind], "steps": None},
        "inputs": inputs,
    }
