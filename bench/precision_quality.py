"""Quality guard of the fast path: what int8 (or bfloat16) weights change against float32, on the bundled model.

    .venv/bin/python bench/precision_quality.py                     # int8 against float32
    .venv/bin/python bench/precision_quality.py --precision bfloat16
    .venv/bin/python bench/precision_quality.py --quick             # 8 prompts, 40 cloze items: a smoke run

Prints one table:

- next-token distributions: KL(float32 ‖ fast), mean and max, at every position of float32's greedy
  continuation of 32 fixed chat prompts (bench/generate.py's), teacher-forced (both models read the same
  tokens), and how often the two greedy tokens agree there; for int8 also with every product on int8 GEMM
  (activations quantized a row at a time: what decode batches of 16 rows or more run where
  ``MASKSERVE_INT8_DECODE_GEMM`` chose it; its rows compute as a decode step's would);
- greedy generation through the engine (service/engine/generate.py), 32 tokens each: prompts whose whole
  continuation is identical, and tokens equal before the first divergence;
- fill-mask top-1/top-5 on service/data/cloze.tsv with the shipped MNTP adapter, through the evaluator
  (service/training/eval.py: the server's fill-mask search), plain (``--whole-word`` adds whole-word mode,
  a beam search of up to 4 sub-tokens) (goal: top-5 within 1 point of float32);
- structured outputs through the engine's output masks: a JSON schema and a regex, 8 prompts each,
  greedy; the share of outputs that parse and validate (goal: 100%).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.generate import QUESTIONS  # noqa: E402
from service.config import load_settings  # noqa: E402
from service.engine.fill.driver import FillDriver  # noqa: E402
from service.engine.generate import DecodeBatch, GenerationJob, RunningRequest, SamplingParams, compile_job  # noqa: E402
from service.engine.loading import LoadedModel, load_model  # noqa: E402
from service.engine.precision import Int8Linear, Kernel  # noqa: E402
from service.engine.vocab import ModelVocab  # noqa: E402
from service.masks.output import OutputMaskSpec  # noqa: E402
from service.training.eval import EvalMode, evaluate, read_cloze  # noqa: E402

CLOZE = Path(__file__).resolve().parent.parent / "service" / "data" / "cloze.tsv"
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 40},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
STRUCTURED_PROMPTS = [
    "What is the capital of France?", "How many legs does a spider have?", "Who wrote Hamlet?",
    "What colour is the sky?", "What is two plus two?", "Name a large ocean.", "What do bees make?",
    "Which planet is closest to the sun?", "What is frozen water called?", "Name a fruit that is yellow.",
    "When did the first person walk on the moon?", "When did the Second World War end?",
    "When was the Eiffel Tower finished?", "What is today's date, roughly?", "When is New Year's Day?",
    "When did the Berlin Wall fall?",
]  # fmt: skip


def chat_ids(loaded: LoadedModel, question: str) -> list[int]:
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return list(tok(str(text), add_special_tokens=False)["input_ids"])


def run_engine(loaded: LoadedModel, jobs: list[GenerationJob]) -> list[RunningRequest]:
    """Greedy jobs through the engine's decode loop, all in one batch."""
    assert loaded.generation_model is not None
    vocab = ModelVocab.build(loaded, grammar_cache_size=8)
    batch = DecodeBatch.serving(loaded, vocab)
    seqs = []
    for job in jobs:
        compile_job(job, vocab, dtype=batch.dtype, dims=loaded.attention_dims)  # as the server does at submission
        seqs.append(RunningRequest(job, batch.device))
    pending = list(seqs)
    while pending or batch.rows:
        if pending:  # at most 8 at a time join, as the scheduler's prefill chunks do
            batch.add(pending[:8])
            pending = pending[8:]
        if batch.rows:
            batch.step()
    return seqs


@torch.inference_mode()
def next_token_kl(ref: LoadedModel, fast: LoadedModel, prompts: list[list[int]], n: int) -> dict[str, float]:
    """Teacher-forced on float32's greedy continuations: KL(p32 ‖ pfast) at every generated position."""
    jobs = [GenerationJob(p, SamplingParams(max_new_tokens=n)) for p in prompts]
    conts = [s.generated for s in run_engine(ref, jobs)]
    kls, agree = [], []
    for p, c in zip(prompts, conts, strict=True):
        ids = torch.tensor([p + c])  # (1, T)
        logits = []
        for loaded in (ref, fast):
            assert loaded.generation_model is not None
            out = loaded.generation_model(input_ids=ids).logits[0, len(p) - 1 : len(p) + len(c) - 1].float()
            logits.append(out.log_softmax(-1))  # (n, V)
        lp32, lpf = logits
        kls += (lp32.exp() * (lp32 - lpf)).sum(-1).tolist()
        agree += (lp32.argmax(-1) == lpf.argmax(-1)).tolist()
    return {"kl_mean": statistics.mean(kls), "kl_max": max(kls), "top1_agree": sum(agree) / len(agree)}


def greedy_agreement(ref: LoadedModel, fast: LoadedModel, prompts: list[list[int]], n: int) -> dict[str, float]:
    outs = []
    for loaded in (ref, fast):
        jobs = [GenerationJob(p, SamplingParams(max_new_tokens=n)) for p in prompts]
        outs.append([s.generated for s in run_engine(loaded, jobs)])
    same = sum(a == b for a, b in zip(*outs, strict=True))
    prefix = []
    for a, b in zip(*outs, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(k / max(1, len(a)))
    return {"identical": same / len(prompts), "prefix": statistics.mean(prefix)}


def structured(loaded: LoadedModel, prompts: list[str]) -> dict[str, float]:
    half = len(prompts) // 2
    jobs = []
    for i, q in enumerate(prompts):
        if i < half:
            spec = OutputMaskSpec(json_schema=json.dumps(SCHEMA))
            q = q + " Answer as JSON with an answer and a confidence."
        else:
            spec = OutputMaskSpec(regex=DATE)
            q = q + " Answer with a date only, as YYYY-MM-DD."
        jobs.append(GenerationJob(chat_ids(loaded, q), SamplingParams(max_new_tokens=96), spec))
    seqs = run_engine(loaded, jobs)
    valid_json = valid_re = 0
    for i, s in enumerate(seqs):
        text = s.text.text
        if i < half:
            try:
                jsonschema.validate(json.loads(text), SCHEMA)
                valid_json += 1
            except (ValueError, jsonschema.ValidationError):
                print(f"  invalid JSON ({s.finish_reason}): {text!r}")
        elif re.fullmatch(DATE, text):
            valid_re += 1
        else:
            print(f"  invalid date ({s.finish_reason}): {text!r}")
    return {"json": valid_json / half, "regex": valid_re / (len(prompts) - half)}


def cloze(precision: str, limit: int | None, modes: list[EvalMode]) -> dict[str, float]:
    settings = load_settings(adapter="shipped", precision=precision)
    items = read_cloze(CLOZE)[:limit]
    result = evaluate(FillDriver(load_model(settings), settings), items, modes)
    return {f"{m.value}_{k}": result[m.value][k] for m in modes for k in ("top1", "top5")}


def print_cloze(args: argparse.Namespace, limit: int | None) -> None:
    modes = [EvalMode.PLAIN, EvalMode.WHOLE_WORD] if args.whole_word else [EvalMode.PLAIN]
    fills = {p: cloze(p, limit, modes) for p in ("float32", args.precision)}
    n = len(read_cloze(CLOZE)[:limit])
    for key in fills["float32"]:
        f32, fast_v = fills["float32"][key], fills[args.precision][key]
        goal = "within 1 point" if key.endswith("top5") else ""
        mark = " ✓" if key.endswith("top5") and abs(f32 - fast_v) <= 0.01 else ""
        print(f"| fill-mask cloze ({n} items) {key.replace('_', ' ')} | {f32:.1%} | {fast_v:.1%}{mark} | {goal} |",
              flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="int8", choices=["int8", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--whole-word", action="store_true", help="also the whole-word cloze mode (slow)")
    parser.add_argument("--cloze-only", action="store_true", help="only the fill-mask cloze rows")
    args = parser.parse_args()
    started = time.perf_counter()
    n_prompts, limit = (8, 40) if args.quick else (32, None)
    print(f"float32 against {args.precision}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    if args.cloze_only:
        print_cloze(args, limit)
        return
    ref = load_model(load_settings(adapter="none", precision="float32"))
    fast = load_model(load_settings(adapter="none", precision=args.precision))
    prompts = [chat_ids(ref, q) for q in QUESTIONS[:n_prompts]]
    # Each line is printed as soon as it is measured (a long run on a shared machine keeps what it has).
    print(f"decode batches of 16 rows or more run: {fast.describe()['decode_batch_kernel']}")
    print()
    print(f"| measure | float32 | {args.precision} | goal |")
    print("|---|--:|--:|---|", flush=True)
    kl = next_token_kl(ref, fast, prompts, args.tokens)
    print(f"| KL(float32 ‖ {args.precision}) per next token, mean / max (nats) | 0 | {kl['kl_mean']:.4f} / "
          f"{kl['kl_max']:.3f} | small |")  # fmt: skip
    print(f"| same greedy next token (teacher-forced, {len(prompts)}×{args.tokens} positions) | 100% | "
          f"{kl['top1_agree']:.1%} | |", flush=True)  # fmt: skip
    if args.precision == "int8":
        with mock.patch.object(Int8Linear, "kernel", return_value=Kernel.INT8_GEMM):
            kl = next_token_kl(ref, fast, prompts, args.tokens)
        print(f"| the same, every product on int8 GEMM: KL mean / max (nats) | 0 | {kl['kl_mean']:.4f} / "
              f"{kl['kl_max']:.3f} | small |")  # fmt: skip
        print(f"| the same, every product on int8 GEMM: same greedy next token | 100% | {kl['top1_agree']:.1%} | |",
              flush=True)  # fmt: skip
    greedy = greedy_agreement(ref, fast, prompts, args.tokens)
    print(f"| greedy continuations identical ({len(prompts)} prompts, {args.tokens} tokens) | 100% | "
          f"{greedy['identical']:.1%} | |")  # fmt: skip
    print(f"| greedy tokens before the first divergence | 100% | {greedy['prefix']:.1%} | |", flush=True)
    struct = {p: structured(m, STRUCTURED_PROMPTS) for p, m in (("float32", ref), (args.precision, fast))}
    for key, label in (("json", "JSON schema"), ("regex", "regex (a date)")):
        print(f"| structured output valid, {label} | {struct['float32'][key]:.0%} | "
              f"{struct[args.precision][key]:.0%} | 100% |", flush=True)  # fmt: skip
    del ref, fast
    print_cloze(args, limit)
    print(f"\n{time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
