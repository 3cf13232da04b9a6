"""ZeRO-3 with the language model as one leaf module: every pass (and the latent block) inside one call of it,
one parameter gather per forward and one per backward, gradients unchanged (DeepSpeed on CPU, one process)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from engine.data.random_batch import synthetic_batch
from engine.model import fast_paths
from engine.model.vision_layers import vision_layers
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


@pytest.mark.parametrize(
    "latent_passes,layer_ops,vision_leaf,image_tokens,frozen_tower",
    [("static", "reference", True, 16, False), ("transformers", "reference", False, 16, False),
     ("static", "fused", False, 16, False), ("static", "reference", True, 0, False),
     ("static", "fused", True, 16, False), ("static", "reference", True, 16, True)],
)
def test_one_call_gathers_once_and_keeps_the_gradients(tiny, monkeypatch, latent_passes, layer_ops, vision_leaf,
                                                       image_tokens, frozen_tower):
    """With fused layer ops (interpreted) the prefix and final passes run through the layer stack inside the call;
    with the vision tower as a leaf too, it is gathered once forward and once backward, its layers never alone
    (fused, its layers' weights are read inside that gather, never through ZeRO-3's getter). Without images, or
    with a frozen tower (features without gradient), the language model's call has no input that needs a gradient
    of its own. No parameter stays whole between calls (persistence threshold 0), so any stray read would gather."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed("cpu")
    import deepspeed

    model, tok, _ = tiny
    reference = copy.deepcopy(model).train()
    zero3 = copy.deepcopy(model).train()
    batch = synthetic_batch(model, tok, batch_size=3, n_latents=4, question_len=9, answer_len=5,
                            image_tokens=image_tokens)
    zero3.set_language_model_leaf(True)
    zero3.set_vision_tower_leaf(vision_leaf)
    zero3.set_latent_passes(latent_passes)
    zero3.set_layer_ops(layer_ops)
    for m in (zero3, reference) if frozen_tower else ():
        m.base.model.vision_tower.requires_grad_(False)
        m.base.model.multi_modal_projector.requires_grad_(False)
    config = {"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    trained = [p for p in zero3.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=zero3, optimizer=torch.optim.SGD(trained, lr=0.0), config=config)
    assert zero3.language_model_in_one_call
    stack = fast_paths.stack_passes(zero3, torch.device("cpu"), torch.float32).choice
    assert stack == ("layer_stack" if layer_ops == "fused" else "transformers")
    vision = fast_paths.vision_layers(zero3, torch.device("cpu"), torch.float32).choice
    assert vision == ("fused" if layer_ops == "fused" and vision_leaf else "modules")  # reads weights in the call
    lm = zero3.language_model
    tower = zero3.base.model.vision_tower
    counts = _fetch_counter(monkeypatch, {"language_model": lm, "layer 0": lm.layers[0], "lm_head": zero3.base.lm_head,
                                          "vision tower": tower, "vision layer 0": vision_layers(zero3)[0]})
    # a leaf's gradients are reduced in its full backward hook: each must be there by then (an early hook would
    # reduce zeros in their place, a hook that never fires would not reduce them at all)
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    reduced = {}
    original_reduce = DeepSpeedZeroOptimizer_Stage3.reduce_ready_partitions_and_remove_grads

    def reduce(self, param):
        reduced[id(param)] = param.grad is not None and bool(param.grad.abs().sum() > 0)
        return original_reduce(self, param)

    monkeypatch.setattr(DeepSpeedZeroOptimizer_Stage3, "reduce_ready_partitions_and_remove_grads", reduce)
    from deepspeed.runtime.zero import parameter_offload

    stray = []  # gathers by ZeRO-3's parameter getter (a weight read outside its module's gather)
    original_register = parameter_offload.register_external_parameter
    monkeypatch.setattr(parameter_offload, "register_external_parameter",
                        lambda module, param: stray.append(param.ds_id) or original_register(module, param))
    import kernels.layer_grads

    fused_norms = []  # the fused vision encoder's norms (imported from the kernel module at each call)
    original_norm = kernels.layer_grads.layer_norm_grad
    monkeypatch.setattr(kernels.layer_grads, "layer_norm_grad",
                        lambda *a, **k: fused_norms.append(1) or original_norm(*a, **k))
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
    tower_calls = 1 if image_tokens else 0
    vision_layer_calls = 0 if vision_leaf or not image_tokens else 1
    assert counts == {("language_model", "forward"): 1, ("language_model", "backward"): 1, ("layer 0", "forward"): 0,
                      ("layer 0", "backward"): 0, ("lm_head", "forward"): 1, ("lm_head", "backward"): 1,
                      ("vision tower", "forward"): tower_calls, ("vision tower", "backward"): tower_calls,
                      ("vision layer 0", "forward"): vision_layer_calls,
                      ("vision layer 0", "backward"): vision_layer_calls}, counts
    assert len(blocks) == (1 if latent_passes == "static" else 0), "the latent block must run inside the call"
    if vision_leaf or not image_tokens:  # per module, transformers' patch embedding reads its child's weight itself
        assert stray == [], f"{len(stray)} weights gathered by ZeRO-3's getter"
    assert bool(fused_norms) == (vision == "fused" and image_tokens > 0)
    from deepspeed.utils import safe_get_full_grad

    worst, checked = 0.0, 0
    for (name, p), (_, q) in zip(zero3.named_parameters(), reference.named_parameters()):
        if q.grad is None:
            continue
        worst = max(worst, (safe_get_full_grad(p).float() - q.grad).abs().max().item())
        checked += 1
    assert checked > 10 and worst < 1e-5, f"max gradient difference {worst:.3g} over {checked} parameters"
    for module in (lm, tower) if vision_leaf and image_tokens and not frozen_tower else (lm,):
        missing = [name for name, p in module.named_parameters() if p.requires_grad and not reduced.get(id(p))]
        assert not missing, f"reduced without their gradient, or not at all: {missing[:5]} ({len(missing)})"


def test_graphs_under_per_module_zero3_are_refused(tiny, monkeypatch):
    """CUDA graphs cannot replay ZeRO-3's per-module gathers: without the language model as a leaf, a forward that
    would run the graphed block says why instead."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed("cpu")
    import deepspeed

    model, tok, _ = tiny
    zero3 = copy.deepcopy(model).train()
    config = {"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=zero3, optimizer=torch.optim.SGD(zero3.parameters(), lr=0.0), config=config)
    assert not zero3.language_model_in_one_call
    monkeypatch.setattr(fast_paths, "latent_passes", lambda *a: fast_paths.Decision("latent_passes", "cuda_graph", "test"))
    batch = synthetic_batch(model, tok, batch_size=3, n_latents=4, question_len=9, answer_len=5, image_tokens=16)
    with pytest.raises(RuntimeError, match="needs the language model as one leaf module"):
        engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
               labels=batch.labels, return_logits=False)


def test_plain_calls_run_the_class_forward_inside_the_modules_own_call():
    """`plain_calls`: inside `call_as_forward(module, fn)`, code that calls the module itself reaches its class
    forward once, without its hooks (which wrap the outer call only); the hooks and forward are back afterwards,
    and a hook registered on the module during its own call is refused rather than dropped."""
    from engine.model.coconut import call_as_forward, plain_calls

    lin = torch.nn.Linear(3, 3)
    seen = []
    lin.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    lin.register_forward_hook(lambda m, args, out: seen.append("post"))
    x = torch.randn(2, 3)

    def fn(inp):
        with plain_calls(lin):
            return (lin(inp) * 2,)

    (out,) = call_as_forward(lin, fn, x)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, lin.weight, lin.bias) * 2)
    assert seen == ["pre", "post"]  # once, around the outer call
    assert "forward" not in lin.__dict__ and len(lin._forward_pre_hooks) == 1 and len(lin._forward_hooks) == 1

    def registers(inp):
        with plain_calls(lin):
            lin.register_forward_hook(lambda m, args, out: None)
            return (lin(inp),)

    with pytest.raises(RuntimeError, match="registered on Linear during its own call"):
        call_as_forward(lin, registers, x)
    assert "forward" not in lin.__dict__ and len(lin._forward_hooks) == 1
