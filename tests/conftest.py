"""Shared fixtures: tiny models built once per session, settings and loaded models for them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from service.config import Settings, load_settings  # noqa: E402
from service.engine.loading import LoadedModel, load_model  # noqa: E402
from tests.tiny import build_tiny_bert, build_tiny_llama, build_tiny_mntp_adapter  # noqa: E402

# The shared fixtures run float32: many tests compare against a float32 reference (transformers' pipeline,
# PEFT's merge) to 1e-6. The int8 fast path (the default on CPU) re-runs the invariance tests in
# tests/integration/test_precision.py.
REFERENCE = "float32"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def bert_settings(tiny_bert_dir: Path) -> Settings:
    return load_settings(model=str(tiny_bert_dir), adapter="none", max_batch_wait_ms=5, precision=REFERENCE)


@pytest.fixture(scope="session")
def llama_settings(tiny_llama_dir: Path) -> Settings:
    return load_settings(model=str(tiny_llama_dir), adapter="none", precision=REFERENCE)


@pytest.fixture(scope="session")
def tiny_bert(bert_settings: Settings) -> LoadedModel:
    return load_model(bert_settings)


@pytest.fixture(scope="session")
def tiny_llama(llama_settings: Settings) -> LoadedModel:
    return load_model(llama_settings)


@pytest.fixture(scope="session")
def tiny_mntp_adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_mntp_adapter(tiny_llama_dir, tmp_path_factory.mktemp("tiny-mntp"))


@pytest.fixture(scope="session")
def mntp_settings(tiny_llama_dir: Path, tiny_mntp_adapter_dir: Path) -> Settings:
    return load_settings(
        model=str(tiny_llama_dir), adapter=str(tiny_mntp_adapter_dir), max_batch_wait_ms=5, precision=REFERENCE
    )


@pytest.fixture(scope="session")
def tiny_mntp(mntp_settings: Settings) -> LoadedModel:
    """The tiny Llama with a random MNTP adapter: fill-mask through a decoder."""
    return load_model(mntp_settings)
