"""Generation speed: maskserve over HTTP beside llama.cpp, its own float32 engine and transformers, one run.

    .venv/bin/python bench/generate.py                      # the fast path (auto: int8 on CPU), 64 tokens, 3 rounds
    .venv/bin/python bench/generate.py --precision bfloat16
    .venv/bin/python bench/generate.py --quick              # 16 tokens, 1 round: a smoke run
    .venv/bin/python bench/generate.py --compile            # also torch.compile the model for one stream
    pip install -e '.[bench]'                               # llama-cpp-python for the anchor (compiles ~10 min)

Measured, in rounds (medians reported; the baselines and ours alternate within a round, so all see the same
machine load):

- aggregate tokens/s at 1, 8 and 32 concurrent requests to our server (``POST /v1/generate`` over loopback
  HTTP, continuous batching), in ``--precision``;
- the anchor: llama.cpp (llama-cpp-python, when installed) on the bundled GGUF file itself, the same chat
  prompts through the GGUF's own chat template, the same thread count, exactly ``--tokens`` tokens (its
  end-of-sequence tokens banned through ``logit_bias``), one stream, in a subprocess of its own (its OpenMP
  team must not share a process with ours: service/engine/compute.py);
- the old engine: ``maskserve serve`` with ``MASKSERVE_PRECISION=float32 MASKSERVE_FUSED_DECODE=false`` (transformers'
  forward for every step) in a subprocess, 1 and 32 streams (``--no-float32-engine`` skips it);
- transformers' ``generate`` in ``--hf-precision`` (bfloat16 by default): sequential per request, and static
  batching (all 32 prompts in one ``generate`` call: the best case, no arrivals, no masks);
- time per token with and without a JSON-schema constraint (1 and 8 streams), and what the masks themselves
  cost (time inside the mask functions per token);
- decode step time at 32 rows with our in-place KV cache against ``torch.cat`` growth (transformers' dynamic
  cache);
- the machine's bound: measured matmul FLOP/s and memory read bandwidth -> tokens/s for this model.

Every request generates exactly ``--tokens`` tokens (``min_tokens`` / ``min_new_tokens``), greedy. All model
work of this process — the server's and the transformers baselines' — runs on the server's one compute
thread (service/engine/compute.py): a second thread running torch would form a second OpenMP team and slow
both sides down.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the live-server helper lives in tests/

import httpx  # noqa: E402
import torch  # noqa: E402

from service.app import create_app  # noqa: E402
from service.config import load_settings  # noqa: E402
from service.engine import generate as engine_generate  # noqa: E402
from service.engine.compute import ComputeThread, keep_single_threaded  # noqa: E402
from service.engine.generate import DecodeBatch, GenerationJob, RunningRequest, SamplingParams  # noqa: E402
from service.engine.kv_cache import BatchLayer  # noqa: E402
from service.engine.loading import LoadedModel, bundled_gguf_path, load_model  # noqa: E402
from service.engine.precision import Int8Linear  # noqa: E402
from service.masks import output as output_masks  # noqa: E402
from tests.live import live_server  # noqa: E402

QUESTIONS = [
    "Write a short story about a dragon who learns to bake bread.",
    "Explain how a rainbow forms.",
    "What are three tips for learning a new language?",
    "Describe the city of Paris in spring.",
    "Why is the sky blue?",
    "Give me a recipe for a simple tomato soup.",
    "What is the difference between weather and climate?",
    "Write a poem about the sea at night.",
    "How do bees make honey?",
    "Summarise the plot of a detective story you invent.",
    "What should I pack for a weekend hiking trip?",
    "Explain photosynthesis to a ten-year-old.",
    "Describe your ideal library.",
    "What makes a good friend?",
    "How does a bicycle stay upright?",
    "Write a letter to a future astronaut.",
    "List some healthy breakfast ideas.",
    "Why do cats purr?",
    "Explain what a computer program is.",
    "Describe a thunderstorm from the point of view of a tree.",
    "What are the planets of the solar system?",
    "How can I improve my sleep?",
    "Tell me about the history of the printing press.",
    "Write a dialogue between a robot and a child.",
    "What is the water cycle?",
    "Describe a market in Marrakech.",
    "How do airplanes fly?",
    "Give advice to someone starting their first job.",
    "What is a black hole?",
    "Write a fable about a fox and a crow.",
    "How are mountains formed?",
    "Describe the taste of a ripe mango.",
]
LONG_STRING_SCHEMA = {  # forces the output to keep going: a JSON object with one long string
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
}
T = TypeVar("T")
COMPUTE: list[ComputeThread] = []  # the server's compute thread, once it runs


def in_worker(fn: Callable[[], T]) -> T:
    """Run baseline work on the server's compute thread (the model's only thread)."""
    return COMPUTE[0].submit(fn).result()


# --- the machine ---------------------------------------------------------------------------------------------------


def machine_bound(loaded: LoadedModel) -> dict[str, float]:
    def measure() -> dict[str, float]:
        out: dict[str, float] = {}
        for dtype in sorted({torch.float32, loaded.dtype}, key=str):
            a = torch.randn(1024, 1024, dtype=dtype)
            a @ a
            n, started = 0, time.perf_counter()
            while time.perf_counter() - started < 1.0:
                a @ a
                n += 1
            out[f"flops_{str(dtype).removeprefix('torch.')}"] = 2 * 1024**3 * n / (time.perf_counter() - started)
        big = torch.ones(64 * 1024 * 1024, dtype=torch.float32)  # 256 MB, far beyond the caches
        big.sum()
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < 1.0:
            big.sum()
            n += 1
        out["bandwidth"] = big.numel() * 4 * n / (time.perf_counter() - started)
        return out

    m = in_worker(measure)
    model = loaded.generation_model
    assert model is not None
    dense = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))
    int8 = sum(mod.qweight.numel() for mod in model.modules() if isinstance(mod, Int8Linear))
    m["flop_per_token"] = 2 * (dense + int8)
    m["weight_bytes"] = dense * (torch.finfo(loaded.dtype).bits // 8) + int8  # what one decode step reads
    m["compute_bound"] = m[f"flops_{str(loaded.dtype).removeprefix('torch.')}"] / m["flop_per_token"]
    m["memory_bound_1"] = m["bandwidth"] / m["weight_bytes"]
    return m


# --- baselines: transformers' generate ------------------------------------------------------------------------------


def chat_ids(loaded: LoadedModel, question: str) -> list[int]:
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return list(tok(str(text), add_special_tokens=False)["input_ids"])


def hf_sequential(loaded: LoadedModel, questions: list[str], n: int) -> float:
    model = loaded.generation_model
    assert model is not None

    def run() -> float:
        started = time.perf_counter()
        for q in questions:
            ids = torch.tensor([chat_ids(loaded, q)])
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
            assert out.shape[1] - ids.shape[1] == n
        return len(questions) * n / (time.perf_counter() - started)

    return in_worker(run)


def hf_static_batch(loaded: LoadedModel, questions: list[str], n: int) -> float:
    model, tok = loaded.generation_model, loaded.tokenizer
    assert model is not None

    def run() -> float:
        rows = [chat_ids(loaded, q) for q in questions]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=pad,
            )  # fmt: skip
        assert out.shape[1] - width == n
        return len(questions) * n / (time.perf_counter() - started)

    return in_worker(run)


# --- the anchor: llama.cpp on the same GGUF file -------------------------------------------------------------------


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_worker(questions: list[str], n: int, threads: int) -> None:
    """In a subprocess: load the GGUF, one warm-up, then the questions one at a time; prints tokens/s as JSON."""
    import llama_cpp.llama as llama_module
    from llama_cpp import Llama

    defaults = llama_module.llama_cpp.llama_model_default_params

    def no_extra_buffers() -> Any:
        # ggml's AMX extra buffer type (repacked weights) segfaults in ggml_backend_amx_mul_mat on this
        # machine (the CPU reports AMX); llama.cpp's --no-extra-bufts, which llama-cpp-python does not expose.
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = no_extra_buffers
    llm = Llama(model_path=str(bundled_gguf_path()), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                verbose=False)  # fmt: skip
    eos = {llm.token_eos(), *llm.tokenize(b"<|im_end|>", add_bos=False, special=True),
           *llm.tokenize(b"<|endoftext|>", add_bos=False, special=True)}  # fmt: skip
    bias = {int(t): -1e9 for t in eos}  # banned: exactly n tokens, as min_tokens does for ours

    def one(q: str, tokens: int) -> int:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": q}], max_tokens=tokens, temperature=0.0, logit_bias=bias
        )
        return int(out["usage"]["completion_tokens"])  # type: ignore[index]

    one(questions[0], 4)
    started = time.perf_counter()
    counts = [one(q, n) for q in questions]
    seconds = time.perf_counter() - started
    assert all(c == n for c in counts), counts
    print(json.dumps({"tokens_per_s": sum(counts) / seconds}))


def llama_cpp(questions: list[str], n: int, threads: int) -> float:
    cmd = [sys.executable, __file__, "--llama-cpp-worker", "--tokens", str(n), "--threads", str(threads),
           "--sequential", str(len(questions))]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900).stdout
    return float(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])


# --- the old engine: maskserve in float32, in a subprocess -------------------------------------------------------


def start_float32_engine(threads: int) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    # The old engine: float32 weights and transformers' forward for every decode step (no fused step).
    env = {**os.environ, "MASKSERVE_PRECISION": "float32", "MASKSERVE_FUSED_DECODE": "false", "MASKSERVE_ADAPTER":
           "none", "MASKSERVE_LOG_LEVEL": "warning", "MASKSERVE_MAX_RUNNING_REQUESTS": "32",
           "MASKSERVE_TORCH_THREADS": str(threads)}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env,
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the float32 engine did not start")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the float32 engine did not become ready")


# --- ours, over HTTP ------------------------------------------------------------------------------------------------


def ours(url: str, questions: list[str], n: int, concurrency: int, extra: dict[str, Any] | None = None) -> float:
    """Aggregate tokens/s of ``concurrency`` clients working through ``questions``.

    The clients share one connection pool, made before the clock starts: a client per request (``httpx.post``)
    builds an SSL context each time, and 32 of them in this process held up the first request by ~0.6 s of
    client-side work, a cost of the load generator, not of the server."""
    counts: list[int] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    with httpx.Client(base_url=url, timeout=600, limits=limits) as client:

        def one(q: str) -> None:
            body = {"messages": [{"role": "user", "content": q}], "max_new_tokens": n, "min_tokens": n, **(extra or {})}
            r = client.post("/v1/generate", json=body)
            r.raise_for_status()
            counts.append(r.json()["usage"]["completion_tokens"])

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, questions))
        return sum(counts) / (time.perf_counter() - started)


class MaskTimer:
    """Time spent inside the output-mask functions (apply per step, advance per token) while it is installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._apply = engine_generate.apply_output_masks
        self._advance = output_masks.OutputMaskState.advance

    def __enter__(self) -> MaskTimer:
        timer, apply, advance = self, self._apply, self._advance

        def timed_apply(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return apply(*args)
            finally:
                timer.seconds += time.perf_counter() - started

        def timed_advance(state: Any, *args: Any) -> None:
            started = time.perf_counter()
            try:
                advance(state, *args)
            finally:
                timer.seconds += time.perf_counter() - started

        engine_generate.apply_output_masks = timed_apply  # type: ignore[assignment]
        output_masks.OutputMaskState.advance = timed_advance  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        engine_generate.apply_output_masks = self._apply
        output_masks.OutputMaskState.advance = self._advance  # type: ignore[method-assign]


# --- KV cache: in place against torch.cat -------------------------------------------------------------------------


def cache_step_ms(loaded: LoadedModel, rows: int, steps: int, cat: bool) -> float:
    """Median decode step time at ``rows`` rows, with our cache or with DynamicLayer-style concatenation."""
    from service.engine.vocab import ModelVocab

    vocab = ModelVocab.build(loaded, 1)
    batch = DecodeBatch.serving(loaded, vocab)
    original = BatchLayer.update

    def cat_update(self: BatchLayer, k: torch.Tensor, v: torch.Tensor, *args: Any, **kw: Any) -> Any:
        keys = k if not self.is_initialized else torch.cat([self.keys, k], dim=-2)
        values = v if not self.is_initialized else torch.cat([self.values, v], dim=-2)
        return self._set(keys, values, keys.shape[-2])

    def job(question: str) -> GenerationJob:
        made = GenerationJob(chat_ids(loaded, question), SamplingParams(max_new_tokens=steps + 1))
        engine_generate.compile_job(made, vocab, dtype=batch.dtype, dims=loaded.attention_dims)  # as submitted
        return made

    def run() -> float:
        seqs = [RunningRequest(job(q), batch.device) for q in (QUESTIONS * 2)[:rows]]
        batch.add(seqs)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            batch.step()
            times.append(time.perf_counter() - started)
        batch.clear()
        return statistics.median(times) * 1e3

    if cat:
        BatchLayer.update = cat_update  # type: ignore[method-assign]
    try:
        return in_worker(run)
    finally:
        BatchLayer.update = original  # type: ignore[method-assign]


# --- the run ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16", "int8"])
    parser.add_argument("--hf-precision", default="bfloat16", choices=["float32", "bfloat16"],
                        help="precision of the transformers baselines")  # fmt: skip
    parser.add_argument("--no-float32-engine", action="store_true", help="skip maskserve in float32")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    parser.add_argument("--llama-cpp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sequential", type=int, default=4, help="requests in the one-at-a-time runs")
    parser.add_argument("--quick", action="store_true", help="16 tokens, 1 round")
    parser.add_argument("--compile", action="store_true", help="also measure one stream with torch.compile")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", help="write the raw numbers here")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.rounds = 16, 1
    if args.llama_cpp_worker:
        llama_cpp_worker(QUESTIONS[: args.sequential], args.tokens, args.threads)
        return
    settings = load_settings(
        adapter="none", precision=args.precision, max_running_requests=32, log_level="warning",
        torch_threads=args.threads,
    )  # fmt: skip
    keep_single_threaded()  # this thread only sends requests and prints
    app = create_app(settings)
    with live_server(app) as url:
        engine = app.state.engine
        COMPUTE.append(engine.compute)
        loaded = engine.require()
        run_bench(args, url, app, loaded)


def run_bench(args: argparse.Namespace, url: str, app: Any, loaded: LoadedModel) -> None:
    n = args.tokens
    threads = in_worker(torch.get_num_threads)
    print(f"model {loaded.name}, precision {loaded.precision.value}, {n} new tokens a request, {args.rounds} "
          f"round(s), torch threads {threads}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"load average at start {os.getloadavg()[0]:.1f}")  # fmt: skip
    hf_settings = load_settings(adapter="none", precision=args.hf_precision, log_level="warning")
    hf_model = in_worker(lambda: load_model(hf_settings))  # transformers' baselines run their own precision
    anchor = not args.no_llama_cpp and llama_cpp_available()
    if not anchor:
        print("llama.cpp: not installed (pip install -e '.[bench]'), or --no-llama-cpp: no anchor this run")
    f32: tuple[subprocess.Popen[bytes], str] | None = None
    if not args.no_float32_engine:
        f32 = start_float32_engine(threads)
    try:
        run_rounds(args, url, app, loaded, hf_model, anchor, f32[1] if f32 else None, threads)
    finally:
        if f32 is not None:
            f32[0].terminate()
            f32[0].wait(timeout=30)


def run_rounds(
    args: argparse.Namespace, url: str, app: Any, loaded: LoadedModel, hf_model: LoadedModel, anchor: bool,
    f32_url: str | None, threads: int,
) -> None:  # fmt: skip
    n = args.tokens

    bound = machine_bound(loaded)
    print(
        f"machine: matmul {bound['flops_float32'] / 1e9:.0f} GFLOP/s fp32"
        + (f", {bound['flops_bfloat16'] / 1e9:.0f} GFLOP/s bf16" if "flops_bfloat16" in bound else "")
        + f"; memory read {bound['bandwidth'] / 1e9:.1f} GB/s. Model: {bound['flop_per_token'] / 1e6:.0f} MFLOP "
        f"and {bound['weight_bytes'] / 1e6:.0f} MB of weights a token -> bound {bound['compute_bound']:.0f} tok/s "
        f"(compute, large batches), {bound['memory_bound_1']:.0f} tok/s (memory, one stream)"
    )

    results: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    seq_questions = QUESTIONS[: args.sequential]
    ours(url, QUESTIONS[:2], 4, 2)  # warm up both paths
    hf_sequential(hf_model, QUESTIONS[:1], 4)
    if f32_url:
        ours(f32_url, QUESTIONS[:2], 4, 2)
    for r in range(args.rounds):
        if anchor:
            record("llama.cpp, 1 stream", llama_cpp(seq_questions, n, threads))
        record("ours, 1 stream", ours(url, seq_questions, n, 1))
        if f32_url:
            record("float32 engine, 1 stream", ours(f32_url, seq_questions, n, 1))
            record("float32 engine, 32 streams", ours(f32_url, QUESTIONS, n, 32))
        record("ours, 32 streams", ours(url, QUESTIONS, n, 32))
        record("generate, sequential", hf_sequential(hf_model, seq_questions, n))
        record("generate, static batch of 32", hf_static_batch(hf_model, QUESTIONS, n))
        record("ours, 8 streams", ours(url, QUESTIONS, n, 8))
        with MaskTimer() as timer:
            record("ours, 1 stream, JSON schema", ours(url, seq_questions, n, 1, {"json_schema": LONG_STRING_SCHEMA}))
        record("mask time, 1 stream (ms/token)", timer.seconds * 1e3 / (len(seq_questions) * n))
        with MaskTimer() as timer:
            record("ours, 8 streams, JSON schema", ours(url, QUESTIONS[:8], n, 8, {"json_schema": LONG_STRING_SCHEMA}))
        record("mask time, 8 streams (ms/token)", timer.seconds * 1e3 / (8 * n))
        record("ours, 8 streams, plain (same 8)", ours(url, QUESTIONS[:8], n, 8))
        print(f"  round {r + 1} done (load average {os.getloadavg()[0]:.1f})", flush=True)
    if args.compile:
        gen = app.state.engine.generation
        model = gen.batch.model
        gen.batch.model = torch.compile(model, dynamic=True)
        started = time.perf_counter()
        ours(url, QUESTIONS[:1], 8, 1)  # compiles
        print(f"  torch.compile warm-up took {time.perf_counter() - started:.0f} s")
        for _ in range(args.rounds):
            record("ours, 1 stream, torch.compile", ours(url, seq_questions, n, 1))
        gen.batch.model = model
    for _ in range(args.rounds):
        record("decode step, 32 rows, in-place cache (ms)", cache_step_ms(loaded, 32, 16, cat=False))
        record("decode step, 32 rows, torch.cat cache (ms)", cache_step_ms(loaded, 32, 16, cat=True))

    med = {k: statistics.median(v) for k, v in results.items()}
    print()
    print(f"| {'setup':<44} | {'median':>9} | {'rounds':<24} | ratio |")
    print(f"|{'-' * 46}|{'-' * 11}:|{'-' * 26}|-------|")
    ratios = {
        "ours, 1 stream": "llama.cpp, 1 stream" if "llama.cpp, 1 stream" in med else "generate, sequential",
        "float32 engine, 1 stream": "llama.cpp, 1 stream",
        "ours, 1 stream, torch.compile": "ours, 1 stream",
        "ours, 8 streams": "generate, static batch of 32",
        "ours, 32 streams": "float32 engine, 32 streams" if f32_url else "generate, static batch of 32",
        "ours, 1 stream, JSON schema": "ours, 1 stream",
        "ours, 8 streams, JSON schema": "ours, 8 streams, plain (same 8)",
        "decode step, 32 rows, torch.cat cache (ms)": "decode step, 32 rows, in-place cache (ms)",
    }
    for name, value in med.items():
        unit = "" if "(m" in name else " tok/s"
        base = ratios.get(name)
        ratio = f"{value / med[base]:.2f}x" if base in med else ""
        rounds = ", ".join(f"{v:.1f}" for v in results[name])
        print(f"| {name + unit:<44} | {value:>9.1f} | {rounds:<24} | {ratio:>5} |")
    comparisons = [
        ("ours, 1 stream", "llama.cpp, 1 stream", "goal >= 0.5"),
        ("ours, 1 stream", "float32 engine, 1 stream", ""),
        ("ours, 32 streams", "float32 engine, 32 streams", "goal >= 1.8"),
        ("ours, 32 streams", "generate, static batch of 32", f"goal >= 1.0, transformers in {args.hf_precision}"),
        ("ours, 1 stream", "generate, sequential", f"transformers in {args.hf_precision}"),
    ]
    print()
    for a, b, note in comparisons:
        if a in med and b in med:
            print(f"{a} / {b}: {med[a] / med[b]:.2f}x" + (f" ({note})" if note else ""))
    per_token = {k: 1e3 / med[k] for k in ("ours, 1 stream", "ours, 1 stream, JSON schema")}
    overhead = per_token["ours, 1 stream, JSON schema"] / per_token["ours, 1 stream"] - 1
    print(
        f"\nper token, one stream: {per_token['ours, 1 stream']:.1f} ms plain, "
        f"{per_token['ours, 1 stream, JSON schema']:.1f} ms with a JSON schema ({overhead:+.1%}); the masks "
        f"themselves {med['mask time, 1 stream (ms/token)']:.2f} ms a token "
        f"({med['mask time, 1 stream (ms/token)'] / per_token['ours, 1 stream']:.1%} of a plain token)"
    )
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bound": bound, "results": results, "medians": med}, f, indent=2)


if __name__ == "__main__":
    main()
