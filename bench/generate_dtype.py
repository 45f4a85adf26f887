"""Which dtype should generation use on this CPU? bfloat16 against float32: speed and quality, one run.

    .venv/bin/python bench/generate_dtype.py             # 32 prompts, 32 new tokens
    .venv/bin/python bench/generate_dtype.py --tokens 16 --prompts 8

Quality, with float32 as the reference: the float32 model's greedy continuation of each prompt is scored by
both models (teacher forcing), giving the KL divergence KL(fp32 || bf16) of the next-token distributions, how
often their top-1 tokens agree, and how much of the float32 greedy continuation bfloat16 reproduces exactly
(tokens until the first difference). Speed: our decode loop, one stream and 32 rows, tokens/s, both dtypes in
alternating rounds (medians). Model work runs in a worker thread, as in the server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.generate import QUESTIONS, chat_ids  # noqa: E402
from service.config import load_settings  # noqa: E402
from service.engine.generate import DecodeBatch, GenerationJob, RunningRequest, SamplingParams  # noqa: E402
from service.engine.loading import LoadedModel, load_model  # noqa: E402
from service.engine.vocab import ModelVocab  # noqa: E402


def greedy(loaded: LoadedModel, batch: DecodeBatch, rows: list[list[int]], n: int) -> tuple[list[list[int]], float]:
    seqs = [RunningRequest(GenerationJob(r, SamplingParams(max_new_tokens=n)), None, batch.device) for r in rows]
    for s in seqs:  # exactly n tokens: keep end-of-sequence out (as min_tokens would)
        s.min_tokens = n
    started = time.perf_counter()
    batch.add(seqs)
    while batch.rows:
        batch.step()
    return [s.generated for s in seqs], len(rows) * n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    models = {d: load_model(load_settings(adapter="none", precision=d)) for d in ("float32", "bfloat16")}
    batches = {d: DecodeBatch.serving(m, ModelVocab.build(m, 1)) for d, m in models.items()}
    prompts = [chat_ids(models["float32"], q) for q in QUESTIONS[: args.prompts]]
    n = args.tokens

    def run() -> None:
        ref, _ = greedy(models["float32"], batches["float32"], prompts, n)
        half, _ = greedy(models["bfloat16"], batches["bfloat16"], prompts, n)
        same_prefix = [next((i for i, (a, b) in enumerate(zip(r, h, strict=True)) if a != b), n) for r, h in
                       zip(ref, half, strict=True)]  # fmt: skip
        kls, agree = [], []
        for p, cont in zip(prompts, ref, strict=True):
            ids = torch.tensor([p + cont[:-1]])
            with torch.inference_mode():
                lp = {
                    d: torch.log_softmax(m.generation_model(input_ids=ids).logits[0, len(p) - 1 :].float(), -1)  # type: ignore[misc]
                    for d, m in models.items()
                }
            kls.append(float((lp["float32"].exp() * (lp["float32"] - lp["bfloat16"])).sum(-1).mean()))
            agree.append(float((lp["float32"].argmax(-1) == lp["bfloat16"].argmax(-1)).float().mean()))
        print(f"quality of bfloat16 against float32 over {len(prompts)} prompts x {n} tokens:")
        print(f"  mean KL(fp32 || bf16) per token: {statistics.mean(kls):.4f} nats")
        print(f"  top-1 agreement (teacher forced): {statistics.mean(agree):.1%}")
        print(f"  greedy continuations identical: {sum(x == n for x in same_prefix)}/{len(prompts)}; "
              f"mean identical prefix {statistics.mean(same_prefix):.1f} of {n} tokens")  # fmt: skip
        speed: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for d in models:
                speed.setdefault(f"{d}, 1 stream", []).append(greedy(models[d], batches[d], prompts[:1], n)[1])
                speed.setdefault(f"{d}, 32 rows", []).append(greedy(models[d], batches[d], prompts[:32], n)[1])
        print("speed (our decode loop, tokens/s, median of rounds):")
        for name, values in speed.items():
            print(f"  {name:<20} {statistics.median(values):7.1f}   ({', '.join(f'{v:.1f}' for v in values)})")

    with ThreadPoolExecutor(1) as worker:
        worker.submit(run).result()


if __name__ == "__main__":
    main()
