"""The int8 model's decode step, two ways in one process: the activation dtype, or whose kernels multiply.

    .venv/bin/python bench/int8_decode.py                     # activations: bfloat16 against float32
    .venv/bin/python bench/int8_decode.py --compare kernel    # torch's kernels against int8_kernels.c

Both load the bundled SmolLM2-135M-Instruct in int8 twice through ``load_model``, with one thing forced
differently (nothing else differs), and time in alternated rounds on 2 threads:

- ``activations``: the float dtype of the activations between the products (embeddings, norms, attention, the KV
  cache), ``activation_dtype`` in service/engine/precision.py. The fused decode step
  (service/engine/fused_decoder.py) at 1, 8 and 32 rows on the engine's cache, and one prefill of 32 prompts
  (transformers' forward, the dense copy).
- ``kernel``: float32 activations, and ``MASKSERVE_INT8_KERNELS`` false against true: decode steps below 16 rows
  on torch's ``_weight_int8pack_mm`` (bfloat16 casts around it) or int8_kernels.c's float32 product, decode
  batches from 16 rows on ``torch._int_mm`` or its VNNI product (each where the load-time timing picks int8
  GEMM). The fused step at 1, 4, 8, 15 and 32 rows.

Medians of the rounds; the ratio is the first variant's time over the second's (above 1: the second is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

from service.config import Precision, load_settings
from service.engine import precision as precision_mod
from service.engine.kv_cache import BatchKVCache
from service.engine.loading import LoadedModel, load_model

PROMPT = "Write a short story about a cat who learns to cook dinner for the whole village on a rainy day."


def load(dtype: torch.dtype, *, own_kernels: bool) -> LoadedModel:
    with mock.patch.object(precision_mod, "fastest_dense_dtype", return_value=dtype):
        loaded = load_model(load_settings(adapter="none", precision=Precision.INT8, int8_kernels=own_kernels))
    assert loaded.dtype == dtype
    return loaded


# --compare -> (column name, loader) for the two variants, and the decode rows to time.
VARIANTS: dict[str, tuple[list[tuple[str, Callable[[], LoadedModel]]], tuple[int, ...]]] = {
    "activations": ([("bfloat16 activations", lambda: load(torch.bfloat16, own_kernels=True)),
                     ("float32 activations", lambda: load(torch.float32, own_kernels=True))], (1, 8, 32)),
    "kernel": ([("torch's kernels", lambda: load(torch.float32, own_kernels=False)),
                ("int8_kernels.c", lambda: load(torch.float32, own_kernels=True))], (1, 4, 8, 15, 32)),
}  # fmt: skip


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
    parser.add_argument("--compare", choices=sorted(VARIANTS), default="activations")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="decode steps a measurement (the first 2 dropped)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaders, rows = VARIANTS[args.compare]
    names = [name for name, _ in loaders]
    models = {name: loader() for name, loader in loaders}
    print(f"int8, torch threads {torch.get_num_threads()}, this CPU's faster GEMM: "
          f"{str(precision_mod.fastest_dense_dtype()).removeprefix('torch.')}")  # fmt: skip
    cases = [(f"decode step, {b} row{'s' if b > 1 else ''} (ms)", lambda m, b=b: decode(m, b, args.steps)) for b in
             rows]  # fmt: skip
    if args.compare == "activations":
        cases.append(("prefill, 32 prompts (ms)", lambda m: prefill_time(m, 32)))
    results: dict[tuple[str, str], list[float]] = {}
    for index in range(args.rounds):
        for case, measure in cases:
            for name in names if index % 2 == 0 else names[::-1]:  # alternate which goes first
                results.setdefault((case, name), []).append(measure(models[name]) * 1000)
        print(f"  round {index + 1} done")
    print(f"\n| measure | {names[0]} | {names[1]} | ratio |")
    print("|---|--:|--:|--:|")
    for case, _ in cases:
        first, second = (statistics.median(results[case, name]) for name in names)
        print(f"| {case} | {first:.1f} | {second:.1f} | {first / second:.2f}× |")


if __name__ == "__main__":
    main()
