"""Training data: plain text or JSONL, a deterministic train/validation split, seeded shuffling.

- ``.txt``: one example per non-empty line (mlm, mntp);
- ``.jsonl``: one object per line, ``{"text": ...}`` (mlm, mntp) or ``{"prompt": ..., "response": ...}`` /
  ``{"messages": [{"role", "content"}, ...]}`` (sft; the last assistant message is the response).

The split and every epoch's order derive from the seed alone, so a resumed or a multi-process run sees
exactly the batches a single uninterrupted run would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ChatExample:
    messages: list[dict[str, str]]  # the prompt: every message before the response
    response: str


Example = str | ChatExample


def _chat_example(obj: dict[str, Any], where: str) -> ChatExample:
    if "messages" in obj:
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in obj["messages"]]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: 'messages' must end with an assistant message (the response)")
        return ChatExample(messages[:-1], messages[-1]["content"])
    if "prompt" in obj and "response" in obj:
        return ChatExample([{"role": "user", "content": str(obj["prompt"])}], str(obj["response"]))
    raise ValueError(f"{where}: an sft example needs 'prompt' and 'response', or 'messages'")


def read_examples(path: Path, *, chat: bool) -> list[Example]:
    """Read a .txt or .jsonl file; ``chat`` selects prompt/response examples (sft) over plain text."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        examples: list[Example] = []
        for n, line in enumerate(lines, 1):
            obj = json.loads(line)
            if chat:
                examples.append(_chat_example(obj, f"{path}:{n}"))
            elif "text" in obj:
                examples.append(str(obj["text"]))
            else:
                raise ValueError(f"{path}:{n}: a text example needs a 'text' field")
    elif chat:
        raise ValueError("sft data must be JSONL with prompt/response or messages")
    else:
        examples = [line.strip() for line in lines]
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def split_indices(n: int, val_fraction: float, val_max: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded permutation: its first part trains, its last ``val`` items validate (at least one each)."""
    if n < 2:
        raise ValueError("need at least two examples (one to train on, one to validate)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(n * val_fraction)), val_max, n - 1)
    return perm[: n - n_val], perm[n - n_val :]


def batch_indices(
    n: int, batch_size: int, seed: int, step: int, lengths: list[int] | None = None, bucket: int = 64
) -> list[int]:
    """The example indices of global batch ``step``: epochs are seeded permutations, read in order.

    A batch never straddles two epochs (the remainder of an epoch is dropped), so batch ``step`` depends on
    (n, batch_size, seed, step, lengths) only: resuming at any step reproduces the same stream. With
    ``lengths``, each run of ``bucket`` consecutive batches is re-cut by example length (and the batches
    of the run put in a seeded order), so a batch pads little: on a CPU every padded token costs as
    much as a real one.
    """
    if batch_size > n:
        raise ValueError(f"batch of {batch_size} exceeds the {n} training examples")
    per_epoch = n // batch_size
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    if lengths is None:
        return perm[offset * batch_size : (offset + 1) * batch_size]
    first = offset - offset % bucket  # the run of batches this step belongs to
    last = min(first + bucket, per_epoch)
    run = sorted(perm[first * batch_size : last * batch_size], key=lambda i: lengths[i])
    order = torch.randperm(last - first, generator=torch.Generator().manual_seed(seed * 7919 + epoch * 131 + first))
    k = int(order[offset - first])
    return run[k * batch_size : (k + 1) * batch_size]


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This process's share of a global batch (DDP): every ``world_size``-th item from ``rank``."""
    return indices[rank::world_size]


def chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
