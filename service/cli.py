"""Command line: ``maskserve serve | info | finetune | eval``.

maskserve serve [--host 127.0.0.1] [--port 8000] [--model DIR|bundled] [--adapter DIR|shipped|none]
maskserve info  [--model ...] [--adapter ...]     # what would be served, as JSON
maskserve finetune --data FILE [--objective mlm|mntp|sft] [--out DIR] ...   # see service/training/finetune.py
maskserve eval fill-mask [--cloze FILE] [--mode both|plain|whole_word] [--model ...] [--adapter ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from service.cli_args import add_dataclass_flags, add_settings_flags, from_args
from service.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

MODEL_FLAGS = ("model", "adapter")  # Settings fields every model-loading subcommand can override


def _settings(args: argparse.Namespace, *names: str) -> Settings:
    overrides = {n: getattr(args, n) for n in (*MODEL_FLAGS, *names) if getattr(args, n, None) is not None}
    return load_settings(**overrides)


def run_server(app: FastAPI, settings: Settings) -> None:
    """Serve ``app`` until SIGTERM/SIGINT. uvicorn then stops accepting connections, lets in-flight requests
    finish (up to MASKSERVE_SHUTDOWN_TIMEOUT_S) and only then runs the lifespan's shutdown (``Engine.stop``).
    Logs are JSON lines (``service.logs``); the access line comes from the middleware, not uvicorn.
    """
    import uvicorn

    from service.logs import configure_logging

    configure_logging(settings.log_level)
    # uvicorn turns SIGTERM into a drain, then restores the previous handler and raises the signal again, so
    # that the process dies of it (status 143). A drained shutdown is a clean one: exit 0 instead, so
    # orchestrators and supervisors do not report a completed shutdown as a crash.
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            log_level=settings.log_level,
            access_log=False,
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
            timeout_keep_alive=settings.keep_alive_s,
        )
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


# OMP_WAIT_POLICY is left to the environment (libgomp's default: a team spins briefly after each parallel
# region, then sleeps, and spins less once it has more threads than free cores). A decode step runs a few hundred
# parallel regions tens of microseconds apart: waking sleeping threads for each (PASSIVE) made one int8 step
# 2-2.5x as long on an idle 2-core machine (bench/omp_policy.py, docs/fill-mask.md "CPU threads"). On cores
# shared with other busy work, export OMP_WAIT_POLICY=PASSIVE before `maskserve serve`: spinning then takes
# the CPU the forward needs.


def cmd_serve(args: argparse.Namespace) -> int:
    from service.app import create_app

    settings = _settings(args, "host", "port")
    run_server(create_app(settings), settings)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from service.engine.loading import load_model

    settings = _settings(args)
    started = time.perf_counter()
    m = load_model(settings)
    info = {"model": m.name, **m.describe(), "vocab_size": m.vocab_size}
    info["load_seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(info, indent=2))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from service.training.config import config_from_args
    from service.training.finetune import run

    logging.basicConfig(level="WARNING")
    run(config_from_args(args))
    return 0


def cmd_eval_fill_mask(args: argparse.Namespace) -> int:
    from service.training.config import FillMaskEvalConfig
    from service.training.eval import run_cli

    return run_cli(_settings(args), from_args(FillMaskEvalConfig, args))


def _command(
    group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str
) -> argparse.ArgumentParser:
    """A subcommand whose one-line summary in ``maskserve --help`` also heads its own ``--help``."""
    return group.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")


def build_parser() -> argparse.ArgumentParser:
    """Every flag's help, default and choices come from ``Settings`` or a config dataclass (service/cli_args.py)."""
    from service.training.config import FillMaskEvalConfig, add_arguments

    parser = argparse.ArgumentParser(prog="maskserve", description="Mask-aware transformer inference service")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = _command(sub, "serve", "run the HTTP service")
    add_settings_flags(serve, "host", "port", *MODEL_FLAGS)
    serve.set_defaults(func=cmd_serve)
    info = _command(sub, "info", "load the model and print what would be served, as JSON")
    add_settings_flags(info, *MODEL_FLAGS)
    info.set_defaults(func=cmd_info)
    finetune = _command(sub, "finetune", "fine-tune with input, attention and loss masks (LoRA); see docs/finetune.md")
    add_arguments(finetune)
    finetune.set_defaults(func=cmd_finetune)
    evaluate = _command(sub, "eval", "evaluate the served model")
    eval_sub = evaluate.add_subparsers(dest="task", required=True)
    fill = _command(eval_sub, "fill-mask", "top-1/top-5 accuracy on a cloze file")
    add_dataclass_flags(fill, FillMaskEvalConfig)
    add_settings_flags(fill, *MODEL_FLAGS)
    fill.set_defaults(func=cmd_eval_fill_mask)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"maskserve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
