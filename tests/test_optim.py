"""engine/training/optim.py: every optimizer choice under DeepSpeed ZeRO-1/2 reaches the parameters plain AdamW
reaches; the per-stage ZeRO settings take effect (no gradient hooks under ZeRO-1); the fused optimizer's state
resets between stages; config validation. CPU, fp32, single process (torch's fused AdamW has a CPU kernel since
torch 2.4; DeepSpeed's FusedAdam is a CUDA extension and runs only where CUDA is)."""

from __future__ import annotations

import pytest
import torch

from engine import load_model
from engine.training.config import ConfigError, config_from_dict
from engine.training.distributed import init_distributed
from engine.training.zero_step import deepspeed_release_checked
from engine.training.optim import (
    ZERO_DEFAULTS,
    build_engine,
    build_optimizer,
    deepspeed_config,
    destroy_engine,
    grad_checks,
    lr_lambda_for,
    param_groups,
    reset_optimizer_state,
    resolve_optimizer,
)
from tests.helpers import align_batch, random_pixels, sample_ids

SMALL = {"text_hidden_size": 32, "text_layers": 1, "text_intermediate_size": 64}
STEPS = 4
CUDA = torch.cuda.is_available()


def train_config(**overrides):
    values = dict(model_id="tiny", model_overrides=dict(SMALL), lr=3e-3, batch_size_training=3, device="cpu",
                  warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.1, max_grad_norm=0.05)
    values.update(overrides)
    return config_from_dict(values)


def fresh_model(device="cpu", overrides=None):
    model, tok, _ = load_model("tiny", seed=0, model_overrides=overrides or SMALL, device=device)
    model.set_latent_passes("transformers")
    return model, tok


def batch_for(model, tok, device="cpu"):
    rows = [sample_ids(tok, model, tiles=t, question=q, n_latents=n)
            for t, q, n in ((1, "What colour?", 2), (1, "Move right twice.", 2), (0, "Move down.", 1))]
    ids, mask = align_batch(rows, tok.pad_token_id, model.latent_id)
    labels = ids.masked_fill((mask == 0) | (ids == model.latent_id), -100)
    pv = random_pixels(2, model.config.vision_config.image_size[0], 0)
    return [t.to(device) for t in (ids, mask, labels, pv)]


def reference_parameters(cfg) -> dict[str, torch.Tensor]:
    """Plain torch AdamW (the per-tensor loop), clipping and schedule by hand, no DeepSpeed."""
    model, tok = fresh_model()
    ids, mask, labels, pv = batch_for(model, tok)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                            foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_for(cfg, STEPS))
    for _ in range(STEPS):
        model(ids, mask, pv, labels=labels, return_logits=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def deepspeed_engine(cfg, device="cpu"):
    import deepspeed

    init_distributed(device)
    model, tok = fresh_model(device, cfg.model_overrides)
    factor = lr_lambda_for(cfg, STEPS)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, cfg), config=deepspeed_config(cfg, use_bf16=False),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
    )
    path = grad_checks(engine, cfg.zero_grad_checks)  # as build_engine does
    if cfg.zero_stage in (1, 2, 3):  # auto must take the device step (fused AdamW) or the multi-tensor checks here,
        # or the tests would not cover them
        checked = deepspeed_release_checked() and cfg.zero_grad_checks != "deepspeed"
        fused = cfg.zero_grad_checks == "auto" and resolve_optimizer(cfg.optimizer, device) == "adamw_fused"
        assert path == ("deepspeed" if not checked else "device" if fused else "multi_tensor")
    return engine, model, tok


def train(engine, model, tok, device="cpu", steps=STEPS):
    ids, mask, labels, pv = batch_for(model, tok, device)
    for _ in range(steps):
        loss = engine(ids, mask, pv, labels=labels, return_logits=False).loss
        engine.backward(loss)
        engine.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference():
    params = reference_parameters(train_config())
    start = dict(fresh_model()[0].named_parameters())
    assert sum(not torch.equal(start[n], v) for n, v in params.items()) > len(params) // 2, "training must move them"
    return params


@pytest.mark.parametrize("zero_stage,optimizer,checks", [
    *((stage, optimizer, checks) for stage in (1, 2) for optimizer, checks in (
        ("adamw", "auto"), ("adamw_foreach", "auto"), ("adamw_fused", "auto"), ("adamw_fused", "multi_tensor"),
        ("adamw_fused", "deepspeed"))),
    *(pytest.param(stage, "deepspeed_fused_adam", "auto",
                   marks=pytest.mark.skipif(not CUDA, reason="DeepSpeed FusedAdam is CUDA-only")) for stage in (1, 2)),
    (3, "adamw_fused", "auto"), (3, "adamw_fused", "multi_tensor"),
])
def test_every_optimizer_trains_to_the_plain_adamw_parameters(reference, optimizer, checks, zero_stage):
    """... with the gradient norm of the clipping (max_grad_norm 0.05: every step clips) from the multi-tensor
    checks, from DeepSpeed's own loops, and (auto with the fused AdamW) clipped inside the fused kernel by the
    device step (ZeRO-3's too)."""
    device = "cuda" if optimizer == "deepspeed_fused_adam" else "cpu"
    cfg = train_config(optimizer=optimizer, zero_stage=zero_stage, device=device, zero_grad_checks=checks)
    engine, model, tok = deepspeed_engine(cfg, device)
    try:
        inner = engine.optimizer.optimizer
        assert type(inner).__name__ == ("FusedAdam" if optimizer == "deepspeed_fused_adam" else "AdamW")
        if optimizer.startswith("adamw"):
            assert inner.defaults["fused"] is (optimizer == "adamw_fused")
            assert inner.defaults["foreach"] is (optimizer == "adamw_foreach")
        got = train(engine, model, tok, device)
    finally:
        destroy_engine(engine)
    for name, value in reference.items():
        torch.testing.assert_close(got[name].cpu(), value, rtol=0, atol=2e-5, msg=lambda m: f"{optimizer} {name}: {m}")


def test_zero_settings_per_stage_and_overrides():
    cfg2 = train_config(zero_stage=2, deepspeed={"zero_optimization": {"overlap_comm": False}, "steps_per_print": 5})
    ds = deepspeed_config(cfg2, use_bf16=False)
    assert ds["zero_optimization"] == {"stage": 2, **ZERO_DEFAULTS[2], "overlap_comm": False}
    assert ds["steps_per_print"] == 5 and ds["gradient_clipping"] == 0.05
    ds3 = deepspeed_config(train_config(zero_stage=3), use_bf16=True)["zero_optimization"]
    assert ds3["stage3_param_persistence_threshold"] == 1_000_000 and ds3["overlap_comm"] is True
    assert ds3["stage3_gather_16bit_weights_on_model_save"] is False
    assert deepspeed_config(train_config(zero_stage=0), use_bf16=False)["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("synchronized", [None, True])
def test_steps_do_not_wait_for_the_device_in_deepspeeds_throughput_timer(monkeypatch, synchronized):
    """DeepSpeed's throughput timer synchronises the device at each forward and step (from the third step) unless
    told not to; the trainer's config tells it not to, and a user's override still wins."""
    from deepspeed.accelerator import get_accelerator

    overrides = {} if synchronized is None else {"timers": {"throughput": {"synchronized": synchronized}}}
    cfg = train_config(zero_stage=2, deepspeed=overrides)
    assert deepspeed_config(cfg, use_bf16=False)["timers"]["throughput"]["synchronized"] is bool(synchronized)
    engine, model, tok = deepspeed_engine(cfg)
    waits = []
    accelerator = get_accelerator()
    monkeypatch.setattr(accelerator, "synchronize", lambda *args, **kwargs: waits.append(args))
    try:
        ids, mask, labels, pv = batch_for(model, tok)
        for _ in range(4):
            engine.backward(engine(ids, mask, pv, labels=labels, return_logits=False).loss)
            engine.step()
        in_steps = len(waits)
    finally:
        destroy_engine(engine)
    assert (in_steps > 0) is bool(synchronized), in_steps


def test_zero2_overlaps_its_reductions_only_on_several_ranks(monkeypatch):
    cfg = train_config(zero_stage=2)
    assert deepspeed_config(cfg, use_bf16=True, world_size=1)["zero_optimization"]["overlap_comm"] is False
    assert deepspeed_config(cfg, use_bf16=True, world_size=2)["zero_optimization"]["overlap_comm"] is True
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # before the process group exists:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert deepspeed_config(cfg, use_bf16=True)["zero_optimization"]["overlap_comm"] is False  # one process
    monkeypatch.setenv("WORLD_SIZE", "4")  # what a launcher (torchrun, deepspeed) sets
    assert deepspeed_config(cfg, use_bf16=True)["zero_optimization"]["overlap_comm"] is True
    asked = train_config(zero_stage=2, deepspeed={"zero_optimization": {"overlap_comm": True}})
    assert deepspeed_config(asked, use_bf16=True, world_size=1)["zero_optimization"]["overlap_comm"] is True
    for stage in (1, 3):  # their own settings, whatever the world size
        zero = deepspeed_config(train_config(zero_stage=stage), use_bf16=True, world_size=1)["zero_optimization"]
        assert zero["overlap_comm"] is ZERO_DEFAULTS[stage]["overlap_comm"]


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_deepspeed_takes_the_stage_settings(zero_stage):
    """DeepSpeed validates the settings (unknown keys are errors there) and applies them: ZeRO-1 registers no
    per-parameter gradient hook, ZeRO-2 one per trainable tensor."""
    engine, model, tok = deepspeed_engine(train_config(zero_stage=zero_stage))
    try:
        settings = ZERO_DEFAULTS[zero_stage]
        assert engine.zero_optimization_stage() == zero_stage
        # one process here: ZeRO-2 does not overlap (`test_zero2_overlaps_its_reductions_only_on_several_ranks`)
        assert engine.zero_overlap_comm() == (settings["overlap_comm"] and zero_stage != 2)
        assert engine.zero_contiguous_gradients() == settings["contiguous_gradients"]
        assert engine.zero_reduce_bucket_size() == settings["reduce_bucket_size"]
        if zero_stage == 3:
            assert engine.zero_param_persistence_threshold() == settings["stage3_param_persistence_threshold"]
        else:
            hooks = len(engine.optimizer._grad_acc_hooks)
            trainable = sum(1 for p in model.parameters() if p.requires_grad)
            assert hooks == (0 if zero_stage == 1 else trainable)
        params = train(engine, model, tok, steps=1)
        assert all(torch.isfinite(p).all() for p in params.values())
    finally:
        destroy_engine(engine)


def test_reset_optimizer_state_with_the_fused_optimizer():
    engine, model, tok = deepspeed_engine(train_config(optimizer="adamw_fused"))
    try:
        train(engine, model, tok, steps=2)
        inner = engine.optimizer.optimizer
        steps = [float(s["step"]) for s in inner.state.values()]
        assert steps and all(s == 2 for s in steps)
        assert reset_optimizer_state(engine) == len(steps) > 0
        assert len(inner.state) == 0 and reset_optimizer_state(engine) == 0
        params = train(engine, model, tok, steps=1)  # the fused step starts fresh moments
        assert [float(s["step"]) for s in inner.state.values()] == [1.0] * len(steps)
        assert all(torch.isfinite(p).all() for p in params.values())
    finally:
        destroy_engine(engine)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_destroyed_engine_lets_the_model_go(zero_stage):
    """After `destroy_engine` nothing holds the model or the engine, also after a forward that failed half-way:
    DeepSpeed's ZeRO-3 keeps both past its own `destroy()` (its module stack and a class-wide cache), so a process
    building engines one after another (the training-step benchmark) ran out of GPU memory."""
    import gc
    import weakref

    init_distributed("cpu")
    from deepspeed.runtime.zero.parameter_offload import FWD_MODULE_STACK

    stack_before = list(FWD_MODULE_STACK)  # other tests' engines may have left theirs
    model, tok = fresh_model()
    engine = build_engine(model, train_config(zero_stage=zero_stage), STEPS, use_bf16=False)
    ids, mask, labels, pv = batch_for(model, tok)
    for _ in range(2):  # the second step runs on ZeRO-3's completed trace, where the cache fills
        engine.backward(engine(ids, mask, pv, labels=labels, return_logits=False).loss)
        engine.step()
    if zero_stage == 3:  # a forward that raises inside the language model's call leaves that call on ZeRO-3's stack

        def fail(module, args):
            raise RuntimeError("a forward that fails half-way")

        model.get_submodule("base.model.language_model.layers.0").register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="half-way"):
            engine(ids, mask, pv, labels=labels, return_logits=False)
    model_ref, engine_ref = weakref.ref(model), weakref.ref(engine)
    destroy_engine(engine)
    del engine, model
    gc.collect()
    assert model_ref() is None and engine_ref() is None
    assert FWD_MODULE_STACK == stack_before  # nothing of the destroyed engine left for the next one to register on


def test_optimizer_choice_validation():
    with pytest.raises(ConfigError, match="optimizer must be one of auto, adamw_fused, adamw_foreach, adamw"):
        train_config(optimizer="sgd")
    assert resolve_optimizer("auto", "cuda") == "adamw_fused"
    assert resolve_optimizer("auto", "cpu") == "adamw_foreach"
    assert resolve_optimizer("adamw", "cuda") == "adamw"
    if not CUDA:
        model, _ = fresh_model()
        with pytest.raises(ConfigError, match="deepspeed_fused_adam needs CUDA"):
            build_optimizer(model, train_config(optimizer="deepspeed_fused_adam"))
    model, _ = fresh_model()
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 and "norm" not in names[id(p)] for p in groups[0]["params"])
    assert all(p.ndim < 2 or "norm" in names[id(p)] for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
