"""What every interference experiment shares: arguments, seeding, spread statistics, tables, plots, models.

Each experiment is a module with ``main(argv) -> Result`` and runs as ``python -m bench.experiments.<name>``;
``--smoke`` swaps the bundled model for the tiny ones from tests/tiny.py and shrinks every size so the whole
run takes seconds (tests/integration/test_experiments_smoke.py runs them all).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display here, and none in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from service.config import load_settings  # noqa: E402
from service.engine.generate import DecodeBatch, GenerationJob, RunningRequest, compile_job  # noqa: E402
from service.engine.loading import LoadedModel, load_model  # noqa: E402
from service.engine.params import SamplingParams  # noqa: E402
from service.engine.vocab import ModelVocab  # noqa: E402
from service.masks.output import OutputMaskSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DOCS_OUT = REPO / "docs" / "interference"

# Two-sided 95% Student t quantiles (df -> t_0.975), so small-n intervals need no scipy; df > 30 uses 1.96.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}  # fmt: skip


@dataclass
class RunArgs:
    smoke: bool
    seed: int
    out: Path
    argv: list[str]
    extra: argparse.Namespace


def parse_args(name: str, doc: str | None, argv: Sequence[str] | None,
               add_options: Callable[[argparse.ArgumentParser], None] | None = None) -> RunArgs:  # fmt: skip
    """``--smoke`` (tiny models, seconds), ``--seed``, ``--out`` (default docs/interference, or a temporary
    directory under --smoke so a smoke run never overwrites the published tables)."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.experiments.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes: runs in seconds")
    parser.add_argument("--seed", type=int, default=0, help="base seed; repeats use seed, seed+1, ...")
    parser.add_argument("--out", type=Path, default=None, help="where the table (.md) and plot (.png) go")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on the shared 2-core machine, 2 threads ran 3-5x slower "
                        "than 1 while others computed; use 2 on an idle machine)")  # fmt: skip
    if add_options:
        add_options(parser)
    args_list = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(args_list)
    torch.set_num_threads(ns.threads)
    out = ns.out or (Path(tempfile.mkdtemp(prefix=f"maskserve-{name}-smoke-")) if ns.smoke else DOCS_OUT)
    return RunArgs(smoke=ns.smoke, seed=ns.seed, out=out, argv=args_list, extra=ns)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- spread -----------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def t_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% Student-t interval (for a few seeds)."""
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return mean, float("nan")
    return mean, _T975.get(n - 1, 1.96) * std / math.sqrt(n)


def bootstrap_ci(values: Sequence[float], *, seed: int = 0, resamples: int = 2000) -> tuple[float, float, float]:
    """Mean and its 95% percentile-bootstrap interval (for many items, e.g. per-question correctness)."""
    arr = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(resamples, len(arr)))].mean(axis=1)  # (R,)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(arr.mean()), float(lo), float(hi)


def fmt_pm(mean: float, spread: float, digits: int = 3) -> str:
    if math.isnan(spread):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def fmt_sci(x: float) -> str:
    return f"{x:.1e}"


# --- output -----------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """What an experiment produced: the markdown table, the figure, and the paths they were written to."""

    name: str
    table: str
    rows: list[dict[str, object]] = field(default_factory=list)
    table_path: Path | None = None
    plot_path: Path | None = None
    seconds: float = 0.0


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(ncols: int = 1, width: float = 6.4, height: float = 4.0) -> tuple[Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


class Clock:
    """Wall time and this process's CPU time: on a shared machine the wall time depends on the neighbours, the
    CPU time much less (with one thread it is the wall time the run would take on an idle core)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def cpu_seconds(self) -> float:
        return time.process_time() - self.cpu_started


def publish(run: RunArgs, name: str, title: str, table: str, fig: Figure, *, notes: str = "",
            rows: list[dict[str, object]] | None = None, clock: Clock | None = None) -> Result:  # fmt: skip
    """Write ``<out>/<name>.md`` (title, table, notes, the command and its run time) and ``<out>/<name>.png``,
    print the table, and return both."""
    run.out.mkdir(parents=True, exist_ok=True)
    seconds = clock.seconds if clock else 0.0
    cpu = clock.cpu_seconds if clock else 0.0
    command = " ".join(["python -m", f"bench.experiments.{name}", *map(shlex.quote, run.argv)])
    md = [f"### {title}", "", table, ""]
    if notes:
        md += [notes, ""]
    md += [f"Command: `{command}` (seed {run.seed}{', smoke' if run.smoke else ''}); "
           f"ran in {seconds:.0f} s wall, {cpu:.0f} s CPU, with {torch.get_num_threads()} torch thread(s); 1-minute "
           f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", ""]  # fmt: skip
    table_path = run.out / f"{name}.md"
    plot_path = run.out / f"{name}.png"
    table_path.write_text("\n".join(md))
    fig.tight_layout()
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)
    print(f"\n{title}\n\n{table}\n")
    if notes:
        print(notes)
    print(f"wrote {table_path} and {plot_path} ({seconds:.0f} s wall, {cpu:.0f} s CPU)")
    return Result(name=name, table=table, rows=rows or [], table_path=table_path, plot_path=plot_path,
                  seconds=seconds)  # fmt: skip


# --- models -----------------------------------------------------------------------------------------------------


@functools.cache
def tiny_llama_dir() -> Path:
    """The tiny Llama from tests/tiny.py, built once per process."""
    from tests.tiny import build_tiny_llama

    return build_tiny_llama(Path(tempfile.mkdtemp(prefix="maskserve-tiny-llama-")))


def load_decoder(smoke: bool) -> LoadedModel:
    """The bundled SmolLM2-135M-Instruct, or under --smoke the tiny Llama from tests/tiny.py."""
    # float32: the experiments' results (and their checks) were measured there; the fast path is a speed choice.
    if not smoke:
        return load_model(load_settings(adapter="none", precision="float32"))
    return load_model(load_settings(model=str(tiny_llama_dir()), adapter="none", precision="float32"))


def greedy_chat(
    loaded: LoadedModel,
    vocab: ModelVocab,
    requests: Sequence[tuple[str, SamplingParams, OutputMaskSpec]],
    batch_size: int,
) -> list[RunningRequest]:
    """Each (user message, sampling, output masks) through the engine's own decode loop, ``batch_size`` at a
    time (chat template, masks compiled as the server compiles them); returns the finished sequences."""
    model, tok = loaded.generation_model, loaded.tokenizer
    assert model is not None
    engine = DecodeBatch.serving(loaded, vocab)
    done: list[RunningRequest] = []
    for start in range(0, len(requests), batch_size):
        seqs = []
        for message, params, spec in requests[start : start + batch_size]:
            prompt = tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
            job = GenerationJob(list(tok(str(prompt), add_special_tokens=False)["input_ids"]), params, spec)
            compile_job(job, vocab, dtype=loaded.dtype, dims=loaded.attention_dims)
            seqs.append(RunningRequest(job, loaded.device))
        with torch.inference_mode():
            engine.add(seqs)
            while engine.rows:
                engine.step()
        done += seqs
    return done
