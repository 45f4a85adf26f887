"""Fill-mask throughput and latency: maskserve (dynamic batching) against a naive baseline, same model, same run.

    python bench/fill_mask.py                                   # bundled SmolLM2 + shipped MNTP adapter
    python bench/fill_mask.py --adapter random                  # bundled SmolLM2 + a random LoRA (same speed)
    python bench/fill_mask.py --model tiny-bert                 # the tests' tiny BERT (seconds, for a smoke run)
    python bench/fill_mask.py --model /path/to/bert-base-uncased --concurrency 1,8,32 --requests 128
    python bench/fill_mask.py --precision int8 --float32-engine   # also maskserve in float32 (the old engine)

Both services run as uvicorn subprocesses on free loopback ports, alternately driven by N concurrent
httpx clients sending one-mask sentences (16 sentences, cycled):

- maskserve: ``maskserve serve`` (POST /v1/fill-mask, batches concurrent requests into one padded forward);
- with ``--float32-engine``, maskserve again in ``MASKSERVE_PRECISION=float32``: the engine before the fast
  path, for the ratio of the precision alone;
- baseline: a plain FastAPI ``def`` route (FastAPI's thread pool) running one unbatched forward per request.
  For an encoder MLM it is transformers' fill-mask pipeline itself; for a decoder with an MNTP adapter (the
  pipeline cannot do MNTP) it is the same merged model under a bidirectional mask, read at i-1, top-5.

It prints requests/s, p50 and p99 latency for both and their ratios, and the bare model forward (the same
sentences, the full model as the baseline calls it, in this process) as the reference for concurrency 1.
The adapter's weights are merged into the model, so a random adapter runs exactly as fast as a trained one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/fill_mask.py` from anywhere: import service/ and tests/

SENTENCES = [
    "The [MASK] barked at the mailman.",
    "Paris is the [MASK] of France.",
    "Birds can [MASK] because they have wings.",
    "She poured a cup of [MASK] and sat down by the window.",
    "The children were playing in the [MASK] after school.",
    "He forgot his [MASK] at home, so he could not unlock the door.",
    "Water freezes at zero degrees [MASK].",
    "The [MASK] rises in the east.",
    "I would like to [MASK] a book from the library tomorrow morning.",
    "The doctor told him to take the [MASK] twice a day with food.",
    "A [MASK] has eight legs.",
    "They went to the beach to [MASK] in the sea.",
    "The orchestra played a beautiful piece by a famous [MASK] from Vienna.",
    "My sister drinks [MASK] every morning.",
    "The train was late because of the heavy [MASK] on the tracks last night.",
    "Please close the [MASK] when you leave.",
]


# --- the baseline server -----------------------------------------------------------------------------------


class BaselineRequest(BaseModel):
    inputs: str


def baseline_app(model_arg: str, adapter_arg: str) -> Any:
    """A plain FastAPI app: one unbatched forward per request (no queue, no batching, no lock)."""
    import torch
    from fastapi import FastAPI
    from transformers import pipeline

    from service.config import load_settings
    from service.engine.loading import UNIVERSAL_MASK, choose_mntp_mask_token, load_model

    loaded = load_model(load_settings(model=model_arg, adapter=adapter_arg))
    net, tok = loaded.fill_mask_model, loaded.tokenizer
    assert net is not None
    assert loaded.mask_token is not None
    app = FastAPI()

    if not loaded.mntp:
        pipe = pipeline("fill-mask", model=net, tokenizer=tok)

        @app.post("/fill-mask")
        def fill_pipeline(body: BaselineRequest) -> Any:
            return pipe(body.inputs.replace(UNIVERSAL_MASK, str(tok.mask_token)), top_k=5)

        return app

    mask = loaded.mask_token or choose_mntp_mask_token(tok)
    mask_id = int(tok.convert_tokens_to_ids(mask))
    prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []

    @app.post("/fill-mask")
    def fill_mntp(body: BaselineRequest) -> Any:
        text = body.inputs.replace(" " + UNIVERSAL_MASK, mask).replace(UNIVERSAL_MASK, mask)  # the word owns its space
        ids = prefix + tok(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        i = ids.index(mask_id)
        with torch.inference_mode():
            everything = torch.zeros(1, 1, len(ids), len(ids))  # bidirectional, no padding
            probs = net(input_ids=x, attention_mask=everything).logits[0, i - 1].softmax(-1)  # MNTP: read at i-1
        top = probs.topk(5)
        out = []
        for p, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            filled = ids[:i] + [t] + ids[i + 1 :]
            out.append({"sequence": tok.decode(filled, skip_special_tokens=True), "score": p, "token": t,
                        "token_str": tok.decode([t])})  # fmt: skip
        return out

    return app


# --- the model setup ---------------------------------------------------------------------------------------


def random_mntp_adapter(base_dir: Path, out: Path) -> Path:
    """A random LoRA on every projection (as the shipped one), marked MNTP: same cost, no skill."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.engine.loading import choose_mntp_mask_token

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    mask = choose_mntp_mask_token(AutoTokenizer.from_pretrained(base_dir))
    (out / "maskserve.json").write_text(json.dumps({"objective": "mntp", "mask_token": mask}))
    return out


def resolve_model(args: argparse.Namespace, scratch: Path) -> tuple[str, str, str]:
    """(model, adapter, description) as settings values."""
    from service.config import load_settings
    from service.engine.loading import SHIPPED_ADAPTER_DIR, bundled_model_dir

    if args.model == "tiny-bert":
        from tests.tiny import build_tiny_bert

        return str(build_tiny_bert(scratch / "tiny-bert")), "none", "tiny BERT (tests/tiny.py)"
    if args.model != "bundled":
        return args.model, args.adapter, f"{Path(args.model).name} (adapter: {args.adapter})"
    adapter = args.adapter
    if adapter == "shipped" and not (SHIPPED_ADAPTER_DIR / "adapter_config.json").is_file():
        print(f"note: no shipped adapter at {SHIPPED_ADAPTER_DIR}; using a random LoRA adapter instead "
              "(merged into the weights, it runs exactly as fast as a trained one)")  # fmt: skip
        adapter = "random"
    if adapter == "random":
        base = bundled_model_dir(load_settings(adapter="none").cache_dir)
        path = random_mntp_adapter(base, scratch / "random-mntp")
        return "bundled", str(path), "SmolLM2-135M-Instruct + random MNTP LoRA r=16 (merged)"
    if adapter == "shipped":
        return "bundled", "shipped", "SmolLM2-135M-Instruct + shipped MNTP adapter (merged)"
    return "bundled", adapter, f"SmolLM2-135M-Instruct + {adapter}"


class BareForward:
    """The forward of each sentence the clients send, in this process: the full model (as the baseline runs
    it), and the head-only variant maskserve runs for decoders. ``measure()`` returns both p50s in ms, over
    the sentences cycled as the clients cycle them (so the p50s compare with the servers' at 1 client)."""

    def __init__(self, model_arg: str, adapter_arg: str, precision: str = "auto") -> None:
        import torch

        from service.config import load_settings
        from service.engine.fill.codec import FillMaskCodec
        from service.engine.fill.forward import forward_rows, head_only_matches
        from service.engine.fill.search import Row
        from service.engine.loading import load_model
        from service.masks.fill import fill_attention

        settings = load_settings(model=model_arg, adapter=adapter_arg, precision=precision)
        loaded = load_model(settings)
        net = loaded.fill_mask_model
        assert net is not None
        codec = FillMaskCodec(loaded, settings)
        head_only = head_only_matches(loaded)
        inputs = [codec.encode(text, "inputs") for text in SENTENCES]
        self.tokens = sorted(len(inp.ids) for inp in inputs)

        def full(ids: torch.Tensor, attention: torch.Tensor) -> None:
            with torch.inference_mode():
                net(input_ids=ids, attention_mask=attention)

        self.fns: list[list[Callable[[], object]]] = [[], []]
        for inp in inputs:
            ids = torch.tensor([inp.ids])  # (1, T)
            attention = fill_attention([len(inp.ids)], loaded.dtype).attention  # (1, 1, T, T)
            row = Row(inp.ids, (codec.read(inp.slots[0].index),))
            self.fns[0].append(partial(full, ids, attention))
            self.fns[1].append(partial(forward_rows, loaded, [row], head_only=head_only))

    def measure(self, passes: int = 4) -> tuple[float, float]:
        out = []
        for fns in self.fns:
            fns[0]()  # warm-up
            times = []
            for _ in range(passes):
                for fn in fns:
                    t = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t) * 1000)
            out.append(statistics.median(times))
        return out[0], out[1]


# --- load generation ---------------------------------------------------------------------------------------


@dataclass
class Run:
    clients: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def __add__(self, other: Run) -> Run:
        return Run(self.clients, self.requests + other.requests, self.seconds + other.seconds,
                   self.latencies_ms + other.latencies_ms, self.errors + other.errors)  # fmt: skip


async def drive(url: str, clients: int, requests: int) -> Run:
    import httpx

    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient, offset: int) -> None:
        nonlocal errors
        for n in counter:
            body = {"inputs": SENTENCES[(n + offset) % len(SENTENCES)]}
            t = time.perf_counter()
            response = await http.post(url, json=body)
            latencies.append((time.perf_counter() - t) * 1000)
            errors += response.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as http:
        for s in SENTENCES[:4]:  # warm up the connection pool and the server
            await http.post(url, json={"inputs": s})
        started = time.perf_counter()
        await asyncio.gather(*(client(http, i) for i in range(clients)))
        seconds = time.perf_counter() - started
    return Run(clients, requests, seconds, latencies, errors)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], env: dict[str, str], ready_url: str) -> subprocess.Popen[bytes]:
    import httpx

    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {' '.join(cmd)}\n{proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(ready_url, timeout=2, trust_env=False).status_code in (200, 405):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not become ready: {' '.join(cmd)}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled", help="'bundled', 'tiny-bert', or a local model directory")
    parser.add_argument("--adapter", default="shipped", help="'shipped', 'random', 'none', or an adapter directory")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=64, help="requests per level and repeat (>= 4 per client)")
    parser.add_argument("--repeats", type=int, default=2, help="alternate maskserve/baseline this many times")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-wait-ms", type=float, default=2.0)
    parser.add_argument(
        "--omp-wait-policy",
        default="unset",
        help="OMP_WAIT_POLICY for both servers and the bare forward ('unset': libgomp's default, as maskserve serve)",
    )
    parser.add_argument("--precision", default="auto", help="MASKSERVE_PRECISION of maskserve and the bare forward")
    parser.add_argument("--float32-engine", action="store_true", help="also run maskserve in float32")
    parser.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.omp_wait_policy != "unset":  # before torch loads; inherited by both servers
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy

    if args.serve_baseline:  # the subprocess side
        import uvicorn

        uvicorn.run(baseline_app(args.model, args.adapter), host="127.0.0.1", port=args.port, log_level="warning")
        return 0

    import torch

    plan = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="maskserve-bench-") as tmp:
        model, adapter, description = resolve_model(args, Path(tmp))
        env = {**os.environ, "MASKSERVE_LOG_LEVEL": "warning", "MASKSERVE_MAX_BATCH_SIZE": str(args.max_batch_size),
               "MASKSERVE_MAX_BATCH_WAIT_MS": str(args.max_batch_wait_ms)}  # fmt: skip
        print(f"model: {description}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} cpus, OMP_WAIT_POLICY={args.omp_wait_policy}, load average "
              f"{os.getloadavg()[0]:.1f}; max_batch_size {args.max_batch_size}, max_batch_wait_ms "
              f"{args.max_batch_wait_ms:g}; precision {args.precision}", flush=True)  # fmt: skip
        bare = BareForward(model, adapter, args.precision)
        p_ours, p_base = free_port(), free_port()
        serve = [sys.executable, "-m", "service.cli", "serve", "--model", model, "--adapter", adapter, "--port"]
        servers = [
            start([*serve, str(p_ours)], {**env, "MASKSERVE_PRECISION": args.precision},
                  f"http://127.0.0.1:{p_ours}/ready"),
            start([sys.executable, __file__, "--serve-baseline", "--model", model, "--adapter", adapter, "--port",
                   str(p_base)], env, f"http://127.0.0.1:{p_base}/fill-mask"),
        ]  # fmt: skip
        urls = {
            "maskserve": f"http://127.0.0.1:{p_ours}/v1/fill-mask",
            "baseline": f"http://127.0.0.1:{p_base}/fill-mask",
        }
        if args.float32_engine:
            p_f32 = free_port()
            servers.append(start([*serve, str(p_f32)], {**env, "MASKSERVE_PRECISION": "float32"},
                                 f"http://127.0.0.1:{p_f32}/ready"))  # fmt: skip
            urls["float32"] = f"http://127.0.0.1:{p_f32}/v1/fill-mask"
        results: dict[tuple[str, int], Run] = {}
        bare_full: list[float] = []
        bare_ours: list[float] = []
        try:
            for clients in plan:
                for _ in range(args.repeats):  # alternate, so both sides see the same (shared) machine
                    if clients == 1:
                        full_ms, ours_ms = bare.measure()
                        bare_full.append(full_ms)
                        bare_ours.append(ours_ms)
                    for name, url in urls.items():
                        run = asyncio.run(drive(url, clients, max(args.requests, 4 * clients)))
                        print(f"  {name:<9} {clients:>3} clients: {run.rps:7.1f} req/s  p50 {run.pct(0.5):7.1f} ms"
                              f"  p99 {run.pct(0.99):7.1f} ms  errors {run.errors}", flush=True)  # fmt: skip
                        key = (name, clients)
                        results[key] = results[key] + run if key in results else run
        finally:
            for proc in servers:
                stop(proc)

    if not bare_full:
        full_ms, ours_ms = bare.measure()
        bare_full, bare_ours = [full_ms], [ours_ms]
    full_ms, ours_ms = statistics.median(bare_full), statistics.median(bare_ours)
    print()
    print("| clients | maskserve req/s | p50 ms | p99 ms | baseline req/s | p50 ms | p99 ms | throughput × | p50 × |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for clients in plan:
        o, b = results[("maskserve", clients)], results[("baseline", clients)]
        print(f"| {clients} | {o.rps:.1f} | {o.pct(0.5):.1f} | {o.pct(0.99):.1f} | {b.rps:.1f} | {b.pct(0.5):.1f} | "
              f"{b.pct(0.99):.1f} | {o.rps / b.rps:.2f} | {b.pct(0.5) / o.pct(0.5):.2f} |")  # fmt: skip
    if args.float32_engine:
        print()
        print("| clients | maskserve req/s | p50 ms | maskserve float32 req/s | p50 ms | throughput × | p50 × |")
        print("|--:|--:|--:|--:|--:|--:|--:|")
        for clients in plan:
            o, f = results[("maskserve", clients)], results[("float32", clients)]
            print(f"| {clients} | {o.rps:.1f} | {o.pct(0.5):.1f} | {f.rps:.1f} | {f.pct(0.5):.1f} | "
                  f"{o.rps / f.rps:.2f} | {f.pct(0.5) / o.pct(0.5):.2f} |")  # fmt: skip
    print()
    print(
        f"bare forward, the {len(bare.tokens)} sentences ({bare.tokens[0]}-{bare.tokens[-1]} tokens), p50: "
        f"{full_ms:.1f} ms full model, {ours_ms:.1f} ms maskserve's forward (LM head on the read position only)"
    )
    if 1 in plan:
        o = results[("maskserve", 1)]
        print(f"concurrency 1: maskserve p50 / bare full forward p50 = {o.pct(0.5) / full_ms:.2f} (target <= 1.1)")
    if 32 in plan:
        o, b = results[("maskserve", 32)], results[("baseline", 32)]
        print(f"32 clients: maskserve / baseline throughput = {o.rps / b.rps:.2f} (target >= 3)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other work on this machine shares its cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
