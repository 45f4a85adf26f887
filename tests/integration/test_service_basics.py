"""/health, /ready, /v1/models and the error shape, on the tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.engine.loading import LoadedModel


def test_health_ready_models(bert_settings: Settings, tiny_bert: LoadedModel) -> None:
    with TestClient(create_app(bert_settings, loaded=tiny_bert)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").status_code == 200
        data = client.get("/v1/models").json()["data"][0]
        assert data["kind"] == "encoder"
        assert data["mask_token"] == "[MASK]"
        assert data["tasks"] == ["fill-mask"]
        assert data["device"] == "cpu"
        assert data["dtype"] == "float32"


def test_ready_is_503_before_start(bert_settings: Settings) -> None:
    client = TestClient(create_app(bert_settings))  # no context manager: the lifespan has not run
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "loading"}
    response = client.get("/v1/models")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "unavailable_error"


def test_unknown_route_uses_error_shape(bert_settings: Settings, tiny_bert: LoadedModel) -> None:
    with TestClient(create_app(bert_settings, loaded=tiny_bert)) as client:
        response = client.get("/nope")
        assert response.status_code == 404
        assert response.json() == {
            "error": {"message": "Not Found", "type": "not_found_error", "param": None, "code": None}
        }


def test_models_names_the_adapter_and_holds_no_server_path(mntp_settings: Settings, tiny_mntp: LoadedModel) -> None:
    with TestClient(create_app(mntp_settings, loaded=tiny_mntp)) as client:
        (model,) = client.get("/v1/models").json()["data"]
    assert model["adapter"] == Path(str(tiny_mntp.adapter)).name
    assert str(Path(str(tiny_mntp.adapter)).parent) not in json.dumps(model)
