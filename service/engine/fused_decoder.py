"""The decode step of Llama-architecture models (SmolLM2) in few operators: the engine's fast path.

A one-token decode step is bound by per-operator work, not by arithmetic: transformers' Llama forward runs
about a hundred operators and a dozen module calls a layer, each costing microseconds of dispatch, for
matrix products that take tens of microseconds (docs/generation.md, "Precision"). :class:`FusedDecoder`
computes the same step over the *same weights* with about a third of the operators:

- q, k and v are one projection, gate and up another: their weight rows are stacked once, at load, into one
  matrix (the per-layer modules keep working on views of it, so no weight is held twice). The stacked int8
  rows are the very rows of the parts, so each output column is computed from the same numbers;
- the rotary embedding of q and k runs as one product on both (``rotate_half`` as a flip of the two halves,
  its sign folded into the sine), with cos/sin computed once a step, as transformers computes them;
- grouped-query attention runs without repeating keys: the query heads of one key head ride in SDPA's
  query-length dimension (transformers' ``pack_gqa`` for one-token queries);
- the KV cache is the engine's :class:`service.engine.kv_cache.BatchKVCache`, written in place.

Only the decode step runs here. Prefill, fill-mask and inspection forwards keep transformers' forward (many
rows a forward: dispatch is amortised there), and the KV cache they fill is the one this continues. Masks are
the engine's, unchanged: the 4D decode mask and a scoped emphasis bias, added per layer exactly as
service/engine/steering.py adds it. tests/integration/test_fused_decoder.py holds it to transformers' step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from service.engine.kv_cache import BatchKVCache
from service.engine.precision import Int8Linear
from service.masks.attention import to_additive
from service.masks.batch import ScopedBias

log = logging.getLogger("maskserve.fused_decoder")

# Static rotary tables only (dynamic RoPE variants recompute inv_freq per forward).
STATIC_ROPE_TYPES = {"default", "linear", "llama3"}


def stack_rows(parts: Sequence[nn.Module]) -> nn.Module:
    """One linear layer computing ``parts`` side by side (outputs concatenated), the parts re-pointed at views of
    its weights so nothing is held twice. Each part's output columns come from the same weights as before.

    Parts are all :class:`Int8Linear` (same ``dense_from_rows``) or all ``nn.Linear``; raises TypeError otherwise.
    """
    if all(isinstance(p, Int8Linear) for p in parts):
        return Int8Linear.stacked(parts)  # type: ignore[arg-type]
    if not all(type(p) is nn.Linear for p in parts):
        raise TypeError(f"cannot stack {[type(p).__name__ for p in parts]}")
    linears: list[nn.Linear] = list(parts)  # type: ignore[arg-type]
    weight = torch.cat([p.weight.detach() for p in linears])  # (sum O, K)
    has_bias = [p.bias is not None for p in linears]
    if any(has_bias) and not all(has_bias):
        raise TypeError("cannot stack linear layers with and without bias")
    stacked = nn.Linear(weight.shape[1], weight.shape[0], bias=all(has_bias), dtype=weight.dtype)
    stacked.weight = nn.Parameter(weight, requires_grad=False)
    if stacked.bias is not None:
        stacked.bias = nn.Parameter(torch.cat([p.bias.detach() for p in linears]), requires_grad=False)
    start = 0
    for p in linears:
        end = start + p.out_features
        p.weight = nn.Parameter(stacked.weight[start:end], requires_grad=False)  # a view: (O, K)
        if stacked.bias is not None:
            p.bias = nn.Parameter(stacked.bias[start:end], requires_grad=False)
        start = end
    return stacked


@dataclass
class FusedLayer:
    input_norm: Tensor  # (E,)
    qkv: nn.Module  # E -> (H + 2 Hkv) D
    o: nn.Module  # H D -> E
    post_norm: Tensor  # (E,)
    gate_up: nn.Module  # E -> 2 I
    down: nn.Module  # I -> E


class FusedDecoder:
    """One-token decode steps for a Llama-architecture causal LM, over that model's own weights."""

    def __init__(self, model: Any) -> None:
        config = model.config
        base = model.model
        self.heads, self.kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        self.embed: nn.Embedding = base.embed_tokens
        self.final_norm: Tensor = base.norm.weight
        self.head: nn.Module = model.lm_head
        rotary = base.rotary_emb
        self.inv_freq: Tensor = rotary.inv_freq  # (D/2,) float32
        self.rope_attention_scaling = float(rotary.attention_scaling)
        self.layers = [
            FusedLayer(
                input_norm=layer.input_layernorm.weight,
                qkv=stack_rows([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                o=layer.self_attn.o_proj,
                post_norm=layer.post_attention_layernorm.weight,
                gate_up=stack_rows([layer.mlp.gate_proj, layer.mlp.up_proj]),
                down=layer.mlp.down_proj,
            )
            for layer in base.layers
        ]
        # rotate_half(x) = cat(-x2, x1) = flip of the halves times (-1, +1): the sign is folded into the sine.
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)])  # (D,)
        self.rotate_sign = sign.to(device=self.final_norm.device, dtype=self.final_norm.dtype)

    @staticmethod
    def supports(model: Any) -> str | None:
        """Why ``model`` cannot take this path (None: it can). Checked once, at load."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "llama" or type(model).__name__ != "LlamaForCausalLM":
            return f"architecture {getattr(config, 'model_type', type(model).__name__)} is not llama"
        if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
            return "not a plain silu Llama MLP"
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") not in STATIC_ROPE_TYPES:
            return f"rope type {rope.get('rope_type')} recomputes its frequencies"
        kinds = {
            type(m) for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear | Int8Linear)
        }
        if not kinds <= {nn.Linear, Int8Linear} or len(kinds) != 1:
            return f"projections are {sorted(k.__name__ for k in kinds)}, not one plain kind"
        return None

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        """transformers' LlamaRMSNorm: in float32, then the weight in the model's dtype.  (..., E) -> (..., E)"""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and signed sin for ``positions`` (B,), as transformers' LlamaRotaryEmbedding.  -> (B, 1, D) each"""
        freqs = positions[:, None].float() * self.inv_freq  # (B, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, D)
        cos = (emb.cos() * self.rope_attention_scaling).to(dtype)[:, None]  # (B, 1, D)
        sin = (emb.sin() * self.rope_attention_scaling).to(dtype)[:, None]  # (B, 1, D)
        return cos, sin * self.rotate_sign

    @torch.inference_mode()
    def step(
        self, tokens: Tensor, mask: Tensor, positions: Tensor, cache: BatchKVCache, scoped: ScopedBias | None = None
    ) -> Tensor:
        """Logits of the next token.  tokens (B,), mask (B, 1, 1, S) bool or additive, positions (B,) -> (B, V)

        ``cache`` holds S - 1 columns and gains this step's keys and values; ``mask`` covers all S.
        """
        b, h, hkv, d = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        groups = h // hkv
        x = self.embed(tokens[:, None])  # (B, 1, E): Int8Linear picks its kernel by a decode step's shape
        cos, sin = self._rotary(positions, x.dtype)  # (B, 1, D)
        base_scores = None
        if scoped is not None:  # as steered_sdpa: the layer's bias on top of the mask as additive scores
            base_scores = to_additive(mask, x.dtype) if mask.dtype == torch.bool else mask  # (B, 1, 1, S)
        for index, (layer, kv) in enumerate(zip(self.layers, cache.batch_layers, strict=True)):
            qkv = layer.qkv(self._norm(x, layer.input_norm))[:, 0]  # (B, (H + 2 Hkv) D)
            qk = qkv[:, : (h + hkv) * d].view(b, h + hkv, d)  # (B, H + Hkv, D)
            halves = qk.view(b, h + hkv, 2, d // 2).flip(2).view(b, h + hkv, d)  # rotate_half up to sign
            qk = qk * cos + halves * sin  # (B, H + Hkv, D)
            query = qk[:, :h].reshape(b, hkv, groups, d)  # (B, Hkv, G, D): a key head's queries as rows
            key = qk[:, h:, None]  # (B, Hkv, 1, D)
            value = qkv[:, (h + hkv) * d :].view(b, hkv, 1, d)  # (B, Hkv, 1, D)
            keys, values = kv.update(key, value)  # (B, Hkv, S, D) each
            layer_mask = mask
            extra = scoped.for_layer(index) if scoped is not None else None  # (B, H, 1, S)
            if extra is not None and base_scores is not None:
                layer_mask = (base_scores + extra.to(x.dtype)).view(b, hkv, groups, -1)  # (B, Hkv, G, S)
            attn = torch.nn.functional.scaled_dot_product_attention(
                query, keys, values, attn_mask=layer_mask, scale=self.scale
            )  # (B, Hkv, G, D)
            x = x + layer.o(attn.reshape(b, 1, h * d))  # (B, 1, E)
            gate, up = layer.gate_up(self._norm(x, layer.post_norm)).chunk(2, dim=-1)  # (B, 1, I) each
            x = x + layer.down(torch.nn.functional.silu(gate) * up)  # (B, 1, E)
        return self.head(self._norm(x, self.final_norm))[:, 0].float()  # (B, V)


def fused_decoder(model: Any) -> FusedDecoder | None:
    """The fused decode path for ``model``, or None (with the reason logged) where it does not apply."""
    reason = FusedDecoder.supports(model)
    if reason is not None:
        log.info("decode steps run transformers' forward: %s", reason)
        return None
    return FusedDecoder(model)
