"""Activation checkpointing per decoder layer with the cached multi-pass forward (`engine/model/checkpointing.py`)."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.data.random_batch import synthetic_batch
from engine.training.config import ConfigError, config_from_dict


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels, return_logits=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


@pytest.mark.parametrize("n_latents", [0, 3])
def test_checkpointed_gradients_equal_the_unchecked_ones(tiny, n_latents):
    model, tok, _ = tiny
    model = copy.deepcopy(model).train()
    model.set_latent_passes("transformers")
    batch = synthetic_batch(model, tok, batch_size=3, n_latents=n_latents, question_len=10, answer_len=6, image_tokens=16)
    loss, grads = _loss_and_grads(model, batch)

    replays = []
    layer_cls = type(model.language_model.layers[0])
    original = layer_cls.forward

    def counted(self, *args, **kwargs):
        replays.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    layer_cls.forward = counted
    try:
        model.set_activation_checkpointing(True)
        checked_loss, checked_grads = _loss_and_grads(model, batch)
    finally:
        layer_cls.forward = original
        model.set_activation_checkpointing(False)
    passes = 1 + n_latents
    layers = model.language_model.config.num_hidden_layers
    assert len(replays) == 2 * passes * layers, "each layer of each pass runs once forward and once in backward"
    assert torch.equal(checked_loss, loss)
    assert checked_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(checked_grads[name], g, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert all("forward" not in vars(layer) for layer in model.language_model.layers), "the swap must be undone"


def test_transformers_checkpointing_would_drop_the_cache(tiny):
    """Why the engine checkpoints by hand: transformers' gradient checkpointing runs the layers without the cache
    in train mode, so with latents the loss changes (the later passes stop seeing the earlier ones)."""
    model, tok, _ = tiny
    model = copy.deepcopy(model).train()
    model.set_latent_passes("transformers")
    batch = synthetic_batch(model, tok, batch_size=2, n_latents=2, question_len=8, answer_len=5, image_tokens=16)
    loss, _ = _loss_and_grads(model, batch)
    model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    broken, _ = _loss_and_grads(model, batch)
    assert not torch.allclose(broken, loss), "transformers' checkpointing kept the cache: the trap is gone"


def test_checkpointing_config_and_latent_block_exclusion(tiny_model):
    assert config_from_dict({"activation_checkpointing": True}).activation_checkpointing
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        config_from_dict({"activation_checkpointing": True, "latent_passes": "static"})
    model = copy.deepcopy(tiny_model)
    model.set_latent_passes("static")
    with pytest.raises(RuntimeError, match="transformers calls"):
        model.set_activation_checkpointing(True)
    model.set_latent_passes("auto")
    model.set_activation_checkpointing(True)
    from engine.model import fast_paths

    decision = fast_paths.latent_passes(model, "auto", torch.device("cuda"))
    assert decision.choice == "transformers" and "checkpointing" in decision.reason
