"""The real Hugging Face ``InferenceClient.fill_mask`` against a live uvicorn server (tiny BERT, loopback).

huggingface_hub sends ``{"inputs": text, "parameters": {"targets", "top_k"}}`` (None values dropped) to a
URL model as is, and parses the answer with ``FillMaskOutputElement.parse_obj_as_list``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from huggingface_hub import InferenceClient, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.inference._generated.types import FillMaskOutputElement

from service.app import create_app
from service.config import Settings
from service.engine.loading import LoadedModel
from tests.live import live_server


@pytest.fixture(scope="module")
def server_url(bert_settings: Settings, tiny_bert: LoadedModel) -> Iterator[str]:
    with live_server(create_app(bert_settings, loaded=tiny_bert)) as url:
        yield f"{url}/v1/fill-mask"


@pytest.fixture(autouse=True)
def loopback_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's offline mode (HF_HUB_OFFLINE=1, set for the whole session) refuses every request,
    even to loopback; these tests only talk to 127.0.0.1, so it is lifted for them."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_inference_client_fill_mask(server_url: str) -> None:
    client = InferenceClient(model=server_url)
    out = client.fill_mask("The [MASK] sees the red ball.")
    assert len(out) == 5
    assert all(isinstance(o, FillMaskOutputElement) for o in out)
    assert [o.score for o in out] == sorted((o.score for o in out), reverse=True)
    assert out[0].token_str == "##f"
    assert out[0].sequence == "thef sees the red ball."
    assert isinstance(out[0].token, int)

    two = client.fill_mask("The [MASK] sees the red ball.", top_k=2)
    assert [(o.token, o.token_str, o.sequence) for o in two] == [(o.token, o.token_str, o.sequence) for o in out[:2]]

    targeted = client.fill_mask("The [MASK] sees the red ball.", targets=["barked", "dog"])
    assert sorted(o.token_str for o in targeted) == ["barked", "dog"]
    barked = next(o for o in targeted if o.token_str == "barked")
    assert barked.sequence == "the barked sees the red ball."
    # the extension field arrives as an extra attribute, which the generated dataclass cannot declare
    tokens = barked.tokens  # type: ignore[attr-defined]
    assert tokens == [barked.token, *tokens[1:]]
    assert len(tokens) == 4


def test_inference_client_sees_our_errors(server_url: str) -> None:
    client = InferenceClient(model=server_url)
    with pytest.raises(HfHubHTTPError) as err:
        client.fill_mask("no mask in this text")
    assert err.value.response.status_code == 400
    assert err.value.response.json()["error"]["param"] == "inputs"
    assert "has no mask" in str(err.value)
