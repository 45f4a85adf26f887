"""The fused decode step (service/engine/fused_decoder.py) against transformers' own step, on the same weights.

Both start from one prefill's KV cache and take the same masks; the fused step must give the same logits bit
for bit (it runs the same kernels on the same numbers, in fewer operators), in every precision, with an
emphasis bias scoped to chosen layers and heads too. The invariance tests of test_generate_engine.py and
test_precision.py run on the fused step already (their batches are ``DecodeBatch.serving``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from service.config import Settings, load_settings
from service.engine.fused_decoder import FusedDecoder, stack_rows
from service.engine.kv_cache import BatchKVCache
from service.engine.loading import LoadedModel, load_model
from service.engine.precision import Int8Linear
from service.masks.batch import ScopedBias

PRECISIONS = ["float32", "bfloat16", "int8"]


@pytest.fixture(scope="module", params=PRECISIONS)
def loaded(request: pytest.FixtureRequest, llama_settings: Settings) -> LoadedModel:
    return load_model(load_settings(**{**llama_settings.model_dump(), "precision": request.param}))


def _prefill(
    loaded: LoadedModel, prompts: list[list[int]]
) -> tuple[BatchKVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts through transformers' forward; the cache, key mask (B, T), next tokens and positions."""
    model = loaded.generation_model
    assert model is not None
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # (B, T)
    keys = torch.zeros(len(prompts), width, dtype=torch.bool)  # (B, T)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :], keys[b, width - len(p) :] = torch.tensor(p), True
    positions = (keys.cumsum(1) - 1).clamp(min=0)  # (B, T)
    structure = torch.tril(torch.ones(width, width, dtype=torch.bool)) & keys[:, None, :]
    mask = (structure | torch.eye(width, dtype=torch.bool))[:, None]  # (B, 1, T, T); padding queries see themselves
    cache = BatchKVCache(int(model.config.num_hidden_layers))
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
    return cache, keys, out.logits[:, -1].argmax(-1), positions[:, -1] + 1


@pytest.mark.parametrize("scoped", [False, True], ids=["mask", "scoped-bias"])
def test_fused_step_equals_transformers_step_bit_for_bit(loaded: LoadedModel, scoped: bool) -> None:
    model, decoder = loaded.generation_model, loaded.decoder
    assert model is not None
    assert decoder is not None
    cache, keys, tokens, positions = _prefill(loaded, [[5, 9, 14, 3, 8], [7, 2], [11, 12, 13]])
    theirs = copy.deepcopy(cache)
    layers, heads = loaded.attention_dims
    bias = torch.zeros(3, keys.shape[1])  # (B, S): emphasis on the first real key of row 0, steps add zeros
    bias[0, -5] = 2.0
    scope = torch.zeros(3, layers, heads, dtype=torch.bool)  # (B, L, H): row 0, layer 1, heads 0 and 3
    scope[0, 1, [0, 3]] = True
    with torch.inference_mode():
        for _ in range(6):
            keys = torch.cat([keys, torch.ones(3, 1, dtype=torch.bool)], 1)  # (B, S)
            bias = torch.cat([bias, torch.zeros(3, 1)], 1)
            extra = ScopedBias(bias.to(loaded.dtype), scope) if scoped else None
            mask = keys[:, None, None, :]  # (B, 1, 1, S)
            kwargs = {"scoped_bias": extra} if extra is not None else {}
            expected = model(
                input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None], cache=theirs,
                logits_to_keep=1, **kwargs,
            ).logits[:, -1].float()  # fmt: skip
            got = decoder.step(tokens, mask, positions, cache, extra)  # (B, V)
            assert torch.equal(got, expected)
            tokens, positions = expected.argmax(-1), positions + 1
    if scoped:  # the bias did reach the fused step: without it row 0 differs
        plain = decoder.step(
            tokens,
            torch.cat([keys, torch.ones(3, 1, dtype=torch.bool)], 1)[:, None, None],
            positions,
            copy.deepcopy(cache),
        )
        with_bias = decoder.step(
            tokens, torch.cat([keys, torch.ones(3, 1, dtype=torch.bool)], 1)[:, None, None], positions, cache,
            ScopedBias(torch.cat([bias, torch.zeros(3, 1)], 1).to(loaded.dtype), scope),
        )  # fmt: skip
        assert not torch.equal(plain[0], with_bias[0])
        assert torch.equal(plain[1:], with_bias[1:])


@pytest.mark.parametrize("kind", ["linear", "int8"])
def test_stacked_rows_compute_the_parts_and_share_their_storage(kind: str) -> None:
    torch.manual_seed(0)
    parts: list[nn.Module] = [nn.Linear(32, n, bias=False) for n in (16, 48, 32)]
    if kind == "int8":
        parts = [Int8Linear.from_linear(p) for p in parts]  # type: ignore[arg-type]
    x = torch.randn(3, 1, 32)  # a decode step's shape: (B, 1, K)
    before = [p(x) for p in parts]
    stacked = stack_rows(parts)
    assert torch.equal(stacked(x), torch.cat(before, dim=-1))
    for p, y in zip(parts, before, strict=True):
        assert torch.equal(p(x), y)  # the parts still compute what they did, on views of the stacked rows
    name = "qweight" if kind == "int8" else "weight"
    whole: torch.Tensor = getattr(stacked, name)
    for p in parts:
        assert getattr(p, name).untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


def test_architectures_other_than_llama_keep_transformers_forward(tiny_bert: LoadedModel) -> None:
    assert FusedDecoder.supports(tiny_bert.fill_mask_model) is not None


def test_the_setting_turns_the_fused_step_off(llama_settings: Settings) -> None:
    off = load_model(load_settings(**{**llama_settings.model_dump(), "fused_decode": False}))
    assert off.decoder is None
    assert off.describe()["decode"] == "transformers"
    assert load_model(llama_settings).describe()["decode"] == "fused"
