"""The vision tower's encoder with its LayerNorms and layer-scaled residual adds as Triton kernels
(`kernels.layer_grads.layer_norm_grad`), forward and backward.

Why. At the InternVL3-1B geometry a training step encodes 64 tiles × 1,025 positions × 1,024 features through 24
InternViT layers. Around each layer's matmuls, transformers' InternVLVisionLayer runs LayerNorm, the layer-scale
product ``lambda_1 * attention``, the residual add, the second LayerNorm, ``lambda_2 * mlp`` and the second
residual add as separate kernels, each reading and writing the whole (64 × 1,025 × 1,024) activation; their
backward adds as many again, plus the sums over rows that give ``lambda_1``, ``lambda_2`` and the norms' weight
and bias their gradients. Here every layer-scaled residual add is one kernel with the LayerNorm that follows it,
forward and backward (benchmarks/RESULTS.md, "the language model's passes through the layer stack").

What it computes: exactly InternVLVisionEncoder.forward, with the same rounding in the input dtype (the
layer-scale product, then the add, each rounded; the norms' statistics in fp32), so fp32 matches to fp32 rounding
and bf16 to bf16 rounding. Layer i's residual stream ``x`` and its MLP output ``y_{i-1}`` of the layer before::

    h, x = LayerNorm_before(x + lambda_2' * y'), x + lambda_2' * y'   (one kernel; the first layer: LayerNorm(x))
    a = attention(h)
    h2, x = LayerNorm_after(x + lambda_1 * a), x + lambda_1 * a        (one kernel)
    y = dropout(mlp(h2))

and after the last layer ``lambda_2 * y + x`` (two PyTorch ops, the module's rounding).

`set_fused_vision_layers(model, True)` gives the encoder this forward as an instance attribute (module names,
parameters and state dicts unchanged; `copy.deepcopy` rebinds it to the copy); False restores the class forward;
`fused_vision_layers` does it for one forward's image encoding (what `MultimodalCoconut.encode_images` does when
`fast_paths.vision_layers` says so). The layers are not called as modules, so what hooks on them would see is
not there: not when the image features come from an earlier layer's hidden states, not with the layers'
activation checkpointing, not under ZeRO-3 (the norms' weights are read without calling the norm modules, whose
hooks would gather them), not together with `engine.model.compiled.compile_vision_layers`; under autocast, or with
an input whose dtype differs from the layers' parameters, the class forward runs.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from engine.model.compiled import vision_layers

__all__ = ["fused_vision_layers", "fused_vision_layers_unsupported", "set_fused_vision_layers", "vision_encoder_forward"]


def vision_encoder_forward(encoder: nn.Module, hidden_states: torch.Tensor):
    """InternVLVisionEncoder.forward of ``encoder`` with every layer-scaled residual add and the LayerNorm after it
    through `layer_norm_grad` (the module docstring). Under autocast, or with an input whose dtype differs from the
    layers' parameters, the class forward."""
    from transformers.modeling_outputs import BaseModelOutput

    from kernels.layer_grads import layer_norm_grad  # here: importing the engine defines no kernel

    layers = list(encoder.layer)
    if hidden_states.dtype != layers[0].layernorm_before.weight.dtype or torch.is_autocast_enabled(
        hidden_states.device.type
    ):
        return type(encoder).forward(encoder, hidden_states)
    x, pending, pending_scale = hidden_states, None, None  # the last MLP output and its layer scale, not added yet
    for layer in layers:
        before, after = layer.layernorm_before, layer.layernorm_after
        if pending is None:
            h = layer_norm_grad(x, before.weight, before.bias, before.eps)
        else:
            h, x = layer_norm_grad(pending, before.weight, before.bias, before.eps, residual=x, scale=pending_scale)
        attention_output = layer.attention(h)[0]
        h2, x = layer_norm_grad(attention_output, after.weight, after.bias, after.eps, residual=x, scale=layer.lambda_1)
        pending, pending_scale = layer.dropout(layer.mlp(h2)), layer.lambda_2
    if pending is not None:  # two roundings as the module's ``lambda_2 * y`` then ``+ x`` (addcmul would round once)
        x = pending_scale * pending + x
    return BaseModelOutput(last_hidden_state=x)


def _own_parameter(module: nn.Module, name: str):
    """``module``'s parameter `name` or None, without DeepSpeed ZeRO-3's getter, which gathers a partitioned weight
    when read during a forward (iterating the parameters does not)."""
    return dict(module.named_parameters(recurse=False)).get(name)


def _layer_unsupported(layer: nn.Module, norm_type, gathered_with_tower: bool = False) -> str | None:
    # Partitioned per module, the fused encoder would read the norms' weights outside their modules' gathers. With
    # the tower a ZeRO-3 leaf its whole call and its backward run with every weight gathered; the checks below read
    # no weight's values (and no weight through ZeRO-3's getter), so they can run before the call.
    if not gathered_with_tower and any(hasattr(p, "ds_id") for p in layer.parameters()):
        return "its parameters are partitioned by ZeRO-3 per module (the norms' weights are read outside their modules)"
    if "forward" in layer.__dict__:
        return f"its forward is replaced on the instance ({layer.__dict__['forward']!r}): the fused encoder bypasses it"
    if getattr(layer, "gradient_checkpointing", False):
        return "it is checkpointed (the fused encoder does not call the layers as modules)"
    for name in ("layernorm_before", "layernorm_after"):
        norm = getattr(layer, name, None)
        if not isinstance(norm, nn.LayerNorm):
            return f"{name} is {type(norm).__name__}, not nn.LayerNorm (vision norm_type {norm_type!r})"
        if len(norm.normalized_shape) != 1 or _own_parameter(norm, "weight") is None:
            return f"{name} must normalize the last dimension with a weight, got {norm}"
    for name in ("lambda_1", "lambda_2"):
        if not isinstance(_own_parameter(layer, name), nn.Parameter):
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
    """Why the vision encoder of ``model`` (a `MultimodalCoconut`) cannot run `vision_encoder_forward`, or None
    when it can."""
    try:
        layers = vision_layers(model)
    except (AttributeError, ValueError) as e:
        return f"no vision encoder layers: {e}"
    if not layers:
        return "the vision tower has no encoder layers"
    feature_layer = getattr(getattr(model.base, "config", None), "vision_feature_layer", -1)
    if feature_layer != -1:
        return f"the image features come from vision layer {feature_layer}, the fused encoder returns the last only"
    encoder = model.base.model.vision_tower.encoder
    forward = encoder.__dict__.get("forward")
    if forward is not None and not _is_fused_forward(forward, encoder):
        return f"the encoder's forward is already replaced on the instance ({forward!r})"
    norm_type = getattr(getattr(model.base.model.vision_tower, "config", None), "norm_type", None)
    gathered = bool(getattr(model, "vision_tower_in_one_call", False))
    for i, layer in enumerate(layers):
        reason = _layer_unsupported(layer, norm_type, gathered_with_tower=gathered)
        if reason is not None:
            return f"vision layer {i}: {reason}"
    return None


def set_fused_vision_layers(model, enabled: bool) -> int:
    """Give the vision encoder of ``model`` `vision_encoder_forward` (``enabled``) or its class forward back;
    returns how many layers it runs. Raises ValueError with the reason when enabling an unsupported model."""
    if enabled:
        reason = fused_vision_layers_unsupported(model)
        if reason is not None:
            raise ValueError(f"fused vision layers unsupported: {reason}")
    _switch(model.base.model.vision_tower.encoder, enabled)
    return len(vision_layers(model))


def _switch(encoder: nn.Module, enabled: bool) -> None:
    if enabled:
        # a partial, not a bound method: deepcopy rebinds it to the copied encoder, and it pickles by name
        encoder.forward = functools.partial(vision_encoder_forward, encoder)
    elif _is_fused_forward(encoder.__dict__.get("forward"), encoder):  # only ours: another replacement stays
        del encoder.__dict__["forward"]


def _is_fused_forward(forward, encoder: nn.Module) -> bool:
    return isinstance(forward, functools.partial) and forward.func is vision_encoder_forward and forward.args == (encoder,)


@contextlib.contextmanager
def fused_vision_layers(model, enabled: bool):
    """The fused encoder for the duration of a block (one forward's image encoding: the backward keeps the forward
    it recorded), then the class forward again; a no-op when not ``enabled``. The caller has decided that it can
    run (`fast_paths.vision_layers`, which asks `fused_vision_layers_unsupported`): not checked again here."""
    if not enabled:
        yield
        return
    encoder = model.base.model.vision_tower.encoder
    _switch(encoder, True)
    try:
        yield
    finally:
        _switch(encoder, False)
