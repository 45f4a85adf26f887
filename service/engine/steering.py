"""The engine's attention function: transformers' SDPA, plus what one shared 4D mask cannot carry.

A model's forward passes one attention mask to every layer. Two things need a layer's own view, and ride in
forward kwargs that transformers hands through to the attention function (``AttentionInterface``):

- ``scoped_bias`` (:class:`service.masks.attention.ScopedBias`): emphasis on chosen layers/heads; this
  function only *adds* ``scoped_bias.for_layer(module.layer_idx)`` to the mask it was given — the bias itself
  is built in service/masks;
- ``attention_probe`` (:class:`AttentionProbe`): records each layer's attention weights averaged over heads,
  for the inspection picture. Recording computes the weights explicitly (as the eager path does); it is
  used only by dry runs, never while decoding.

With neither kwarg the call is exactly ``sdpa_attention_forward`` (bit-identical outputs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from service.masks.attention import causal_mask, to_additive
from service.masks.batch import ScopedBias

log = logging.getLogger("maskserve.steering")

STEERED_SDPA = "maskserve_sdpa"


@dataclass
class AttentionProbe:
    """Collects, per layer, the attention weights of batch row 0 averaged over heads: ``layers[l]`` (T, S)."""

    layers: dict[int, Tensor] = field(default_factory=dict)


def _mask_as_scores(mask: Tensor | None, module: torch.nn.Module, query: Tensor, key: Tensor, kwargs: dict) -> Tensor:
    """The mask SDPA would apply, as additive scores (0 = attend).  # -> (B|1, 1|H, T, S)

    No mask means causal for a causal module (queries being the last ``T`` of the ``S`` keys, as with a KV
    cache) and nothing otherwise; the service itself always passes a 4D mask.
    """
    if mask is not None:
        return to_additive(mask, query.dtype) if mask.dtype == torch.bool else mask
    t, s = query.shape[2], key.shape[2]
    causal = kwargs.get("is_causal")
    if causal if causal is not None else getattr(module, "is_causal", False):
        return to_additive(causal_mask(t, s, device=query.device)[None, None], query.dtype)  # (1, 1, T, S)
    return torch.zeros(1, 1, t, s, dtype=query.dtype, device=query.device)


def steered_sdpa(
    module: torch.nn.Module,
    query: Tensor,  # (B, H, T, D)
    key: Tensor,  # (B, Hkv, S, D)
    value: Tensor,  # (B, Hkv, S, D)
    attention_mask: Tensor | None,  # (B, 1, T, S) bool or additive, or None
    scoped_bias: ScopedBias | None = None,
    attention_probe: AttentionProbe | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    layer = getattr(module, "layer_idx", None)
    if scoped_bias is not None and layer is not None:
        extra = scoped_bias.for_layer(int(layer))  # (B, H, 1, S) or None
        if extra is not None:
            scores = _mask_as_scores(attention_mask, module, query, key, kwargs)
            attention_mask = scores + extra.to(query.dtype)  # (B, H, T, S)
    if attention_probe is not None and layer is not None:
        groups = query.shape[1] // key.shape[1]
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        logits = query @ repeat_kv(key, groups).transpose(-1, -2) * scale  # (B, H, T, S)
        logits = logits + _mask_as_scores(attention_mask, module, query, key, kwargs)
        weights = logits.float().softmax(dim=-1)  # (B, H, T, S)
        attention_probe.layers[int(layer)] = weights[0].mean(dim=0).cpu()  # (T, S)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(STEERED_SDPA, steered_sdpa)
AttentionMaskInterface.register(STEERED_SDPA, sdpa_mask)  # masks are built as for SDPA when not given in 4D


def enable_steering(model: PreTrainedModel) -> bool:
    """Route the model's attention through :func:`steered_sdpa` when it runs SDPA, and check that it works: a
    probe forward must hear from every layer (an architecture whose attention modules lack ``layer_idx`` or
    bypass AttentionInterface would silently ignore a scoped bias). False otherwise: such a model keeps SDPA,
    and emphasis on chosen layers/heads and attention weights are refused for it."""
    if model.config._attn_implementation != "sdpa":
        log.info("attention is %s, not sdpa: emphasis on chosen layers/heads is off", model.config._attn_implementation)
        return False
    model.set_attn_implementation(STEERED_SDPA)
    probe = AttentionProbe()
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([[1, 2, 3]], device=device), attention_probe=probe)
    except Exception:  # a forward that does not pass kwargs through to attention
        log.info("attention kwargs do not reach the layers: emphasis on chosen layers/heads is off", exc_info=True)
        probe.layers.clear()
    if sorted(probe.layers) != list(range(int(model.config.num_hidden_layers))):
        model.set_attn_implementation("sdpa")
        return False
    return True
