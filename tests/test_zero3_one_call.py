"""ZeRO-3 with the language model as one leaf module: every pass (and the latent block) inside one call of it,
one parameter gather per forward and one per backward, gradients unchanged (DeepSpeed on CPU, one process)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from engine.data.random_batch import synthetic_batch
from engine.model import fast_paths
from engine.training.distributed import init_distributed

pytestmark = pytest.mark.distributed


def _fetch_counter(monkeypatch, modules):
    """Count ZeRO-3's parameter fetches for `modules` (by identity), forward and backward."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    counts = {(name, kind): 0 for name in modules for kind in ("forward", "backward")}
    ids = {id(m): name for name, m in modules.items()}
    original = PartitionedParameterCoordinator.fetch_sub_module

    def fetch(self, submodule, forward):
        name = ids.get(id(submodule))
        if name is not None:
            counts[(name, "forward" if forward else "backward")] += 1
        return original(self, submodule, forward)

    monkeypatch.setattr(PartitionedParameterCoordinator, "fetch_sub_module", fetch)
    return counts


@pytest.mark.parametrize("latent_passes,layer_ops", [("static", "reference"), ("transformers", "reference"), ("static", "fused")])
def test_one_call_gathers_once_and_keeps_the_gradients(tiny, monkeypatch, latent_passes, layer_ops):
    """With fused layer ops (interpreted) the prefix and final passes run through the layer stack inside the call."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed("cpu")
    import deepspeed

    model, tok, _ = tiny
    reference = copy.deepcopy(model).train()
    zero3 = copy.deepcopy(model).train()
    batch = synthetic_batch(model, tok, batch_size=3, n_latents=4, question_len=9, answer_len=5, image_tokens=16)
    zero3.set_language_model_leaf(True)
    zero3.set_latent_passes(latent_passes)
    zero3.set_layer_ops(layer_ops)
    config = {"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=zero3, optimizer=torch.optim.SGD(zero3.parameters(), lr=0.0), config=config)
    assert zero3.language_model_in_one_call
    stack = fast_paths.stack_passes(zero3, torch.device("cpu"), torch.float32).choice
    assert stack == ("layer_stack" if layer_ops == "fused" else "transformers")
    lm = zero3.language_model
    counts = _fetch_counter(monkeypatch, {"language_model": lm, "layer 0": lm.layers[0], "lm_head": zero3.base.lm_head})
    blocks = []
    if latent_passes == "static":
        from engine.model.latent_block import LatentBlock

        original_call = LatentBlock.__call__
        monkeypatch.setattr(LatentBlock, "__call__", lambda self, *a, **k: blocks.append(1) or original_call(self, *a, **k))
    args = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                labels=batch.labels, return_logits=False)
    loss = engine(**args).loss
    engine.backward(loss)
    reference.set_latent_passes("transformers")
    expected = reference(**args).loss
    expected.backward()

    assert torch.allclose(loss, expected, atol=1e-6), (loss.item(), expected.item())
    assert counts == {("language_model", "forward"): 1, ("language_model", "backward"): 1, ("layer 0", "forward"): 0,
                      ("layer 0", "backward"): 0, ("lm_head", "forward"): 1, ("lm_head", "backward"): 1}, counts
    assert len(blocks) == (1 if latent_passes == "static" else 0), "the latent block must run inside the call"
    from deepspeed.utils import safe_get_full_grad

    worst, checked = 0.0, 0
    for (name, p), (_, q) in zip(zero3.named_parameters(), reference.named_parameters()):
        if q.grad is None:
            continue
        worst = max(worst, (safe_get_full_grad(p).float() - q.grad).abs().max().item())
        checked += 1
    assert checked > 10 and worst < 1e-5, f"max gradient difference {worst:.3g} over {checked} parameters"
