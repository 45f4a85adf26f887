"""The int8 model's activation dtype: bfloat16 against float32 on this CPU, the engine's own decode step.

    .venv/bin/python bench/int8_activations.py            # bundled SmolLM2-135M-Instruct, 2 threads, 3 rounds

Under int8 the activations between the products (embeddings, norms, attention, the KV cache) take the float
dtype whose GEMM this device runs faster (``activation_dtype`` in service/engine/precision.py). This loads
the int8 model twice through ``load_model``, once with each dtype forced (nothing else differs), and times in
alternated rounds: the fused decode step (service/engine/fused_decoder.py) at 1, 8 and 32 rows on the
engine's cache, and one prefill of 32 prompts (transformers' forward, the dense copy). Medians of the rounds;
the ratio is bfloat16's time over float32's (above 1: float32 is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from service.config import Precision, load_settings
from service.engine import precision as precision_mod
from service.engine.kv_cache import BatchKVCache
from service.engine.loading import LoadedModel, load_model

PROMPT = "Write a short story about a cat who learns to cook dinner for the whole village on a rainy day."
DTYPES = (torch.bfloat16, torch.float32)


def load(dtype: torch.dtype) -> LoadedModel:
    with mock.patch.object(precision_mod, "fastest_dense_dtype", return_value=dtype):
        loaded = load_model(load_settings(adapter="none", precision=Precision.INT8))
    assert loaded.dtype == dtype
    return loaded


def prefill(loaded: LoadedModel, ids: torch.Tensor) -> tuple[BatchKVCache, torch.Tensor, float]:
    model = loaded.generation_model
    assert model is not None
    cache = BatchKVCache(int(model.config.num_hidden_layers))
    started = time.perf_counter()
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1].argmax(-1), time.perf_counter() - started


@torch.inference_mode()
def decode(loaded: LoadedModel, rows: int, steps: int) -> float:
    """Median seconds of ``steps`` greedy fused steps of ``rows`` rows after one prefill."""
    decoder = loaded.decoder
    assert decoder is not None, "the fused step does not apply to this model"
    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]] * rows)  # (B, T)
    cache, token, _ = prefill(loaded, ids)
    position = torch.full((rows,), ids.shape[1])  # (B,)
    times = []
    for _ in range(steps):
        mask = torch.ones(rows, 1, 1, cache.width + 1, dtype=torch.bool)  # (B, 1, 1, S): every key
        started = time.perf_counter()
        logits = decoder.step(token, mask, position, cache)
        times.append(time.perf_counter() - started)
        token, position = logits.argmax(-1), position + 1
    return statistics.median(times[2:])


@torch.inference_mode()
def prefill_time(loaded: LoadedModel, rows: int) -> float:
    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]] * rows)  # (B, T)
    return prefill(loaded, ids)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="decode steps a measurement (the first 2 dropped)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {dtype: load(dtype) for dtype in DTYPES}
    print(f"int8, torch threads {torch.get_num_threads()}, this CPU's faster GEMM: "
          f"{str(precision_mod.fastest_dense_dtype()).removeprefix('torch.')}")  # fmt: skip
    cases = [(f"decode step, {b} row{'s' if b > 1 else ''} (ms)", lambda m, b=b: decode(m, b, args.steps)) for b in
             (1, 8, 32)] + [("prefill, 32 prompts (ms)", lambda m: prefill_time(m, 32))]  # fmt: skip
    results: dict[tuple[str, torch.dtype], list[float]] = {}
    for index in range(args.rounds):
        for name, measure in cases:
            for dtype in DTYPES if index % 2 == 0 else DTYPES[::-1]:  # alternate which goes first
                results.setdefault((name, dtype), []).append(measure(models[dtype]) * 1000)
        print(f"  round {index + 1} done")
    print("\n| measure | bfloat16 activations | float32 activations | bfloat16 / float32 |")
    print("|---|--:|--:|--:|")
    for name, _ in cases:
        bf16, f32 = (statistics.median(results[name, dtype]) for dtype in DTYPES)
        print(f"| {name} | {bf16:.1f} | {f32:.1f} | {bf16 / f32:.2f}× |")


if __name__ == "__main__":
    main()
