"""The committed MNTP adapter on the real bundled model (CI runs these; about half a minute)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from service.config import load_settings
from service.engine.fill.driver import FillDriver
from service.engine.loading import SHIPPED_ADAPTER_DIR, AdapterObjective, LoadedModel, load_model
from service.training.eval import ClozeItem, EvalMode, answer_text, predict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped() -> LoadedModel:
    return load_model(load_settings())  # adapter "shipped" is the default


@pytest.fixture(scope="module")
def driver(shipped: LoadedModel) -> FillDriver:
    return FillDriver(shipped, load_settings())


def test_adapter_files_are_small_fp16_and_described() -> None:
    weights = SHIPPED_ADAPTER_DIR / "adapter_model.safetensors"
    assert weights.stat().st_size < 15 * 2**20
    assert {t.dtype for t in load_file(weights).values()} == {torch.float16}
    assert json.loads((SHIPPED_ADAPTER_DIR / "maskserve.json").read_text()) == {
        "objective": "mntp", "mask_token": "<empty_output>", "prefix_token": "<|im_start|> Ġand",
        "space_first_word": True,
    }  # fmt: skip
    card = (SHIPPED_ADAPTER_DIR / "README.md").read_text()
    for needed in ("SmolLM2-135M-Instruct", "wordnet-base", "trans-de-en", "fortunes", "## Reproduce", "whole_word"):
        assert needed in card
    assert (SHIPPED_ADAPTER_DIR / "training_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_load_model_picks_up_the_shipped_adapter(shipped: LoadedModel) -> None:
    assert shipped.adapter == str(SHIPPED_ADAPTER_DIR)
    assert shipped.adapter_objective is AdapterObjective.MNTP
    assert shipped.mntp
    assert shipped.mask_token == "<empty_output>"
    assert shipped.fill_mask_model is not shipped.generation_model  # the base still generates, untouched


@pytest.mark.parametrize(
    ("text", "answer"),
    [("The [MASK] barked at the mailman.", "dog"), ("Birds can [MASK] because they have wings.", "fly")],
)
def test_fills_everyday_sentences(driver: FillDriver, text: str, answer: str) -> None:
    for mode in EvalMode:  # the evaluator's path, which is the server's
        (cands,) = predict(driver, [ClozeItem(text, (answer,))], mode)
        assert answer in [answer_text(c).lower() for c in cands[:3]]


def test_the_readme_example_finds_jupiter(driver: FillDriver) -> None:
    """README: {"inputs": "[MASK] is the largest planet.", "parameters": {"whole_word": true, "top_k": 3}}."""
    (cands,) = predict(driver, [ClozeItem("[MASK] is the largest planet.", ("Jupiter",))], EvalMode.WHOLE_WORD, 3)
    assert "Jupiter" in [answer_text(c) for c in cands]
