"""Fill-mask end to end on the real bundled model (SmolLM2-135M-Instruct) with the shipped MNTP adapter.

The adapter under service/adapters/smollm2-mntp is trained by `maskserve finetune --objective mntp` (the
fine-tuning issue). Until it is committed this test fails on purpose, saying so: without it the bundled
model cannot fill masks at all.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import load_settings
from service.engine.loading import SHIPPED_ADAPTER_DIR

pytestmark = pytest.mark.slow


def test_bundled_model_fills_dog() -> None:
    if not (SHIPPED_ADAPTER_DIR / "adapter_config.json").is_file():
        pytest.fail(
            f"the shipped MNTP adapter is missing: {SHIPPED_ADAPTER_DIR}/adapter_config.json does not exist. "
            "Train it with `maskserve finetune --objective mntp` and commit it there (fine-tuning issue)."
        )
    settings = load_settings(model="bundled", adapter="shipped")
    with TestClient(create_app(settings)) as client:
        info = client.get("/v1/models").json()["data"][0]
        assert (info["kind"], info["adapter_objective"], info["tasks"]) == (
            "decoder",
            "mntp",
            ["fill-mask", "generate"],
        )
        response = client.post("/v1/fill-mask", json={"inputs": "The [MASK] barked at the mailman."})
    assert response.status_code == 200
    body = response.json()
    assert len(body) == 5
    for cand in body:
        assert list(cand) == ["sequence", "score", "token", "token_str"]
        assert 0 < cand["score"] <= 1
        assert isinstance(cand["token"], int)
        assert cand["sequence"] == f"The{cand['token_str']} barked at the mailman."
    assert [c["score"] for c in body] == sorted((c["score"] for c in body), reverse=True)
    top3 = [c["token_str"].strip().lower() for c in body[:3]]
    assert "dog" in top3, top3
