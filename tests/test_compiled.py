"""engine/model/compiled.py: the vision encoder layers compiled in place (`compile_vision_layers`) give the eager
layers' loss and gradients, keep every parameter name, and are refused under ZeRO-3. CPU, fp32 (Inductor's C++
backend; the first call compiles, ~20 s)."""

from __future__ import annotations

import pytest
import torch

from engine import load_model
from engine.model.compiled import compile_vision_layers, vision_layers
from engine.training.config import ConfigError, config_from_dict
from tests.test_optim import batch_for


def loss_and_grads(model, tok):
    ids, mask, labels, pv = batch_for(model, tok)
    model.zero_grad(set_to_none=True)
    loss = model(ids, mask, pv, labels=labels, return_logits=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_vision_layers_equal_the_eager_ones():
    overrides = {"text_hidden_size": 32, "text_layers": 1, "text_intermediate_size": 64}
    eager, tok, _ = load_model("tiny", seed=0, model_overrides=overrides)
    compiled, _, _ = load_model("tiny", seed=0, model_overrides=overrides)
    for m in (eager, compiled):
        m.set_latent_passes("transformers")
    names = [n for n, _ in compiled.named_parameters()]
    assert compile_vision_layers(compiled) == len(vision_layers(compiled)) >= 1
    assert [n for n, _ in compiled.named_parameters()] == names  # in place: checkpoints load as before
    assert all(layer._compiled_call_impl is not None for layer in vision_layers(compiled))
    want_loss, want = loss_and_grads(eager, tok)
    got_loss, got = loss_and_grads(compiled, tok)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    vision = [n for n in want if ".vision_tower." in n]
    assert vision, "the vision tower must be trained for the comparison to mean anything"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_compiled_vision_layers_need_zero_stage_2_or_less():
    with pytest.raises(ConfigError, match="compile_vision_layers needs zero_stage <= 2"):
        config_from_dict({"model_id": "tiny", "zero_stage": 3, "compile_vision_layers": True})
    assert config_from_dict({"model_id": "tiny", "zero_stage": 2, "compile_vision_layers": True}).compile_vision_layers


def test_the_trainer_compiles_them_when_asked():
    from engine.training.model_setup import load_training_model

    for flag in (False, True):
        cfg = config_from_dict({"model_id": "tiny", "device": "cpu", "compile_vision_layers": flag,
                                "model_overrides": {"text_hidden_size": 32, "text_layers": 1,
                                                    "text_intermediate_size": 64}})
        model, _, _ = load_training_model(cfg, torch.device("cpu"))
        assert [layer._compiled_call_impl is not None for layer in vision_layers(model)] == [flag] * len(
            vision_layers(model))
