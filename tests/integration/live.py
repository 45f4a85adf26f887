"""A real uvicorn server in a subprocess, on a free loopback port, for tests that need sockets and signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """The server's output parsed as JSON lines (every line must be one: that is the log format)."""
        return [json.loads(line) for line in self.log().splitlines() if line.strip()]

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@contextmanager
def live_server(args: list[str], env: dict[str, str], log_path: Path, *, timeout: float = 60) -> Iterator[LiveServer]:
    """Start ``python <args>`` with MASKSERVE_* ``env`` (port chosen here) and wait until /ready answers 200."""
    port = free_port()
    full_env = {**os.environ, "MASKSERVE_HOST": "127.0.0.1", "MASKSERVE_PORT": str(port), **env}
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env, stdout=log, stderr=log)
    server = LiveServer(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout} s:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
