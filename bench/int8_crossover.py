"""Where int8 weight-only stops paying: one SmolLM2 layer's matmuls (and the LM head) by number of rows.

    .venv/bin/python bench/int8_crossover.py                # 2 threads, rows 1..512, 3 rounds
    .venv/bin/python bench/int8_crossover.py --threads 1

For each row count (batch x tokens of a forward), the time of the three products an ``Int8Linear`` can run
(service/engine/precision.py): ``torch._weight_int8pack_mm`` (int8 weights, per-channel scales, bfloat16
activations), int8 GEMM (``Int8Linear.int8_product``: the rows quantized a scale each, ``torch._int_mm``), and
GEMM on the de-quantized copy as the server keeps it (bfloat16, or float32 where that GEMM is faster:
``fastest_dense_dtype``, casts included), for the matmul shapes of one SmolLM2-135M decoder layer as the fused
decode step runs them (q/k/v stacked, o, gate/up stacked, down) times its 30 layers, plus the LM head. Rounds
alternate the kernels; medians of layers + head are printed, with each against the weight-only kernel. The
row count where another kernel becomes faster is what ``service/engine/precision.py`` uses as
``DENSE_FROM_ROWS``. Random weights: only the shapes matter to speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.engine.precision import Int8Linear, fastest_dense_dtype  # noqa: E402

HIDDEN, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
LAYER_SHAPES = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]  # (out, in)
KERNELS = ("weight_only", "int8_gemm", "dense")


def product(mod: Int8Linear, x: torch.Tensor, kernel: str) -> None:
    """One product as Int8Linear.forward runs it."""
    if kernel == "weight_only":
        torch._weight_int8pack_mm(x, mod.qweight, mod.scales)
    elif kernel == "int8_gemm":
        mod.int8_product(x)
    else:
        assert mod.dense is not None
        torch.nn.functional.linear(x.to(mod.dense.dtype), mod.dense).to(torch.bfloat16)


def run_model(layer: list[Int8Linear], head: Int8Linear, inputs: list[torch.Tensor], kernel: str) -> None:
    for _ in range(LAYERS):
        for mod, inp in zip(layer, inputs, strict=True):
            product(mod, inp, kernel)
    product(head, inputs[0], kernel)


def timed(fn: Callable[[], None], reps: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", default="1,2,4,8,16,32,48,64,96,128,256,512")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    copy = fastest_dense_dtype()
    layer = [Int8Linear(torch.randn(o, i) * 0.02, None, dense_from_rows=1, dense_dtype=copy) for o, i in LAYER_SHAPES]
    head = Int8Linear(torch.randn(VOCAB, HIDDEN) * 0.02, None, dense_from_rows=1, dense_dtype=copy)
    name = str(copy).removeprefix("torch.")
    print(f"torch {torch.__version__}, {args.threads} threads, the copy in {name}, load average "
          f"{os.getloadavg()[0]:.1f}; 30 layers + the LM head, ms")  # fmt: skip
    print(f"| rows | weight-only int8 | int8 GEMM | ratio | {name} copy | ratio |")
    print("|--:|--:|--:|--:|--:|--:|")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            reps = max(1, int(16 / rows**0.5))
            x = torch.randn(rows, HIDDEN, dtype=torch.bfloat16)
            xi = torch.randn(rows, INTER, dtype=torch.bfloat16)
            inputs = [xi if i == INTER else x for _, i in LAYER_SHAPES]
            res: dict[str, list[float]] = {k: [] for k in KERNELS}
            for _ in range(args.rounds):
                for kernel in KERNELS:
                    res[kernel].append(timed(partial(run_model, layer, head, inputs, kernel), reps) * 1e3)
            m = {k: statistics.median(v) for k, v in res.items()}
            w = m["weight_only"]
            print(f"| {rows} | {w:.2f} | {m['int8_gemm']:.2f} | {m['int8_gemm'] / w:.2f} | {m['dense']:.2f} | "
                  f"{m['dense'] / w:.2f} |", flush=True)  # fmt: skip
    print(f"\nload average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
