"""The image built from the project's Dockerfile and run, then the Kubernetes manifests played, with Debian's
buildah and podman (no Docker daemon) through ``scripts/container.sh``, the commands docs/production.md gives.

The image is built once for the module (build arguments only: a local Debian base, torch's wheel as a named
build context), run with the bundled model on an empty cache, and everything made is removed at the end (the
script's ``clean``: containers, pods, volumes, images and their storage). Only the debootstrap'd base rootfs and
torch's wheel stay cached, in ~/.cache/maskserve-container, so a rerun skips fetching them.

Needs root (debootstrap, rootful podman); `make test` installs the packages. Without root the module skips.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "container.sh"
TOOLS = ["buildah", "podman", "debootstrap", "runc"]
UID = 10001
# First start on an empty cache: de-quantize the bundled model (~30 s here), then load it and the adapter.
READY_TIMEOUT_S = 420


@dataclass
class Podman:
    """scripts/container.sh with this test's private state directory and port."""

    env: dict[str, str]
    port: int

    def script(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            command = " ".join(args)
            pytest.fail(f"container.sh {command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.script("podman", *args, timeout=timeout, check=check)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, container: str, headers: dict[str, str] | None = None) -> float:
        """Poll /ready until 200; fail with the container's log if it exits or the time runs out."""
        start = time.monotonic()
        while time.monotonic() - start < READY_TIMEOUT_S:
            try:
                if httpx.get(f"{self.url}/ready", headers=headers, timeout=3).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            state = self.podman("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
            if state in {"exited", "stopped"}:
                break
            time.sleep(2)
        log = self.podman("logs", "--tail", "40", container, check=False)
        pytest.fail(f"{container} not ready (state {state!r}):\n{log.stdout}{log.stderr}")


def _free_port() -> int:
    # 8000 may be taken by a developer's `make serve`: the host network is shared
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """The image, built once; at the end everything the script made is removed, storage included."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        pytest.skip(f"needs root (debootstrap, rootful podman); missing tools: {missing or 'none'}")
    if missing:
        pytest.fail(f"{missing} missing: run `make test` (it installs them) or `scripts/container.sh deps`")
    state = tmp_path_factory.mktemp("container-state")
    env = {**os.environ, "MASKSERVE_CONTAINER_STATE": str(state), "MASKSERVE_CONTAINER_PORT": str(_free_port())}
    pod = Podman(env, int(env["MASKSERVE_CONTAINER_PORT"]))
    try:
        pod.script("build", timeout=1200)
        yield pod
    finally:
        pod.script("clean", timeout=300)
        assert not state.exists()


# --- the image, run -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def container(built: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """The image running with the bundled model on an empty host-directory cache."""
    cache = tmp_path_factory.mktemp("model-cache")
    built.env["MASKSERVE_MODEL_CACHE"] = str(cache)
    built.script("run", "-e", "MASKSERVE_SHUTDOWN_TIMEOUT_S=30")
    built.wait_ready("maskserve")
    yield built
    built.podman("rm", "--force", "maskserve", check=False)


def test_image_labels_user_and_healthcheck(built: Podman) -> None:
    image = json.loads(built.podman("image", "inspect", "localhost/maskserve:0.1.0").stdout)[0]
    config = image["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["maskserve"]
    assert config["Cmd"] == ["serve"]
    assert "MASKSERVE_CACHE_DIR=/var/cache/maskserve" in config["Env"]


def test_fill_mask_and_generation(container: Podman) -> None:
    fill = httpx.post(f"{container.url}/v1/fill-mask", json={"inputs": "The [MASK] barked at the mailman."}, timeout=60)
    assert fill.status_code == 200
    assert "dog" in [c["token_str"].strip() for c in fill.json()[:5]]
    gen = httpx.post(
        f"{container.url}/v1/generate",
        json={"prompt": "The capital of France is", "max_new_tokens": 4},
        timeout=60,
    )
    assert gen.status_code == 200
    assert "Paris" in gen.json()["generated_text"]


def test_runs_as_the_non_root_user(container: Podman) -> None:
    pid = container.podman("inspect", "--format", "{{.State.Pid}}", "maskserve").stdout.strip()
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == [str(UID)] * 4  # real, effective, saved, filesystem: the server process (PID 1) itself
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:3] == [b"/opt/venv/bin/maskserve", b"serve"]
    # and the cache it wrote on the host directory is the image user's
    cache = Path(container.env["MASKSERVE_MODEL_CACHE"])
    written = [p for p in cache.rglob("*") if p.is_file()]
    assert written
    assert {p.stat().st_uid for p in written} == {UID}


def test_healthcheck_reports_healthy(container: Podman) -> None:
    # --format docker kept the Dockerfile's HEALTHCHECK (the OCI format drops it): the container has it
    health = json.loads(container.podman("inspect", "--format", "{{json .Config.Healthcheck}}", "maskserve").stdout)
    assert health["Test"][:3] == ["CMD", "python", "-c"]
    assert "/health" in health["Test"][3]
    result = container.podman("healthcheck", "run", "maskserve", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    status = container.podman("inspect", "--format", "{{.State.Health.Status}}", "maskserve").stdout.strip()
    assert status == "healthy"


def test_sigterm_drains_an_in_flight_generation(container: Podman) -> None:
    # A stream that cannot end early (end-of-text tokens banned) is under way when SIGTERM arrives; it must
    # still run to its last token, then the server exits 0.
    tokens = 48
    no_end = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>
    body = {"prompt": "Once upon a time", "max_new_tokens": tokens, "stream": True, "logit_bias": no_end}
    events: list[dict[str, Any]] = []
    first = threading.Event()
    outcome: dict[str, Any] = {}

    def client() -> None:
        with httpx.stream("POST", f"{container.url}/v1/generate", json=body, timeout=120) as response:
            outcome["status"] = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    first.set()

    thread = threading.Thread(target=client)
    thread.start()
    assert first.wait(60), "no token streamed"
    stopped_at = len(events)
    exit_code = container.script("stop", timeout=120).stdout.strip()
    thread.join(60)
    assert outcome["status"] == 200
    assert stopped_at < tokens  # SIGTERM came mid-stream
    final = events[-1]
    assert "error" not in final
    assert (final["finish_reason"], final["usage"]["completion_tokens"]) == ("length", tokens), final
    assert exit_code == "0"
    log = container.podman("logs", "maskserve").stderr + container.podman("logs", "maskserve").stdout
    assert "Application shutdown complete" in log


# --- the Kubernetes manifests, played ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def played(built: Podman) -> Iterator[tuple[Podman, str]]:
    """podman kube play of the ConfigMap, Secret, Deployment and Service, with a fresh key in the Secret."""
    key = secrets.token_hex(16)
    built.env["MASKSERVE_API_KEY"] = key
    built.env["MASKSERVE_CONTAINER_PORT"] = str(_free_port())
    played = Podman(built.env, int(built.env["MASKSERVE_CONTAINER_PORT"]))
    try:
        played.script("play", timeout=300)
        yield played, key
    finally:
        if played.podman("pod", "ps", "--quiet", check=False).stdout.strip():
            played.script("down", timeout=300, check=False)


def test_kube_play_pod_becomes_ready_and_enforces_the_key(played: tuple[Podman, str]) -> None:
    pod, key = played
    container = "maskserve-pod-0-maskserve"  # the Deployment's pod 0, its container "maskserve"
    manifest = yaml.safe_load_all(Path(pod.env["MASKSERVE_CONTAINER_STATE"], "kube.yaml").read_text())
    deployment = next(doc for doc in manifest if doc and doc["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]["containers"][0]
    # podman 4.3 runs neither readiness nor startup probes (only liveness, as a healthcheck): poll the readiness
    # probe's own target, as the kubelet would, and require 200 there (the probes need no key)
    probe = spec["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/ready", pod.port)
    pod.wait_ready(container)
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{pod.url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{pod.url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert httpx.get(f"{pod.url}/v1/models", headers=auth, timeout=10).status_code == 200
    metrics = httpx.get(f"{pod.url}/metrics", headers=auth, timeout=10)
    assert metrics.status_code == 200
    assert 'maskserve_requests_total{route="/v1/models",status="401"} 2.0' in metrics.text
    assert httpx.get(f"{pod.url}/metrics", timeout=10).status_code == 401
    # the Deployment's security context, applied: the image user, a read-only root filesystem, every
    # capability dropped
    inspect = json.loads(pod.podman("inspect", container).stdout)[0]
    assert inspect["Config"]["User"] == f"{UID}:{UID}"
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    assert "CAP_CHOWN" in inspect["HostConfig"]["CapDrop"]
    assert inspect["EffectiveCaps"] in (None, [])
    fill = httpx.post(f"{pod.url}/v1/fill-mask", json={"inputs": "The [MASK] barked."}, headers=auth, timeout=60)
    assert fill.status_code == 200


def test_kube_down_removes_the_pod(played: tuple[Podman, str]) -> None:
    pod, _ = played
    pod.script("down", timeout=300)
    assert pod.podman("pod", "ps", "--quiet").stdout.strip() == ""
    names = pod.podman("ps", "--all", "--format", "{{.Names}}").stdout.split()
    assert [name for name in names if name.startswith("maskserve-pod")] == []  # the image's own run stays
