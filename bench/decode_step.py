"""Where one stream's decode step goes: the bare model forward for one new token, without the server.

    .venv/bin/python bench/decode_step.py            # bundled SmolLM2-135M-Instruct, served precision then bfloat16

Prints the median time of a one-token decode step (transformers' own cache, 20 steps) in the served precision
(``MASKSERVE_PRECISION``; int8 by default on CPU) and after a cast to bfloat16, and the operators that take
the served step's time (torch.profiler, 5 steps).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from service.config import load_settings
from service.engine.loading import load_model

PROMPT = "Why is the sky blue? Explain it in detail, please."


def decode_steps(model: Any, ids: torch.Tensor, steps: int) -> list[float]:
    """Prefill, then ``steps`` greedy one-token forwards; seconds per step."""
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


def main() -> None:
    loaded = load_model(load_settings(adapter="none"))
    model = loaded.generation_model
    assert model is not None
    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]])
    print(f"model {loaded.name}, precision {loaded.precision.value}, torch threads {torch.get_num_threads()}")
    served = statistics.median(decode_steps(model, ids, 20)) * 1000
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_steps(model, ids, 5)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    bf16 = statistics.median(decode_steps(model.to(torch.bfloat16), ids, 20)) * 1000
    print(f"one-token decode step, median of 20: {loaded.precision.value} {served:.1f} ms, bfloat16 {bf16:.1f} ms")


if __name__ == "__main__":
    main()
