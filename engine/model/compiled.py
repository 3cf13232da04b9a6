"""Regional `torch.compile` of the vision tower's encoder layers (`compile_vision_layers` in the training config).

At the InternVL3-1B geometry a training step encodes 64 tiles of 1,025 patches through 24 InternViT layers, and
around their matmuls each layer runs LayerNorm, the layer-scale products, two residual adds and GELU as separate
kernels, forward and backward: most of the step's ~180 ms of unfused elementwise work (benchmarks/RESULTS.md,
"where forward and backward go"). Compiling each layer lets Inductor fuse that work around the matmuls. Each layer
is compiled in place (`nn.Module.compile`), so parameter names, state dicts and checkpoints are unchanged, and the
layers share one compiled graph (same code, same shapes). The eager layer stays the reference
(tests/test_compiled.py compares outputs and gradients).

Not under ZeRO-3: its parameter hooks fetch and release each module's weights around its call, which a compiled
region must not trace through.
"""

from __future__ import annotations

from torch import nn


def vision_layers(model) -> list[nn.Module]:
    """The vision tower's encoder layers of a `MultimodalCoconut` (InternViT), in order."""
    tower = model.base.model.vision_tower
    layers = getattr(getattr(tower, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"{type(tower).__name__} has no encoder.layer list to compile")
    return list(layers)


def compile_vision_layers(model, **compile_options) -> int:
    """Compile every vision encoder layer of `model` in place; returns how many. `compile_options` go to
    `torch.compile` (default: Inductor, dynamic shapes decided by torch: a second tile count compiles one dynamic
    graph instead of one per count)."""
    layers = vision_layers(model)
    for layer in layers:
        layer.compile(**compile_options)
    return len(layers)
