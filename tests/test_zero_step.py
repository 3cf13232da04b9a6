"""engine/training/zero_step.py: the multi-tensor gradient norm and overflow check give DeepSpeed's answers (the
norm to fp64 rounding, overflow for NaN, +inf and -inf in any gradient), skip a step the same way, issue a number of
operators that does not grow with the number of parameters, and step aside where the setup is not the plain one.
CPU, fp32, one process (tests/test_optim.py trains through them against plain AdamW with clipping)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.training.config import ConfigError
from engine.training.optim import destroy_engine, grad_checks
from engine.training import zero_step
from engine.training.zero_step import deepspeed_release_checked, multi_tensor_unsupported, use_multi_tensor_grad_checks
from tests.test_optim import batch_for, deepspeed_engine, fresh_model, train_config

# the replacement is compared with the DeepSpeed release it was written against; another release keeps its own
# loops (the last test checks that refusal whatever is installed)
needs_checked_release = pytest.mark.skipif(
    not deepspeed_release_checked(), reason="the installed DeepSpeed is not a release the replacement was checked against")


class CountOps(TorchDispatchMode):
    """Operators that compute (a kernel each on a GPU); views and detaches only make tensor metadata."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def engine_after_backward(zero_stage: int, checks: str, text_layers: int = 1):
    cfg = train_config(zero_stage=zero_stage, zero_grad_checks=checks,
                       model_overrides={"text_hidden_size": 32, "text_layers": text_layers,
                                        "text_intermediate_size": 64})
    engine, model, tok = deepspeed_engine(cfg)
    ids, mask, labels, pv = batch_for(model, tok)
    engine.backward(engine(ids, mask, pv, labels=labels, return_logits=False).loss)
    return engine


def all_grads(opt) -> list[torch.Tensor]:
    groups = opt.fp16_groups if zero_step._is_stage3(opt) else opt.bit16_groups
    return [g for i in range(len(groups)) for g in opt.averaged_gradients[i] if g is not None]


@needs_checked_release
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_norm_and_overflow_equal_deepspeed(zero_stage):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as ZeroOpt

    engine = engine_after_backward(zero_stage, "auto")
    try:
        opt = engine.optimizer
        assert opt.get_grad_norm_direct.__func__ is not ZeroOpt.get_grad_norm_direct  # the multi-tensor one is on
        grads = all_grads(opt)
        assert len(grads) > 10
        for i in range(len(opt.bit16_groups)):
            ours = opt.get_grad_norm_direct(opt.averaged_gradients[i], opt.params_in_partition[i])
            theirs = ZeroOpt.get_grad_norm_direct(opt, opt.averaged_gradients[i], opt.params_in_partition[i])
            assert float(ours) > 0
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        assert not bool(opt.has_overflow_partitioned_grads_serial())
        assert not bool(ZeroOpt.has_overflow_partitioned_grads_serial(opt))
        target = grads[len(grads) // 2]
        saved = target.clone()
        for bad in (float("nan"), float("inf"), float("-inf")):
            target.view(-1)[target.numel() // 2] = bad
            assert bool(opt.has_overflow_partitioned_grads_serial()), bad
            assert bool(ZeroOpt.has_overflow_partitioned_grads_serial(opt)), bad
            group = next(i for i in range(len(opt.bit16_groups))
                         if any(g is target for g in opt.averaged_gradients[i]))
            norm = opt.get_grad_norm_direct(opt.averaged_gradients[group], opt.params_in_partition[group])
            assert float(norm) == -1.0  # DeepSpeed's mark of a non-finite norm, which then skips the step
            target.copy_(saved)
        # a huge but finite gradient is no overflow (its square overflows fp32, not the fp64 accumulation)
        target.view(-1)[0] = 3e38
        assert not bool(opt.has_overflow_partitioned_grads_serial())
        assert not bool(ZeroOpt.has_overflow_partitioned_grads_serial(opt))
    finally:
        destroy_engine(engine)


@needs_checked_release
def test_stage3_norm_equals_deepspeed():
    """ZeRO-3: the multi-tensor norm of each group's gradient partitions is DeepSpeed's (fp64 rounding), -1 for a
    NaN or an infinity, and the step's operators stop growing with the gradients."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    engine = engine_after_backward(3, "auto")
    try:
        opt = engine.optimizer
        assert opt.get_grad_norm_direct.__func__ is zero_step._stage3_grad_norm
        assert sum(len(opt.averaged_gradients[i]) for i in range(len(opt.fp16_groups))) > 10
        for i in range(len(opt.fp16_groups)):
            ours = opt.get_grad_norm_direct(opt.averaged_gradients[i], opt.fp16_groups[i])
            theirs = Stage3.get_grad_norm_direct(opt, opt.averaged_gradients[i], opt.fp16_groups[i])
            assert float(ours) > 0
            torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=0)
        grads = opt.averaged_gradients[0]
        target = grads[len(grads) // 2]
        saved = target.clone()
        for bad in (float("nan"), float("inf"), float("-inf")):
            target.view(-1)[0] = bad
            assert float(opt.get_grad_norm_direct(grads, opt.fp16_groups[0])) == -1.0, bad
            assert float(Stage3.get_grad_norm_direct(opt, grads, opt.fp16_groups[0])) == -1.0, bad
        target.copy_(saved)
        with CountOps() as ours:
            opt.get_grad_norm_direct(grads, opt.fp16_groups[0])
        with CountOps() as theirs:
            Stage3.get_grad_norm_direct(opt, grads, opt.fp16_groups[0])
        assert len(grads) > 10 and ours.count <= 12 < len(grads) <= theirs.count
        assert zero_step.stage3_norm_unsupported(opt) is None
        opt.model_parallel_group = object()
        assert "model parallelism" in zero_step.use_stage3_multi_tensor_norm(opt)
        opt.model_parallel_group = None
        assert "not DeepSpeed's ZeRO-3" in zero_step.stage3_norm_unsupported(torch.optim.SGD([torch.zeros(1)], lr=1.0))
    finally:
        destroy_engine(engine)
    engine = engine_after_backward(3, "deepspeed")
    try:
        assert engine.optimizer.get_grad_norm_direct.__func__ is Stage3.get_grad_norm_direct
    finally:
        destroy_engine(engine)


@needs_checked_release
def test_a_step_with_a_nan_gradient_is_skipped():
    """With overflow checking on (bf16's default), a NaN in one gradient skips the whole step: no weight moves."""
    engine = engine_after_backward(2, "auto")
    try:
        opt = engine.optimizer
        opt.check_grad_overflow = True  # what bf16 sets; fp32 runs do not check
        norm_calls = []
        norm = opt.get_grad_norm_direct
        opt.get_grad_norm_direct = lambda *a, **k: norm_calls.append(1) or norm(*a, **k)
        before = [p.detach().clone() for p in engine.module.parameters()]
        all_grads(opt)[3].view(-1)[0] = float("nan")
        engine.step()
        assert opt.overflow is True
        assert norm_calls == []  # the overflow check found it: the (also invalid) norm was never needed
        assert all(torch.equal(a, p.detach()) for a, p in zip(before, engine.module.parameters()))
    finally:
        destroy_engine(engine)


def step_ops(checks: str, text_layers: int) -> tuple[int, int]:
    engine = engine_after_backward(2, checks, text_layers)
    try:
        engine.optimizer.check_grad_overflow = True
        n_grads = len(all_grads(engine.optimizer))
        with CountOps() as counter:
            engine.step()
        return counter.count, n_grads
    finally:
        destroy_engine(engine)


@needs_checked_release
def test_operator_count_does_not_grow_with_the_parameters():
    """DeepSpeed's loops issue several operators per gradient; the multi-tensor checks a fixed handful."""
    ds_small, n_small = step_ops("deepspeed", 1)
    ds_big, n_big = step_ops("deepspeed", 3)
    mt_small, _ = step_ops("auto", 1)
    mt_big, _ = step_ops("auto", 3)
    assert n_big > n_small + 10
    assert ds_big - ds_small >= 4 * (n_big - n_small)  # DeepSpeed: at least 4 operators per extra gradient
    assert mt_big - mt_small <= 4  # ours: the same multi-tensor calls, whatever the count
    assert mt_big < ds_big / 3


def test_unsupported_setups_keep_deepspeeds_checks(monkeypatch):
    engine = engine_after_backward(2, "auto")
    try:
        opt = engine.optimizer
        monkeypatch.setattr(zero_step, "deepspeed_release_checked", lambda: True)  # the setup checks, whatever release
        assert multi_tensor_unsupported(opt) is None
        opt.mpu = object()
        assert "model parallelism" in multi_tensor_unsupported(opt)
        assert "model parallelism" in use_multi_tensor_grad_checks(opt)
        opt.mpu = None
        assert "not DeepSpeed's ZeRO-1/2" in multi_tensor_unsupported(torch.optim.SGD([torch.zeros(1)], lr=1.0))
        monkeypatch.setattr(zero_step, "deepspeed_release_checked", lambda: False)
        assert "checked against 0.19 only" in multi_tensor_unsupported(opt)
    finally:
        destroy_engine(engine)
    monkeypatch.undo()
    import deepspeed

    for version, checked in (("0.19.8", True), ("0.19.0+cu130", True), ("0.27.0", False), ("0.18.9", False)):
        monkeypatch.setattr(deepspeed, "__version__", version)
        assert deepspeed_release_checked() is checked, version
    monkeypatch.undo()
    engine = engine_after_backward(2, "deepspeed")
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as ZeroOpt

        assert engine.optimizer.get_grad_norm_direct.__func__ is ZeroOpt.get_grad_norm_direct
        assert grad_checks(engine, "deepspeed") == "deepspeed"
    finally:
        destroy_engine(engine)
    with pytest.raises(ConfigError, match="zero_grad_checks"):
        train_config(zero_grad_checks="fast")


class CountHostReads(TorchDispatchMode):
    """`.item()`, `bool(tensor)`, `float(tensor)`: each is one `_local_scalar_dense`, a wait for the device on a GPU."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


PRECISIONS = {"fp32": {}, "bf16": {"bf16": {"enabled": True}},
              "fp16": {"fp16": {"enabled": True, "loss_scale": 128}}}  # a static scale: the clip factor divides it out


def fused_engine(zero_stage: int, checks: str, device: str = "cpu", precision: str = "fp32",
                 sub_group_size: int | None = None):
    """An engine with torch's fused AdamW, clipping at every step (max_grad_norm 0.05) and a warmup/linear
    schedule, so that a wrong clip factor or a wrongly advanced schedule changes the weights. `sub_group_size`:
    ZeRO-3's, to split the parameters into several sub-groups as a large model's are (DeepSpeed's default is 1e9
    elements: an 8B model's parameters fall into several)."""
    deepspeed = dict(PRECISIONS[precision])
    if sub_group_size is not None:
        deepspeed["zero_optimization"] = {"sub_group_size": sub_group_size}
    cfg = train_config(zero_stage=zero_stage, zero_grad_checks=checks, optimizer="adamw_fused", device=device,
                       model_overrides={"text_hidden_size": 32, "text_layers": 1, "text_intermediate_size": 64},
                       deepspeed=deepspeed)
    engine, model, tok = deepspeed_engine(cfg, device)
    engine.optimizer.check_grad_overflow = True  # what bf16 sets: a non-finite gradient skips the step
    return engine, model, batch_for(model, tok, device)


def run_steps(engine, model, batch, nan_at=()):
    """Steps of the same batch; a NaN in one gradient at the steps in `nan_at`; `settle_skipped_steps` only at the
    end. Returns the parameters (ZeRO-3: its fp32 partitions too), the Adam step counts, the learning rate, the host
    reads of each `engine.step()` and the global gradient norm the engine reports after each."""
    ids, mask, labels, pv = batch
    reads, norms = [], []
    for step in range(4):
        engine.backward(engine(ids, mask, pv, labels=labels, return_logits=False).loss)
        if step in nan_at:
            all_grads(engine.optimizer)[3].view(-1)[0] = float("nan")
        with CountHostReads() as counter:
            engine.step()
        reads.append(counter.reads)
        norm = engine.get_global_grad_norm()
        norms.append(None if norm is None else float(norm))
    zero_step.settle_skipped_steps(engine)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i, flat in enumerate(getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])):
        params[f"fp32 partition {i}"] = flat.detach().clone()
    steps = sorted(float(s["step"]) for s in engine.optimizer.optimizer.state.values())
    return params, steps, engine.get_lr()[0], reads, norms


@needs_checked_release
@pytest.mark.parametrize("zero_stage,device,precision,sub_group_size", [
    (1, "cpu", "fp32", None), (2, "cpu", "fp32", None), (3, "cpu", "fp32", None), (3, "cpu", "bf16", None),
    (3, "cpu", "fp16", None), (3, "cpu", "bf16", 2000),
    *(pytest.param(stage, "cuda", "fp32", None,
                   marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))
      for stage in (2, 3)),
])
def test_device_step_equals_deepspeeds_step_without_host_reads(zero_stage, device, precision, sub_group_size):
    """The step that leaves the overflow and the clip factor on the device trains to DeepSpeed's weights (its step
    with the multi-tensor checks: the same norm), reports DeepSpeed's global gradient norm, skips a NaN step the
    same way (weights, moments, step count) and takes the schedule back when the skip is settled, and reads nothing
    on the host where DeepSpeed's reads at least once per step (ZeRO-1/2: the overflow and the norm, three times).
    ZeRO-3 also in bf16, in fp16 with a static loss scale (the norm and the clip factor carry the scale) and with its
    parameters in several sub-groups (each stepped in turn, the norm combined over them)."""
    if device == "cpu" and precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():  # oneDNN has no fp16 kernels for this CPU (AMD EPYC, say)
            pytest.skip("DeepSpeed's CPU accelerator refuses fp16 on this CPU")
    results = {}
    for checks in ("multi_tensor", "auto"):
        engine, model, batch = fused_engine(zero_stage, checks, device, precision, sub_group_size)
        try:
            assert zero_step.device_step_active(engine.optimizer) is (checks == "auto")
            if sub_group_size is not None:
                assert len(engine.optimizer.fp16_groups) > 2  # several sub-groups
            results[checks] = run_steps(engine, model, batch, nan_at=(1,))
            assert engine.skipped_steps == 1, checks
        finally:
            destroy_engine(engine)
    (ds_params, ds_steps, ds_lr, ds_reads, ds_norms), (params, steps, lr, reads, norms) = (results["multi_tensor"],
                                                                                         results["auto"])
    assert reads == [0, 0, 0, 0]
    assert norms[1] == ds_norms[1] == float("inf")  # the skipped step
    for ours, theirs in zip(norms[::2] + norms[3:], ds_norms[::2] + ds_norms[3:]):
        assert theirs > 0 and ours == pytest.approx(theirs, rel=1e-6), (norms, ds_norms)
    assert min(ds_reads) >= 1 and max(ds_reads) >= (1 if zero_stage == 3 else 3)  # the norm checked (ZeRO-1/2:
    # the overflow .item() too, the norm twice)
    assert steps == ds_steps == [3.0] * len(steps)  # four steps, one skipped
    assert lr == ds_lr
    start = dict(fresh_model(overrides={"text_hidden_size": 32, "text_layers": 1, "text_intermediate_size": 64})[0]
                 .named_parameters())
    assert sum(not torch.equal(start[n], params[n].cpu().to(start[n].dtype)) for n in start) > len(start) // 2  # training
    # moved them
    for name, value in ds_params.items():  # the kernel divides by the clip factor where DeepSpeed multiplies by
        # its reciprocal: ~1 ulp in the gradients, which Adam's division by the root of the second moment magnifies
        # where a 16-bit gradient is near zero (a few 1e-6 in the fp32 weights), and a 16-bit copy of a weight can
        # round one 16-bit ulp apart
        tolerance = dict(rtol=1e-5, atol=1e-6 if precision == "fp32" else 1e-5) if value.dtype == torch.float32 else {}
        torch.testing.assert_close(params[name], value, **tolerance, msg=lambda m: f"{name}: {m}")


@needs_checked_release
def test_skips_settled_late_leave_the_schedule_where_deepspeed_has_it():
    """Settled only at the end (as at a log step), the schedule is taken back to DeepSpeed's step count."""
    lrs = {}
    for checks in ("multi_tensor", "auto"):
        engine, model, batch = fused_engine(2, checks)
        try:
            run_steps(engine, model, batch, nan_at=(0, 2))
            lrs[checks] = (engine.get_lr()[0], engine.lr_scheduler.last_epoch, engine.skipped_steps)
        finally:
            destroy_engine(engine)
    assert lrs["auto"] == lrs["multi_tensor"]
    assert lrs["auto"][2] == 2


def test_device_step_refuses_other_setups(monkeypatch):
    monkeypatch.setattr(zero_step, "deepspeed_release_checked", lambda: True)
    engine = engine_after_backward(2, "auto")  # the CPU's auto optimizer: torch's foreach AdamW
    try:
        opt = engine.optimizer
        assert not zero_step.device_step_active(opt)
        assert "not torch's fused Adam/AdamW" in zero_step.device_step_unsupported(opt)
        opt.optimizer.param_groups[0]["fused"] = True
        opt.optimizer.param_groups[1]["fused"] = True
        assert zero_step.device_step_unsupported(opt) is None
        for attribute, value, reason in (("dynamic_loss_scale", True, "dynamic loss scale"),
                                         ("torch_autocast_gradscaler", object(), "GradScaler"),
                                         ("zenflow", True, "ZenFlow"), ("groups_lacking_loss_scale", {0}, "Muon"),
                                         ("cpu_offload", True, "CPU offload")):
            saved = getattr(opt, attribute)
            setattr(opt, attribute, value)
            assert reason in zero_step.device_step_unsupported(opt), attribute
            setattr(opt, attribute, saved)
        opt.dtype, opt.check_grad_overflow = torch.bfloat16, False
        assert "non-finite" in zero_step.device_step_unsupported(opt)
        assert zero_step.settle_skipped_steps(engine) == 0  # not stepping on the device: nothing to settle
    finally:
        destroy_engine(engine)


def test_stage3_device_step_refuses_other_setups(monkeypatch):
    monkeypatch.setattr(zero_step, "deepspeed_release_checked", lambda: True)
    engine = engine_after_backward(3, "auto")  # the CPU's auto optimizer: torch's foreach AdamW, DeepSpeed's step
    try:
        opt = engine.optimizer
        assert not zero_step.device_step_active(opt)
        assert "not torch's fused Adam/AdamW" in zero_step.device_step_unsupported(opt)
        for group in opt.optimizer.param_groups:
            group["fused"] = True
        assert zero_step.device_step_unsupported(opt) is None
        for attribute, value, reason in (("dynamic_loss_scale", True, "dynamic loss scale"),
                                         ("torch_autocast_gradscaler", object(), "GradScaler"),
                                         ("zenflow", True, "ZenFlow"), ("use_muon", True, "Muon"),
                                         ("offload_optimizer", True, "CPU offload"), ("swap_optimizer", True, "offload"),
                                         ("offload_param", True, "offload")):
            saved = getattr(opt, attribute)
            setattr(opt, attribute, value)
            assert reason in zero_step.device_step_unsupported(opt), attribute
            setattr(opt, attribute, saved)
        saved = opt.fp16_partitioned_groups_flat[0]
        opt.fp16_partitioned_groups_flat[0] = None
        assert "swapped out" in zero_step.device_step_unsupported(opt)
        opt.fp16_partitioned_groups_flat[0] = saved
        assert zero_step.use_device_step(opt) is None and zero_step.device_step_active(opt)
        assert opt.get_grad_norm_direct.__func__ is zero_step._stage3_grad_norm  # the norm the step combines
    finally:
        destroy_engine(engine)


class RecordingStream:
    """A stream that records what is asked of it (`calls`): the host waiting for it, or it waiting for another."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def synchronize(self):
        self.calls.append(f"the host waits for {self.name}")

    def wait_stream(self, other):
        self.calls.append(f"{self.name} waits for {getattr(other, 'name', other)}")


@needs_checked_release
def test_stage3_epilogue_orders_the_device_not_the_host(monkeypatch):
    """At the end of ZeRO-3's backward DeepSpeed waits on the host for its reduction stream; with the device step
    the default stream waits for it on the device instead, after the last bucket is reduced, and the step gets the
    same gradient partitions. A backward on a device that orders streams (the CPU accelerator made to say so, its
    streams recorded), with the device step's epilogue and with DeepSpeed's."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":  # DeepSpeed's accelerator is chosen once per process
        pytest.skip("the recording streams stand in for the CPU accelerator's; this process runs DeepSpeed on "
                    f"{accelerator.device_name()} (the CUDA case of the equality test above runs the real streams)")
    results = {}
    for checks in ("auto", "multi_tensor"):
        engine, model, (ids, mask, labels, pv) = fused_engine(3, checks)
        try:
            opt = engine.optimizer
            ours = opt.independent_gradient_partition_epilogue.__func__ is zero_step._stage3_epilogue_without_host_wait
            assert ours is (checks == "auto")
            loss = engine(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=labels, return_logits=False).loss
            calls = []
            reduce_buckets = opt._DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads
            with monkeypatch.context() as m:
                m.setattr(accelerator, "resolves_data_dependency", lambda: False)
                m.setattr(accelerator, "current_stream",
                          lambda device_index=None: RecordingStream("the default stream", calls))
                m.setattr(opt, "reduce_and_partition_stream", RecordingStream("the reduction stream", calls))
                m.setattr(opt, "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads",
                          lambda *a, **k: calls.append("a bucket reduced") or reduce_buckets(*a, **k))
                engine.backward(loss)
            results[checks] = calls, [g.clone() for group in opt.averaged_gradients.values() for g in group]
        finally:
            destroy_engine(engine)
    (calls, grads), (ds_calls, ds_grads) = results["auto"], results["multi_tensor"]
    assert "the host waits for the reduction stream" in ds_calls
    assert "the host waits for the reduction stream" not in calls
    ends = [c for c in calls if c == "a bucket reduced" or "reduction stream" in c]
    assert ends[-2:] == ["a bucket reduced", "the default stream waits for the reduction stream"], ends[-4:]
    assert len(grads) == len(ds_grads) and sum(float(g.abs().sum()) for g in grads) > 0
    for ours, theirs in zip(grads, ds_grads):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


@needs_checked_release
@pytest.mark.parametrize("flat_first", [False, True])
def test_flat_leaf_reduction_runs_before_the_device_steps_epilogue_in_either_order(flat_first):
    """The flat leaf reduction reduces what it collected and then calls the epilogue it found; installed before or
    after the device step, that epilogue is the one without a host wait, and the public method the reduction's."""
    from engine.training.zero3_gathers import _reduce_then_epilogue, use_flat_leaf_reduction

    engine, model, _ = fused_engine(3, "multi_tensor")
    try:
        opt = engine.optimizer
        installs = [lambda: use_flat_leaf_reduction(opt), lambda: zero_step.use_device_step(opt, engine)]
        for install in installs if flat_first else installs[::-1]:
            assert install() is None
        assert opt.independent_gradient_partition_epilogue.__func__ is _reduce_then_epilogue
        assert opt._epilogue_after_flat_reduction.__func__ is zero_step._stage3_epilogue_without_host_wait
    finally:
        destroy_engine(engine)


@needs_checked_release
@pytest.mark.parametrize("precision,sub_group_size", [("fp32", None), ("bf16", 2000)])
def test_stage3_fp32_gradient_and_norm_read_one_slice_of_the_flat_buffer(precision, sub_group_size, monkeypatch):
    """ZeRO-3's device step takes each sub-group's fp32 gradient as one slice of DeepSpeed's flat gradient buffer,
    equal to DeepSpeed's concatenation of the partition views and a copy of it (not the buffer itself, even in
    fp32); a sub-group whose gradients are not those views (a frozen parameter's zeros, say) goes to DeepSpeed's.
    The gradient norm reads the same slice and gives DeepSpeed's. On DeepSpeed's accelerator of this process (it
    is chosen once per process: CUDA on a GPU machine)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    device = "cuda" if get_accelerator().device_name() == "cuda" else "cpu"
    engine, model, (ids, mask, labels, pv) = fused_engine(3, "auto", device, precision, sub_group_size)
    try:
        opt = engine.optimizer
        engine.backward(engine(ids, mask, pv, labels=labels, return_logits=False).loss)
        groups = range(len(opt.fp16_groups))
        assert len(groups) >= (3 if sub_group_size else 1)
        expected = {i: opt.flatten(opt.averaged_gradients[i]).to(opt.fp32_partitioned_groups_flat[i].dtype)
                    for i in groups}
        assert all(float(e.abs().sum()) > 0 for e in expected.values())
        zero_step.restore_per_gradient_loops()  # the process-wide switch a benchmark alternates
        try:
            assert zero_step._flat_gradients(opt, 0, opt.averaged_gradients[0]) is None
        finally:
            zero_step.use_flat_gradient_slices()
        assert zero_step.flat_gradient_slices_active()
        calls = []
        monkeypatch.setattr(opt, "_prepare_fp32_grad_for_sub_group", lambda i: calls.append(i))
        last = groups[-1]
        opt.averaged_gradients[last] = [g.clone() for g in opt.averaged_gradients[last]]  # not the buffer's views
        for i in groups:  # the gradient norm takes the same slice, and gives DeepSpeed's per-gradient norm
            assert (zero_step._flat_gradients(opt, i, opt.averaged_gradients[i]) is None) is (i == last)
            ours = opt.get_grad_norm_direct(opt.averaged_gradients[i], opt.fp16_groups[i])
            theirs = Stage3.get_grad_norm_direct(opt, opt.averaged_gradients[i], opt.fp16_groups[i])
            assert float(ours) > 0
            torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=0)
        for i in groups:
            zero_step._prepare_fp32_grad(opt, i)
        assert calls == [last]
        for i in groups[:-1]:
            grad = opt.fp32_partitioned_groups_flat[i].grad
            torch.testing.assert_close(grad, expected[i], atol=0, rtol=0)
            assert grad.untyped_storage().data_ptr() != opt.grad_partitions_flat_buffer.untyped_storage().data_ptr()
            assert opt.averaged_gradients[i] is None
    finally:
        destroy_engine(engine)


@needs_checked_release
def test_stage3_flat_gradient_span_follows_a_replaced_buffer():
    """DeepSpeed's `offload_states` / `reload_states` replace the flat gradient buffer and its partition views: the
    slice is found again in the new buffer, and the span found before does not keep the old buffer alive."""
    import gc

    engine, model, (ids, mask, labels, pv) = fused_engine(3, "auto")
    try:
        opt = engine.optimizer
        engine.backward(engine(ids, mask, pv, labels=labels, return_logits=False).loss)
        assert zero_step._flat_gradients(opt, 0, opt.averaged_gradients[0]) is not None
        partitions = getattr(opt, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")
        old = opt.grad_partitions_flat_buffer
        new = old.clone().add_(1.0)  # other values, so that a slice of the old buffer would not pass
        for param_id, view in list(partitions.items()):
            partitions[param_id] = new.narrow(0, (view.data_ptr() - old.data_ptr()) // old.element_size(), view.numel())
        opt.grad_partitions_flat_buffer = new
        for i, group in enumerate(opt.fp16_groups):
            opt.averaged_gradients[i] = [partitions[p.ds_id] for p in group]
        gone = weakref.ref(old)
        del old, view
        gc.collect()
        assert gone() is None
        flat = zero_step._flat_gradients(opt, 0, opt.averaged_gradients[0])
        assert flat is not None and flat.untyped_storage().data_ptr() == new.untyped_storage().data_ptr()
        assert torch.equal(flat, torch.cat([g.reshape(-1) for g in opt.averaged_gradients[0]]))
    finally:
        destroy_engine(engine)
