"""A multi-position pass of the language model through the layer stack, over transformers' KV cache.

Why. In a training step the passes that are not one-position latent passes (the prefix before the first latent,
or the whole sequence at stage 0: ~300 positions × 64 rows at the InternVL3-1B geometry) are transformers calls:
each layer's RMSNorms, rotary embedding, SwiGLU product and residual adds run as separate kernels (autograd's
casts, products and sums besides), forward and backward. `stack_pass` computes the same pass with `run_layers`
and an ops table (`engine.model.fused_ops.GradFusedOps`: one Triton kernel each, forward and backward), appending
the pass's K/V to the same `DynamicCache`, so that the latent block and later passes read it as before.

What it computes is what the transformers call with ``use_cache=True`` computes: the rotary table from the
position ids, attention through SDPA with transformers' mask (causal and the padding mask; ``is_causal`` when
there is neither padding nor a cached prefix, repeated K/V heads under a mask, ``enable_gqa`` without), and the
last hidden states after the final norm. Tests compare it with the transformers passes (values, every gradient
and the cache) and guard its causality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.layers import LayerGeometry, LayerOps, layer_geometry, masked_sdpa, rotary_cos_sin, run_layers


class _CachePassAttention:
    """`engine.model.layers.Attention` over a transformers cache: rotary through the ops table, the chunk's K/V
    appended to ``cache`` (its keys then cover the cached prefix and the chunk), SDPA with ``allowed`` (B, 1, n,
    keys) or, when it is None, causal (n > 1) or over every key (n = 1)."""

    def __init__(self, ops: LayerOps, geometry: LayerGeometry, cache, allowed: torch.Tensor | None):
        self.ops, self.geometry, self.cache, self.allowed = ops, geometry, cache, allowed

    def __call__(self, index, q, k, v, cos, sin):
        g = self.geometry
        n = q.shape[1]
        q, k = self.ops.rotary(q, k, cos, sin)  # (B, n, heads, D)
        keys, values = self.cache.update(k.transpose(1, 2), v.transpose(1, 2), index)
        q = q.transpose(1, 2)
        if self.allowed is None:
            # transformers' choice without a mask: GQA inside SDPA, and its causal flag only for several queries
            gqa = {"enable_gqa": True} if g.groups > 1 else {}
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=n > 1, scale=g.scale, **gqa)
        else:
            o = masked_sdpa(q, keys, values, self.allowed, g)
        return o.transpose(1, 2)


def pass_mask(attention_mask: torch.Tensor, queries: int, all_real: bool | None = None) -> torch.Tensor | None:
    """The attention mask of a pass whose ``queries`` positions end the (B, keys) ``attention_mask``: (B, 1, n,
    keys) bools, causal and over real keys only, or None where transformers passes none either (no padding, and no
    cached prefix or a single query). ``all_real``: whether every key is real, when the caller knows it on the host
    (else the mask is read on the host once, as transformers does: a synchronisation)."""
    keys = attention_mask.shape[1]
    past = keys - queries
    if (past == 0 or queries == 1) and (bool(attention_mask.bool().all()) if all_real is None else all_real):
        return None
    query_positions = torch.arange(past, keys, device=attention_mask.device)
    causal = torch.arange(keys, device=attention_mask.device)[None, :] <= query_positions[:, None]  # (n, keys)
    return (causal[None] & attention_mask.bool()[:, None, :])[:, None]


def stack_pass(
    language_model: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache,
    ops: LayerOps,
    all_real: bool | None = None,
) -> torch.Tensor:
    """The pass over ``inputs_embeds`` (B, n, H) after the positions already in ``cache`` (a transformers
    `DynamicCache`, to which each layer's K/V are appended): ``attention_mask`` (B, cached + n), ``position_ids``
    (B, n); ``all_real``: whether the mask is all ones, when known on the host (`pass_mask`). Returns the last
    hidden states (B, n, H) after the final norm, as transformers' ``last_hidden_state``."""
    geometry = layer_geometry(language_model)
    cos, sin = rotary_cos_sin(language_model, inputs_embeds, position_ids)  # (B, n, head_dim)
    attention = _CachePassAttention(ops, geometry, cache, pass_mask(attention_mask, inputs_embeds.shape[1], all_real))
    return run_layers(language_model, inputs_embeds, cos, sin, attention, ops, geometry)
