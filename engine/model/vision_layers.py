"""The vision tower's encoder layers with their LayerNorms and layer-scaled residual adds as Triton kernels
(`kernels.layer_grads.layer_norm_grad`), forward and backward.

Why. At the InternVL3-1B geometry a training step encodes 64 tiles × 1,025 positions × 1,024 features through 24
InternViT layers. Around each layer's matmuls, transformers' InternVLVisionLayer runs LayerNorm, the layer-scale
product ``lambda_1 * attention``, the residual add, the second LayerNorm, ``lambda_2 * mlp`` and the second
residual add as separate kernels, each reading and writing the whole (64 × 1,025 × 1,024) activation; their
backward adds as many again, plus the sums over rows that give ``lambda_1``, ``lambda_2`` and the norms' weight
and bias their gradients. Here the first norm is one kernel forward and one backward, and ``lambda_1 * attention
+ hidden_states`` with the second norm is one kernel forward (returning the norm and the sum) and one backward
(the gradients of the attention output, the residual stream, ``lambda_1`` and the norm's weight and bias). On an
H200 (torch 2.11, triton 3.6, bf16, 64 tiles; profiler device time, a lead, not a promise) one layer's forward and
backward went from 13.37 to 12.55 ms and from 84 to 77 kernels: ~20 ms per training step over the 24 layers. The
GELU, ``lambda_2 * y + s`` and their backward remain PyTorch's.

What it computes: exactly InternVLVisionLayer.forward, with the same rounding in the input dtype (the layer-scale
product, then the add, each rounded; the norms' statistics in fp32), so fp32 matches to fp32 rounding and bf16
to bf16 rounding::

    h = LayerNorm_before(x)
    a = attention(h)
    h2, s = LayerNorm_after(s), s = x + lambda_1 * a      (one kernel)
    out = lambda_2 * dropout(mlp(h2)) + s                 (two PyTorch ops, the module's rounding)

`set_fused_vision_layers(model, True)` gives each layer this forward as an instance attribute (module names,
parameters and state dicts unchanged; `copy.deepcopy` rebinds it to the copy); False restores the class forward.
transformers' activation checkpointing of the layer (``activation_checkpointing_enable``) still applies. Not under
ZeRO-3 (the norms' weights are read without calling the norm modules, whose hooks would gather them), not together
with `engine.model.compiled.compile_vision_layers`, and not under autocast (a call there, or with an input whose
dtype differs from the layer's parameters, runs the class forward).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from engine.model.compiled import vision_layers

__all__ = ["fused_vision_layers", "fused_vision_layers_unsupported", "set_fused_vision_layers", "vision_layer_forward"]


def _fused_forward(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from kernels.layer_grads import layer_norm_grad  # here: importing the engine defines no kernel

    before, after = layer.layernorm_before, layer.layernorm_after
    h = layer_norm_grad(hidden_states, before.weight, before.bias, before.eps)
    attention_output = layer.attention(h)[0]
    h2, summed = layer_norm_grad(
        attention_output, after.weight, after.bias, after.eps, residual=hidden_states, scale=layer.lambda_1
    )
    y = layer.dropout(layer.mlp(h2))
    # two roundings as the module's ``lambda_2 * y`` then ``+ s`` (addcmul would round once)
    return layer.lambda_2 * y + summed


def vision_layer_forward(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """InternVLVisionLayer.forward of ``layer`` with both norms (and the first residual add) through
    `layer_norm_grad`. Under autocast, or with an input whose dtype differs from the norms', the class forward."""
    if hidden_states.dtype != layer.layernorm_before.weight.dtype or torch.is_autocast_enabled(
        hidden_states.device.type
    ):
        return type(layer).forward(layer, hidden_states)
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        # what transformers' GradientCheckpointingLayer does around the class forward
        return layer._gradient_checkpointing_func(functools.partial(_fused_forward, layer), hidden_states)
    return _fused_forward(layer, hidden_states)


def _layer_unsupported(layer: nn.Module, norm_type) -> str | None:
    if any(hasattr(p, "ds_id") for p in layer.parameters()):  # first: reading a norm's weight could gather it
        return "its parameters are partitioned by ZeRO-3 (the norms' weights are read outside their modules)"
    forward = layer.__dict__.get("forward")
    if forward is not None and not _is_fused_forward(forward, layer):
        return f"its forward is already replaced on the instance ({forward!r})"
    for name in ("layernorm_before", "layernorm_after"):
        norm = getattr(layer, name, None)
        if not isinstance(norm, nn.LayerNorm):
            return f"{name} is {type(norm).__name__}, not nn.LayerNorm (vision norm_type {norm_type!r})"
        if len(norm.normalized_shape) != 1 or norm.weight is None:
            return f"{name} must normalize the last dimension with a weight, got {norm}"
    for name in ("lambda_1", "lambda_2"):
        if not isinstance(getattr(layer, name, None), nn.Parameter):
            return f"{name} is not a parameter (layer scale switched off)"
    for name in ("attention", "mlp", "dropout"):
        if not isinstance(getattr(layer, name, None), nn.Module):
            return f"the layer has no {name} module"
    dtypes = {p.dtype for p in layer.parameters()}
    if len(dtypes) > 1:
        return f"its parameters have several dtypes {sorted(map(str, dtypes))}"
    if getattr(layer, "_compiled_call_impl", None) is not None:
        return "it is compiled (compile_vision_layers): use one or the other"
    return None


def fused_vision_layers_unsupported(model) -> str | None:
    """Why the vision encoder layers of ``model`` (a `MultimodalCoconut`) cannot run `vision_layer_forward`, or
    None when they can."""
    try:
        layers = vision_layers(model)
    except (AttributeError, ValueError) as e:
        return f"no vision encoder layers: {e}"
    if not layers:
        return "the vision tower has no encoder layers"
    norm_type = getattr(getattr(model.base.model.vision_tower, "config", None), "norm_type", None)
    for i, layer in enumerate(layers):
        reason = _layer_unsupported(layer, norm_type)
        if reason is not None:
            return f"vision layer {i}: {reason}"
    return None


def set_fused_vision_layers(model, enabled: bool) -> int:
    """Give every vision encoder layer of ``model`` `vision_layer_forward` (``enabled``) or its class forward back;
    returns how many layers. Raises ValueError with the reason when enabling an unsupported model."""
    if enabled:
        reason = fused_vision_layers_unsupported(model)
        if reason is not None:
            raise ValueError(f"fused vision layers unsupported: {reason}")
    layers = vision_layers(model)
    for layer in layers:
        if enabled:
            # a partial, not a bound method: deepcopy rebinds it to the copied layer, and it pickles by name
            layer.forward = functools.partial(vision_layer_forward, layer)
        elif _is_fused_forward(layer.__dict__.get("forward"), layer):  # only ours: another replacement stays
            del layer.__dict__["forward"]
    return len(layers)


def _is_fused_forward(forward, layer: nn.Module) -> bool:
    return isinstance(forward, functools.partial) and forward.func is vision_layer_forward and forward.args == (layer,)


@contextlib.contextmanager
def fused_vision_layers(model, enabled: bool):
    """`set_fused_vision_layers` for the duration of a block (one forward's image encoding: the backward keeps the
    forward it recorded), then the class forward again; a no-op when not ``enabled``."""
    if not enabled:
        yield
        return
    set_fused_vision_layers(model, True)
    try:
        yield
    finally:
        set_fused_vision_layers(model, False)
