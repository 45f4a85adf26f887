"""Where one stream's decode step goes: the bare model forward for one new token, without the server.

    .venv/bin/python bench/decode_step.py            # bundled SmolLM2-135M-Instruct, the served precision

Prints the median time of a one-token decode step (20 steps after one prefill, alternated over 3 rounds) in
the served precision (``MASKSERVE_PRECISION``; int8 by default on CPU) two ways: transformers' forward with its
own cache, and the engine's fused step (service/engine/fused_decoder.py) on the engine's cache; then the
operators that take the fused step's time (torch.profiler, 5 steps, the prefill left out).
"""

from __future__ import annotations

import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from service.config import load_settings
from service.engine.kv_cache import BatchKVCache
from service.engine.loading import LoadedModel, load_model

PROMPT = "Why is the sky blue? Explain it in detail, please."


def decode_steps(model: Any, ids: torch.Tensor, steps: int) -> list[float]:
    """transformers' forward: prefill, then ``steps`` greedy one-token forwards; seconds per step."""
    times = []
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            started = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - started)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return times


def fused_steps(
    loaded: LoadedModel, ids: torch.Tensor, steps: int, around_steps: AbstractContextManager[Any] | None = None
) -> list[float]:
    """The engine's fused step: prefill through transformers into the engine's cache, then ``steps`` greedy
    one-token steps (inside ``around_steps``, a profiler say); seconds per step."""
    model, decoder = loaded.generation_model, loaded.decoder
    assert model is not None
    assert decoder is not None, "the fused step does not apply to this model"
    times = []
    with torch.inference_mode():
        cache = BatchKVCache(int(model.config.num_hidden_layers))
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        token, position = out.logits[:, -1].argmax(-1), torch.tensor([ids.shape[1]])  # (1,), (1,)
        with around_steps or nullcontext():
            for _ in range(steps):
                mask = torch.ones(1, 1, 1, cache.width + 1, dtype=torch.bool)  # (B, 1, 1, S): every key
                started = time.perf_counter()
                logits = decoder.step(token, mask, position, cache)
                times.append(time.perf_counter() - started)
                token, position = logits.argmax(-1), position + 1
    return times


def main() -> None:
    loaded = load_model(load_settings(adapter="none"))
    model = loaded.generation_model
    assert model is not None
    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]])
    print(f"model {loaded.name}, precision {loaded.precision.value}, torch threads {torch.get_num_threads()}")
    rounds: dict[str, list[float]] = {"transformers": [], "fused": []}
    for _ in range(3):
        rounds["transformers"].append(statistics.median(decode_steps(model, ids, 20)) * 1000)
        rounds["fused"].append(statistics.median(fused_steps(loaded, ids, 20)) * 1000)
    prof = profile(activities=[ProfilerActivity.CPU])
    fused_steps(loaded, ids, 5, around_steps=prof)  # the steps alone, not the prefill
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    for name, values in rounds.items():
        print(f"{name:12s} one-token decode step, medians of 20 a round: {', '.join(f'{v:.1f}' for v in values)} ms")
    ratio = statistics.median(rounds["transformers"]) / statistics.median(rounds["fused"])
    print(f"fused step: {ratio:.2f}x as fast as transformers' ({loaded.precision.value})")


if __name__ == "__main__":
    main()
