"""Where int8 weight-only stops paying: one SmolLM2 layer's matmuls (and the LM head) by number of rows.

    .venv/bin/python bench/int8_crossover.py                # 2 threads, rows 1..512, 3 rounds
    .venv/bin/python bench/int8_crossover.py --threads 1

For each row count (batch x tokens of a forward), the time of ``torch._weight_int8pack_mm`` (int8 weights,
per-channel scales, bfloat16 activations) against GEMM on the de-quantized copy as the server keeps it
(bfloat16, or float32 where that GEMM is faster: ``fastest_dense_dtype``, casts included), for the matmul
shapes of one SmolLM2-135M decoder layer as the fused decode step runs them (q/k/v stacked, o, gate/up
stacked, down) times its 30 layers, plus the LM head. Rounds alternate the two kernels; medians are printed
with the ratio. The row count where the copy becomes faster is what ``service/engine/precision.py`` uses as
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


def run_layer(layer: list[Int8Linear], inputs: list[torch.Tensor], dense: bool) -> None:
    for mod, inp in zip(layer, inputs, strict=True):
        if dense:
            run_dense(mod, inp)
        else:
            torch._weight_int8pack_mm(inp, mod.qweight, mod.scales)


def run_dense(mod: Int8Linear, x: torch.Tensor) -> None:
    assert mod.dense is not None
    torch.nn.functional.linear(x.to(mod.dense.dtype), mod.dense).to(torch.bfloat16)  # as Int8Linear.forward


def run_head(head: Int8Linear, x: torch.Tensor, dense: bool) -> None:
    if dense:
        run_dense(head, x)
    else:
        torch._weight_int8pack_mm(x, head.qweight, head.scales)


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
    rows_list = [int(r) for r in args.rows.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads, the copy in {name}, load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"| rows | layers int8 (ms) | layers {name} (ms) | ratio | head int8 (ms) | head {name} (ms) | ratio |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    crossover = None
    with torch.inference_mode():
        for rows in rows_list:
            reps = max(2, int(64 / rows**0.5))
            x = torch.randn(rows, HIDDEN, dtype=torch.bfloat16)
            xi = torch.randn(rows, INTER, dtype=torch.bfloat16)
            inputs = [xi if i == INTER else x for _, i in LAYER_SHAPES]
            res: dict[str, list[float]] = {"li": [], "ld": [], "hi": [], "hd": []}
            for _ in range(args.rounds):
                for dense, lk, hk in ((False, "li", "hi"), (True, "ld", "hd")):
                    res[lk].append(timed(partial(run_layer, layer, inputs, dense), reps) * LAYERS * 1e3)
                    res[hk].append(timed(partial(run_head, head, x, dense), reps) * 1e3)
            m = {k: statistics.median(v) for k, v in res.items()}
            total_i, total_d = m["li"] + m["hi"], m["ld"] + m["hd"]
            if crossover is None and total_d < total_i:
                crossover = rows
            print(f"| {rows} | {m['li']:.2f} | {m['ld']:.2f} | {m['ld'] / m['li']:.2f} | {m['hi']:.2f} | "
                  f"{m['hd']:.2f} | {m['hd'] / m['hi']:.2f} |", flush=True)  # fmt: skip
    print(f"\n{name} GEMM is faster (layers + head) from {crossover} rows; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
