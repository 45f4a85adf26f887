"""What OMP_WAIT_POLICY costs a decode step: one bundled-model step (the served precision, int8 on CPU) on
the compute thread, as the server runs it, under each policy in its own process (libgomp reads it once).

    .venv/bin/python bench/omp_policy.py            # unset, ACTIVE, PASSIVE; 3 rounds of 30 steps each

Prints, per policy, the median step time of each round: the bare transformers step (``bench/decode_step.py``'s
loop) and the engine's ``DecodeBatch.step`` with one row. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child() -> None:
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    import statistics

    import torch

    sys.path.insert(0, str(HERE))
    import generate as bench_generate  # the cache-step helper of bench/generate.py
    from decode_step import PROMPT, decode_steps

    from service.config import load_settings
    from service.engine.compute import ComputeThread, keep_single_threaded
    from service.engine.loading import load_model

    keep_single_threaded()
    bench_generate.COMPUTE.append(ComputeThread())
    loaded = bench_generate.in_worker(lambda: load_model(load_settings(adapter="none")))
    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]])
    for r in range(3):
        bare = bench_generate.in_worker(
            lambda: statistics.median(decode_steps(loaded.generation_model, ids, 30)) * 1000
        )
        engine = bench_generate.cache_step_ms(loaded, 1, 30, cat=False)
        print(f"{policy:<8} round {r + 1}: bare step {bare:6.1f} ms, DecodeBatch.step (1 row) {engine:6.1f} ms",
              flush=True)  # fmt: skip


def main() -> None:
    if sys.argv[1:] == ["--child"]:
        child()
        return
    print(f"precision: the server's default; load average at start {os.getloadavg()[0]:.1f}")
    for policy in (None, "ACTIVE", "PASSIVE"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        subprocess.run([sys.executable, __file__, "--child"], env=env, check=True)


if __name__ == "__main__":
    main()
