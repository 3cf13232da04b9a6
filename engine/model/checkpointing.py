"""Activation checkpointing per decoder layer that keeps the KV cache of the multi-pass forward.

transformers' own gradient checkpointing (`gradient_checkpointing_enable`) drops the cache in train mode: inside
every layer ``cache`` becomes None, so a later pass stops seeing the earlier ones and the latent forward silently
computes something else. A checkpointed layer must also not write its K/V into the cache twice (its forward is
replayed in backward), nor see, when replayed, the K/V that later passes appended.

`checkpointed_layers(language_model)` swaps, for the duration of a `with`, each decoder layer's forward for one
that runs the layer under `torch.utils.checkpoint` (non-reentrant) against a frozen view of its cache: the view
holds the layer's cached K/V as they were when the layer ran and returns them with the new K/V (what the cache's
update returns) without storing; the new K/V leave the checkpointed region as outputs and are appended to the real
cache outside it. The replay in backward then recomputes exactly what the forward computed, and only the layer
inputs are kept between forward and backward.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.model.compat import CACHE_KEYWORDS, safe_attention
from engine.model.layers import decoder_layers


class _FrozenLayerCache:
    """One layer's cache as of one call: `update` returns the past K/V with the new ones appended, storing nothing."""

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None):
        self.keys, self.values = keys, values
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.new = (key_states, value_states)
        if self.keys is None:
            return key_states, value_states
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def _cached_kv(cache, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or not getattr(layers[layer_idx], "is_initialized", True):
        return None, None
    layer = layers[layer_idx]
    if layer.keys is None or layer.keys.numel() == 0:
        return None, None
    return layer.keys, layer.values


def _checkpointed_forward(layer: nn.Module, forward):
    layer_idx = layer.self_attn.layer_idx

    @functools.wraps(forward)
    def run(hidden_states, *args, **kwargs):
        name = next((n for n in CACHE_KEYWORDS if kwargs.get(n) is not None), None)
        if not torch.is_grad_enabled() or name is None:
            return forward(hidden_states, *args, **kwargs)
        cache = kwargs[name]
        past_keys, past_values = _cached_kv(cache, layer_idx)
        key_count = hidden_states.shape[1] + (0 if past_keys is None else past_keys.shape[-2])

        def body(x):
            frozen = _FrozenLayerCache(past_keys, past_values)  # a new view per run: the replay sees the same past
            with safe_attention(key_count, x.device):  # the recomputation in backward chooses its attention kernel again
                out = forward(x, *args, **{**kwargs, name: frozen})
            return out, *frozen.new

        out, keys, values = checkpoint(body, hidden_states, use_reentrant=False)
        cache.update(keys, values, layer_idx)
        return out

    return run


@contextlib.contextmanager
def checkpointed_layers(language_model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every decoder layer's forward is checkpointed (see the module docstring)."""
    if not enabled:
        yield
        return
    layers = decoder_layers(language_model)
    for layer in layers:
        layer.forward = _checkpointed_forward(layer, type(layer).forward.__get__(layer))
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
