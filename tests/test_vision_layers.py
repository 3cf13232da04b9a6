"""engine/model/vision_layers.py: the vision encoder with its norms and layer-scaled residual adds through
`layer_norm_grad` gives the module forwards' image features and gradients (every vision-tower parameter, the
pixels), switches on and off in place, survives deepcopy, and names what it cannot run. Tiny model, fp32,
interpreted kernels."""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch

from engine import load_model
from engine.model.compiled import vision_layers
from engine.model.vision_layers import fused_vision_layers_unsupported, set_fused_vision_layers, vision_encoder_forward

SMALL_TEXT = {"text_hidden_size": 32, "text_layers": 1, "text_intermediate_size": 64, "vision_layers": 3}
NORM_AND_SCALE = ("lambda_1", "lambda_2", "layernorm_before.weight", "layernorm_before.bias",
                  "layernorm_after.weight", "layernorm_after.bias")  # fmt: skip


def tiny_vision_model():
    """A tiny model (2 vision layers) whose layer scales and norm affines are random, not the initial constants
    (lambda 0.1, weight 1, bias 0): a swapped or missing gradient term shows."""
    model, _, _ = load_model("tiny", seed=0, model_overrides=SMALL_TEXT)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in vision_layers(model):
            for name in NORM_AND_SCALE:
                p = layer.get_parameter(name)
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (0.0 if name.endswith("bias") else 1.0))
    return model.train()


@pytest.fixture(scope="module")
def model():
    return tiny_vision_model()


def pixels(model, tiles=2, seed=0):
    size = model.base.config.vision_config.image_size[0]
    return torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(seed))


def features_and_grads(model, pixel_values):
    """Image features and the gradients (vision tower's parameters, pixels) of a random-weighted sum of them."""
    model.zero_grad(set_to_none=True)
    pv = pixel_values.clone().requires_grad_(True)
    features = model.encode_images(pv)
    weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(3))
    (features * weights).sum().backward()
    tower = model.base.model.vision_tower
    grads = {n: p.grad.detach().clone() for n, p in tower.named_parameters() if p.grad is not None}
    return features.detach(), grads, pv.grad


def assert_same(got, want):
    (f_got, g_got, px_got), (f_want, g_want, px_want) = got, want
    torch.testing.assert_close(f_got, f_want, atol=1e-5, rtol=1e-5)
    assert g_got.keys() == g_want.keys()
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(px_got, px_want, rtol=1e-4, atol=1e-6)


def encoder(model):
    return model.base.model.vision_tower.encoder


def test_fused_vision_layers_equal_the_module_forwards(model):
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    layers = vision_layers(model)
    want = features_and_grads(model, pixels(model))
    for i in range(len(layers)):  # every norm's and layer scale's gradient is compared
        assert {f"encoder.layer.{i}.{n}" for n in NORM_AND_SCALE} <= want[1].keys()
    assert set_fused_vision_layers(model, True) == len(layers) == 3
    try:
        assert isinstance(encoder(model).__dict__.get("forward"), functools.partial)
        assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
        assert_same(features_and_grads(model, pixels(model)), want)
    finally:
        assert set_fused_vision_layers(model, False) == 3
    assert "forward" not in encoder(model).__dict__
    assert encoder(model).forward.__func__ is type(encoder(model)).forward  # the class forward again
    assert list(model.state_dict()) == keys


def test_fused_encoder_runs_one_norm_kernel_per_residual_add(model, monkeypatch):
    """Two `layer_norm_grad` calls per layer, every one but the first with the residual and the layer scale (the
    previous layer's MLP output joins the stream inside the next layer's first norm)."""
    import kernels.layer_grads as layer_grads

    calls, original = [], layer_grads.layer_norm_grad
    monkeypatch.setattr(layer_grads, "layer_norm_grad",
                        lambda *a, **k: calls.append(sorted(k)) or original(*a, **k))  # fmt: skip
    set_fused_vision_layers(model, True)
    try:
        model.encode_images(pixels(model, tiles=1))
    finally:
        set_fused_vision_layers(model, False)
    assert calls == [[]] + [["residual", "scale"]] * (2 * len(vision_layers(model)) - 1)


def test_fused_vision_layers_survive_deepcopy(model):
    set_fused_vision_layers(model, True)
    try:
        clone = copy.deepcopy(model)
    finally:
        set_fused_vision_layers(model, False)
    assert encoder(clone).forward.args == (encoder(clone),)  # bound to the copy's encoder, not the original's
    want = features_and_grads(model, pixels(model, tiles=1))
    assert_same(features_and_grads(clone, pixels(model, tiles=1)), want)


def test_dropout_runs_as_in_the_module():
    """The output dropout draws what the module's draws (same seed, same order)."""
    model = tiny_vision_model()
    for layer in vision_layers(model):
        layer.dropout.p = 0.25
    torch.manual_seed(0)
    want = features_and_grads(model, pixels(model, tiles=1))
    set_fused_vision_layers(model, True)
    torch.manual_seed(0)
    assert_same(features_and_grads(model, pixels(model, tiles=1)), want)


def test_autocast_runs_the_class_forward(model):
    x = torch.randn(2, 5, vision_layers(model)[0].lambda_1.shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = vision_encoder_forward(encoder(model), x), encoder(model)(x)
    assert got.last_hidden_state.dtype == want.last_hidden_state.dtype
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=0, rtol=0)


def test_unsupported_layers_give_the_reason():
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
    from transformers.models.internvl.modeling_internvl import InternVLVisionModel, InternVLVisionRMSNorm

    model = tiny_vision_model()
    assert fused_vision_layers_unsupported(model) is None

    rms = InternVLVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               image_size=224, patch_size=28, norm_type="rms_norm")  # fmt: skip
    rms_model = SimpleNamespace(base=SimpleNamespace(model=SimpleNamespace(vision_tower=InternVLVisionModel(rms))))
    reason = fused_vision_layers_unsupported(rms_model)
    assert "not nn.LayerNorm" in reason and "'rms_norm'" in reason
    with pytest.raises(ValueError, match="fused vision layers unsupported: vision layer 0: layernorm_before"):
        set_fused_vision_layers(rms_model, True)
    assert set_fused_vision_layers(rms_model, False) == 1  # switching off always works

    replaced = copy.deepcopy(model)
    vision_layers(replaced)[1].layernorm_after = InternVLVisionRMSNorm(32)
    assert fused_vision_layers_unsupported(replaced).startswith("vision layer 1: layernorm_after is InternVLVisionRMSNorm")

    mixed = copy.deepcopy(model)
    vision_layers(mixed)[0].lambda_2.data = vision_layers(mixed)[0].lambda_2.data.double()
    assert "several dtypes" in fused_vision_layers_unsupported(mixed)

    hooked = copy.deepcopy(model)  # an instance forward set by someone else (e.g. a dispatch hook) is kept
    foreign = functools.partial(type(encoder(hooked)).forward, encoder(hooked))
    encoder(hooked).forward = foreign
    assert "the encoder's forward is already replaced on the instance" in fused_vision_layers_unsupported(hooked)
    set_fused_vision_layers(hooked, False)
    assert encoder(hooked).__dict__["forward"] is foreign
    vision_layers(hooked)[2].forward = foreign  # a layer's own replacement would be bypassed
    del encoder(hooked).__dict__["forward"]
    assert fused_vision_layers_unsupported(hooked).startswith("vision layer 2: its forward is replaced on the instance")

    checkpointed = copy.deepcopy(model)
    checkpointed.base.model.vision_tower.activation_checkpointing_enable({"use_reentrant": False})
    assert "checkpointed" in fused_vision_layers_unsupported(checkpointed)

    earlier = copy.deepcopy(model)
    earlier.base.config.vision_feature_layer = -2
    assert fused_vision_layers_unsupported(earlier) == (
        "the image features come from vision layer -2, the fused encoder returns the last only")

    compiled = copy.deepcopy(model)
    vision_layers(compiled)[0].compile()  # lazy: nothing compiles until a call
    assert "compiled" in fused_vision_layers_unsupported(compiled)

    assert "no vision encoder layers" in fused_vision_layers_unsupported(
        SimpleNamespace(base=SimpleNamespace(model=SimpleNamespace(vision_tower=torch.nn.Linear(2, 2)))))


def test_training_forwards_take_the_fused_layers_with_the_fused_layer_ops(model, monkeypatch):
    """`set_layer_ops("fused")`: a forward with gradients encodes through the fused layers (the module forwards'
    features and gradients), one without gradients through the modules; the class forward is back after each."""
    import engine.model.vision_layers as vision
    from engine.model import fast_paths

    want = features_and_grads(model, pixels(model))
    calls, fused_forward = [], vision.vision_encoder_forward
    monkeypatch.setattr(vision, "vision_encoder_forward", lambda enc, x: calls.append(1) or fused_forward(enc, x))
    model.set_layer_ops("fused")
    try:
        assert fast_paths.vision_layers(model, torch.device("cpu"), torch.float32).choice == "fused"
        assert_same(features_and_grads(model, pixels(model)), want)
        assert len(calls) == 1
        assert "forward" not in encoder(model).__dict__
        with torch.no_grad():
            model.encode_images(pixels(model))
        assert len(calls) == 1
    finally:
        model.set_layer_ops("auto")
    assert fast_paths.vision_layers(model, torch.device("cpu"), torch.float32).reason == "the layer ops are the modules"
