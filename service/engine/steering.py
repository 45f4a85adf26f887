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

from service.masks.attention import ScopedBias, to_additive

log = logging.getLogger("maskserve.steering")

STEERED_SDPA = "maskserve_sdpa"


@dataclass
class AttentionProbe:
    """Collects, per layer, the attention weights of batch row 0 averaged over heads: ``layers[l]`` (T, S)."""

    layers: dict[int, Tensor] = field(default_factory=dict)


def _additive(mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor:
    """The mask as additive scores (0 = attend), an all-zero one when there is none.  # (B, 1|H, T, S)"""
    if mask is None:
        return torch.zeros(1, 1, query.shape[2], key.shape[2], dtype=query.dtype, device=query.device)
    return to_additive(mask, query.dtype) if mask.dtype == torch.bool else mask


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
            attention_mask = _additive(attention_mask, query, key) + extra.to(query.dtype)  # (B, H, T, S)
    if attention_probe is not None and layer is not None:
        groups = query.shape[1] // key.shape[1]
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        scores = query @ repeat_kv(key, groups).transpose(-1, -2) * scale  # (B, H, T, S)
        if attention_mask is not None or getattr(module, "is_causal", False):
            scores = scores + _causal_or(attention_mask, module, query, key)
        weights = scores.float().softmax(dim=-1)  # (B, H, T, S)
        attention_probe.layers[int(layer)] = weights[0].mean(dim=0).cpu()  # (T, S)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _causal_or(mask: Tensor | None, module: torch.nn.Module, query: Tensor, key: Tensor) -> Tensor:
    """The additive mask SDPA will apply: the given one, or (none given, causal module) the causal one."""
    if mask is not None:
        return _additive(mask, query, key)
    t, s = query.shape[2], key.shape[2]
    causal = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(diagonal=s - t)  # (T, S)
    return to_additive(causal[None, None], query.dtype)  # (1, 1, T, S)


AttentionInterface.register(STEERED_SDPA, steered_sdpa)
AttentionMaskInterface.register(STEERED_SDPA, sdpa_mask)  # masks are built as for SDPA when not given in 4D


def enable_steering(model: PreTrainedModel) -> bool:
    """Route the model's attention through :func:`steered_sdpa` when it runs SDPA; False otherwise (such a
    model keeps its own attention, and emphasis on chosen layers/heads is refused for it)."""
    if model.config._attn_implementation not in ("sdpa", STEERED_SDPA):
        log.info("attention is %s, not sdpa: emphasis on chosen layers/heads is off", model.config._attn_implementation)
        return False
    model.set_attn_implementation(STEERED_SDPA)
    return model.config._attn_implementation == STEERED_SDPA
