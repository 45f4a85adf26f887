"""Why all model work runs on one thread: torch's speed once a second thread has run parallel work.

    .venv/bin/python bench/threads.py          # both parts, each in a fresh process

Prints, side by side: a small matrix-vector product (576 x 1536, as in SmolLM2's MLP) timed in thread A while
A is the only thread that has computed, then in A and B after thread B has computed too; and one SmolLM2
decode step (transformers' cache) in the thread that loaded the model and in another thread.
Every thread that runs a parallel region keeps its own OpenMP team; with more team threads than cores libgomp
throttles their spin-waits (service/engine/compute.py).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import service/ and bench/ from anywhere

from bench.decode_step import PROMPT, decode_steps  # noqa: E402
from service.config import load_settings  # noqa: E402
from service.engine.loading import load_model  # noqa: E402


def gemv_us(n: int = 2000) -> float:
    weight, x = torch.randn(1536, 576), torch.randn(1, 576)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        x @ weight.T
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def gemv_part() -> None:
    a, b = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    alone = a.submit(gemv_us).result()
    b_after = b.submit(gemv_us).result()
    a_after = a.submit(gemv_us).result()
    print(f"576x1536 matrix-vector, median: thread A alone {alone:.0f} us; after thread B computed too: "
          f"B {b_after:.0f} us, A {a_after:.0f} us")  # fmt: skip


def decode_part() -> None:
    loader, other = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    loaded = loader.submit(load_model, load_settings(adapter="none")).result()
    model = loaded.generation_model
    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]])
    own = statistics.median(loader.submit(decode_steps, model, ids, 20).result()) * 1e3
    elsewhere = statistics.median(other.submit(decode_steps, model, ids, 20).result()) * 1e3
    print(f"SmolLM2 decode step, median of 20: in the loading thread {own:.1f} ms, "
          f"in another thread afterwards {elsewhere:.1f} ms")  # fmt: skip


def main() -> None:
    """Each part in a fresh process: the teams of one part would slow the other."""
    if len(sys.argv) > 1:
        {"gemv": gemv_part, "decode": decode_part}[sys.argv[1]]()
        return
    for part in ("gemv", "decode"):
        subprocess.run([sys.executable, __file__, part], check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
