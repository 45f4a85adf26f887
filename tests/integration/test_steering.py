"""The engine's attention function (service/engine/steering.py) against transformers' own attention paths."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DistilBertConfig, DistilBertForMaskedLM, PreTrainedModel

from service.engine.steering import STEERED_SDPA, AttentionProbe, enable_steering
from service.masks.attention import causal_mask, to_additive
from service.masks.batch import ScopedBias

IDS = torch.tensor([[5, 9, 14, 3, 22, 7]])  # (1, T)


@pytest.fixture(scope="module")
def steered(tiny_llama_dir: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert enable_steering(model)
    assert model.config._attn_implementation == STEERED_SDPA
    return model


def test_without_kwargs_it_is_exactly_sdpa(tiny_llama_dir: Path, steered: PreTrainedModel) -> None:
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        assert torch.equal(plain(input_ids=IDS).logits, steered(input_ids=IDS).logits)


def test_probe_equals_eager_attention_weights(tiny_llama_dir: Path, steered: PreTrainedModel) -> None:
    eager = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    probe = AttentionProbe()
    with torch.inference_mode():
        expected = eager(input_ids=IDS, output_attentions=True).attentions  # per layer (1, H, T, T)
        steered(input_ids=IDS, attention_probe=probe)
    assert sorted(probe.layers) == list(range(len(expected)))
    for layer, weights in enumerate(expected):
        assert torch.allclose(probe.layers[layer], weights[0].mean(dim=0), atol=1e-6)


def test_scoped_bias_without_a_mask_keeps_the_model_causal(steered: PreTrainedModel) -> None:
    """A scoped bias needs a mask to ride in; with none given, the causal one is used (not an all-open one)."""
    t = IDS.shape[1]
    n_layers = steered.config.num_hidden_layers
    n_heads = steered.config.num_attention_heads
    bias = torch.full((1, t), -math.log(4.0)).index_fill(1, torch.tensor([0, 1]), 0.0)  # (1, T)
    everywhere = ScopedBias(bias, torch.ones(1, n_layers, n_heads, dtype=torch.bool))
    causal = to_additive(causal_mask(t)[None, None], torch.float32) + bias[:, None, None, :]  # (1, 1, T, T)
    with torch.inference_mode():
        no_mask = steered(input_ids=IDS, scoped_bias=everywhere).logits
        in_mask = steered(input_ids=IDS, attention_mask=causal).logits
        # causal: the first tokens' outputs do not change when a later token does
        other = IDS.clone()
        other[0, -1] = 30
        changed = steered(input_ids=other, scoped_bias=everywhere).logits
    assert torch.allclose(no_mask, in_mask, atol=1e-5)
    assert torch.equal(no_mask[0, :-1], changed[0, :-1])


def test_a_model_whose_layers_do_not_report_keeps_sdpa() -> None:
    """DistilBERT's attention modules carry no layer index: a scoped bias could not find its layer, so the
    model is not steered (and layers/heads are refused for it)."""
    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32)
    model = DistilBertForMaskedLM(config).eval()
    assert not enable_steering(model)
    assert model.config._attn_implementation == "sdpa"
