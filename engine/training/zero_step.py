"""Multi-tensor gradient checks for DeepSpeed's ZeRO-1/2 optimizer step.

Before it steps, DeepSpeed's ZeRO-1/2 optimizer (`DeepSpeedZeroOptimizer`, deepspeed 0.19) walks the gradients
one tensor at a time twice: an overflow check (amax, amin and five more small kernels per gradient) and the
gradient norm for clipping (an fp64 copy and a norm per gradient). At the InternVL3-1B geometry that is 733
gradients and ~11,000 kernel launches in the optimizer phase, which makes it host-bound (benchmarks/RESULTS.md,
"the optimizer phase under torch.profiler"). Both questions have multi-tensor answers: one `torch._foreach_norm`
over every gradient gives each gradient's L2 norm (accumulated in fp64, as DeepSpeed does), a gradient holds a NaN
or an infinity exactly when its fp64 norm is not finite (squares of finite bf16/fp32 values cannot overflow fp64),
and the global norm is the root of the summed squares.

`use_multi_tensor_grad_checks(optimizer)` replaces the two methods on that one optimizer instance when its setup is
the plain one they were written for (no model parallelism, no MoE, no CPU offload, no pipeline-replicated
parameters); otherwise it changes nothing and says why. Results are DeepSpeed's to fp64 rounding (tests compare
them).

The step without host waits (`use_device_step`). Even with those checks DeepSpeed's step reads three answers on the
host before it can go on: whether a gradient overflowed (`.item()`) and, twice, whether the norm is invalid. Each
read waits for every kernel before it, so the host cannot queue the update while the device computes the norms.
Torch's fused Adam/AdamW kernel takes both answers as device tensors instead: it divides the gradients by
`grad_scale` and skips the whole update (weights, moments and step count) where `found_inf` is 1, which is how
`torch.amp.GradScaler` drives it. `_device_step` is DeepSpeed's step for the plain setup with the clip factor
(DeepSpeed's formula) passed as `grad_scale` and the invalid norm as `found_inf`: the same update, no host read and
one pass fewer over the fp32 gradients (DeepSpeed's separate clip multiply). It takes the norm after flattening,
over the few flat fp32 partitions instead of every gradient tensor (the same values); so every group's fp32
gradient exists at once where DeepSpeed holds one at a time (here: the small group of biases and norms more). What the host no longer learns at once
is whether the step was skipped: `self.overflow` stays False (so `engine.was_step_applied()` is always True), the
device counts skipped steps and copies the count to host memory without waiting; at the next step, once that copy
is done, the count goes into DeepSpeed's `skipped_steps` and the learning-rate schedule is taken back by as many
steps before the update (DeepSpeed does not advance it on a skipped step), so the rates are DeepSpeed's.
`settle_skipped_steps(engine)` reads the device's count directly (the trainer calls it at log steps and at the end
of an epoch). Unlike DeepSpeed's step with `compute_grad_norm` off in fp32, a non-finite step is always skipped.

ZeRO-3's optimizer (`DeepSpeedZeroOptimizer_Stage3`) takes its gradient norm the same per-tensor way;
`use_stage3_multi_tensor_norm` replaces that one method. Its step reads the norm on the host (is it finite?) before
it updates anything: the host waits there for the norm kernels and their all-reduce (the backward's reductions it
has already waited for at the end of the backward), and the step's per-parameter Python after that point (dropping
the gradients, re-pointing the partitions, the persistent parameters' gather) runs while the device idles.
`use_device_step` gives it `_stage3_device_step`: the same sub-group loop with the norm, the clip factor and the skip
left on the device as above, so the host queues the update without waiting. It also gives ZeRO-3 the end of the
backward without a host wait (`_stage3_epilogue_without_host_wait`): DeepSpeed synchronises the host with its
reduction stream there, so the step's host work began only once the device had finished; now the default stream
waits for the reduction on the device, and the step's host work overlaps the backward's tail. Its step takes each
sub-group's fp32 gradient as one slice of DeepSpeed's flat gradient buffer (`_prepare_fp32_grad`) where DeepSpeed
concatenates the partition views and records each on the stream, one Python iteration per parameter.
"""

from __future__ import annotations

import operator
import types
import weakref

import torch

from engine.utils.logging import get_logger

log = get_logger("zero_step")

NORM_DTYPE = torch.float64  # DeepSpeed accumulates gradient norms in fp64 (deepspeed.runtime.zero.utils)
# the DeepSpeed releases whose two methods these were compared with (tests/test_zero_step.py); another release keeps
# its own loops until it is checked the same way
CHECKED_DEEPSPEED = ((0, 19),)


def deepspeed_release_checked() -> bool:
    """Whether the installed DeepSpeed is a release the replacement was compared with (`CHECKED_DEEPSPEED`)."""
    import deepspeed

    release = tuple(int(part) for part in deepspeed.__version__.split(".")[:2] if part.isdigit())
    return release in CHECKED_DEEPSPEED


def unchecked_release(what_was: str) -> str | None:
    """Why a replacement of DeepSpeed's code stays off on this DeepSpeed release (``what_was``: "the replacement
    was", "the parameter lists were"), or None on a release it was checked against (`deepspeed_release_checked`)."""
    if deepspeed_release_checked():
        return None
    import deepspeed

    return f"deepspeed {deepspeed.__version__}: {what_was} checked against 0.19 only"


def _not_the_checked_class(optimizer, module: str, name: str, label: str, members: tuple[str, ...]) -> str | None:
    """Why `optimizer` is not DeepSpeed's `module.name` (`label`) of a checked release with `members`, or None."""
    try:
        import importlib

        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # pragma: no cover - deepspeed is a dependency
        return f"deepspeed's {module}.{name} is not importable"
    unchecked = unchecked_release("the replacement was")
    if unchecked is not None:
        return unchecked
    if not isinstance(optimizer, cls):
        return f"{type(optimizer).__name__} is not DeepSpeed's {label} optimizer"
    for member in members:
        if not hasattr(optimizer, member):
            return f"this deepspeed's {label} optimizer has no {member!r}"
    return None


def not_the_checked_stage3(optimizer, members: tuple[str, ...]) -> str | None:
    """Why `optimizer` is not DeepSpeed's ZeRO-3 optimizer of a checked release with `members`, or None."""
    return _not_the_checked_class(optimizer, "deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "ZeRO-3",
                                  members)


def replace_method(owner, name: str, function, kept_as: str | None = None) -> None:
    """Bind `function` as `owner.<name>` (a DeepSpeed optimizer or coordinator), keeping DeepSpeed's own as
    `owner.<kept_as>` (default `_deepspeed_<name>`) for what the replacement hands back to it (kept once: installing
    again does not take the replacement for DeepSpeed's)."""
    original = kept_as or f"_deepspeed_{name.lstrip('_')}"
    if not hasattr(owner, original):
        setattr(owner, original, getattr(owner, name))
    setattr(owner, name, types.MethodType(function, owner))


def multi_tensor_unsupported(optimizer) -> str | None:
    """Why the multi-tensor checks cannot stand in for `optimizer`'s own, or None when they can."""
    why = _not_the_checked_class(
        optimizer, "deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "ZeRO-1/2",
        ("get_grad_norm_direct", "has_overflow_partitioned_grads_serial", "averaged_gradients", "bit16_groups",
         "dp_process_group", "_model_parallel_all_reduce"),
    )
    if why is not None:
        return why
    if getattr(optimizer, "cpu_offload", False):
        return "CPU offload checks gradients on the host"
    if getattr(optimizer, "mpu", None) is not None:
        return "model parallelism counts each parameter's norm on one rank only"
    if getattr(optimizer, "has_moe_layers", False):
        return "MoE layers average expert norms separately"
    if any(getattr(p, "ds_pipe_replicated", False) for group in optimizer.bit16_groups for p in group):
        return "pipeline-replicated parameters are counted once"
    return None


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's L2 norm in fp64, as one 1-d tensor (multi-tensor kernels, a few launches in all)."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=NORM_DTYPE))


def _summed_squares(self, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The squared L2 norm of ``tensors`` summed over this rank's (fp64 per tensor, as DeepSpeed accumulates) and
    then over every rank, as a one-element fp32 tensor on the device (DeepSpeed's reductions)."""
    from deepspeed import comm as dist

    if tensors:
        total = _norms(tensors).pow(2).sum().float()
    else:
        total = torch.tensor(0.0, dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    return total


def _grad_norm(self, gradients, params, norm_type=2):
    """`DeepSpeedZeroOptimizer.get_grad_norm_direct` for the L2 norm: the same gradients (padding skipped, one per
    parameter), the same reductions over ranks, the same -1 for a non-finite norm."""
    if float(norm_type) != 2.0:
        return self._deepspeed_get_grad_norm_direct(gradients, params, norm_type)
    grads = [g.data for g, _ in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params)]
    total = _summed_squares(self, grads).pow(0.5)
    return total.masked_fill_(~torch.isfinite(total), -1.0)  # DeepSpeed's -1 for an invalid norm, no host tensor


def _has_overflow(self):
    """`DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial`: whether any gradient holds a NaN or an
    infinity, as a one-element bool tensor on the device (no host synchronisation)."""
    grads = [g.data for i in range(len(self.bit16_groups)) for g in self.averaged_gradients[i] if g is not None]
    if not grads:
        return torch.zeros([1], dtype=torch.bool, device=self.device)
    return (~torch.isfinite(_norms(grads))).any().reshape(1)


def multi_tensor_active(optimizer) -> bool:
    """Whether `optimizer` runs the multi-tensor checks (`use_multi_tensor_grad_checks` or, under ZeRO-3,
    `use_stage3_multi_tensor_norm` took)."""
    return getattr(getattr(optimizer, "get_grad_norm_direct", None), "__func__", None) in (_grad_norm, _stage3_grad_norm)


def use_multi_tensor_grad_checks(optimizer) -> str | None:
    """Give `optimizer` (DeepSpeed's ZeRO-1/2 optimizer, i.e. `engine.optimizer`) the multi-tensor gradient norm
    and overflow check. Returns None when done, else the reason it was left as it is."""
    why = multi_tensor_unsupported(optimizer)
    if why is not None:
        return why
    replace_method(optimizer, "get_grad_norm_direct", _grad_norm)
    replace_method(optimizer, "has_overflow_partitioned_grads_serial", _has_overflow)
    return None


def stage3_norm_unsupported(optimizer) -> str | None:
    """Why the multi-tensor gradient norm cannot stand in for that of `optimizer` as DeepSpeed's ZeRO-3 optimizer,
    or None when it can. (Its overflow check runs for fp16 only and stays DeepSpeed's.)"""
    why = not_the_checked_stage3(optimizer, ("get_grad_norm_direct", "_get_param_partition_group",
                                             "_assert_same_partition_group", "_autoep_expert_parallel_group",
                                             "averaged_gradients", "fp16_groups"))
    if why is not None:
        return why
    if getattr(optimizer, "offload_optimizer", False):
        return "CPU offload takes the norm on the host"
    if getattr(optimizer, "model_parallel_group", None) is not None:
        return "model parallelism counts a parameter's norm on some ranks only"
    return None


def _stage3_grad_norm(self, gradients, params, norm_type=2):
    """`DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct` for the L2 norm without model parallelism: this rank's
    gradient partitions, each norm in fp64, squared and summed, then summed over the partition group; -1 when not
    finite. DeepSpeed takes a fp64 copy and a norm per gradient (733 of each at the 1B geometry). Where the
    gradients are DeepSpeed's partition views, back to back in its flat buffer, the norm is that slice's."""
    if float(norm_type) != 2.0 or self._autoep_expert_parallel_group(params) is not None:
        return self._deepspeed_get_grad_norm_direct(gradients, params, norm_type)
    from deepspeed import comm as dist

    self._assert_same_partition_group(params)
    group = self._get_param_partition_group(params[0])
    sub_group_id = next((i for i, g in enumerate(self.fp16_groups) if g is params), None)
    flat = None if sub_group_id is None else _flat_gradients(self, sub_group_id, gradients)
    # the partition views tile their slice of the flat buffer: the slice's norm is theirs (to fp64 rounding), in
    # one tensor instead of a list of ~1,000
    grads = [flat] if flat is not None else [g.data for g in gradients]
    if grads:
        total = _norms(grads).pow(2).sum()
    else:
        total = torch.zeros((), dtype=NORM_DTYPE, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    total = total.pow(0.5)
    return total.masked_fill_(~torch.isfinite(total), -1.0)


def use_stage3_multi_tensor_norm(optimizer) -> str | None:
    """Give `optimizer` (DeepSpeed's ZeRO-3 optimizer) the multi-tensor gradient norm. Returns None when done, else
    the reason it was left as it is."""
    why = stage3_norm_unsupported(optimizer)
    if why is not None:
        return why
    replace_method(optimizer, "get_grad_norm_direct", _stage3_grad_norm)
    return None


def _host_driven_step(optimizer) -> str | None:
    """Why the step of `optimizer` (either ZeRO optimizer) needs the host's answers, or None: the inner optimizer
    must be torch's fused Adam/AdamW, and nothing may update on the host from the overflow."""
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or not all(g.get("fused") for g in inner.param_groups):
        return (f"{type(inner).__name__} is not torch's fused Adam/AdamW (the kernel that skips and rescales an update "
                "on the device)")
    if getattr(optimizer, "torch_autocast_gradscaler", None) is not None:
        return "torch autocast's GradScaler drives the step"
    if getattr(optimizer, "zenflow", False):
        return "ZenFlow steps on the CPU"
    if getattr(optimizer, "dynamic_loss_scale", False):
        return "a dynamic loss scale is updated on the host from the overflow"
    if (getattr(optimizer, "groups_lacking_loss_scale", None) or getattr(optimizer, "use_muon", False)
            or any(g.get("use_muon") for g in inner.param_groups)):
        return "Muon updates are staged and committed on the host"
    return None


def device_step_unsupported(optimizer) -> str | None:
    """Why `_device_step` (ZeRO-1/2) or `_stage3_device_step` (ZeRO-3) cannot stand in for `optimizer.step`, or None
    when it can."""
    if _is_stage3(optimizer):
        return _stage3_device_step_unsupported(optimizer)
    why = multi_tensor_unsupported(optimizer) or _host_driven_step(optimizer)
    if why is not None:
        return why
    if getattr(optimizer, "dtype", None) == torch.bfloat16 and not getattr(optimizer, "check_grad_overflow", True):
        return "bf16 without the overflow check applies steps with non-finite gradients"
    for name in ("single_partition_of_fp32_groups", "parallel_partitioned_bit16_groups",
                 "real_dp_process_group", "_optimizer_step", "_update_model_bit16_weights"):
        if not hasattr(optimizer, name):
            return f"this deepspeed's ZeRO optimizer has no {name!r}"
    return None


@torch.no_grad()
def _device_step(self, closure=None):
    """`DeepSpeedZeroOptimizer.step` (deepspeed 0.19) without offload, Muon, ZenFlow or a dynamic loss scale, with
    the overflow and the clip factor left on the device for the fused Adam kernel (the module docstring)."""
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import all_gather_dp_groups
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    self.micro_step_id = INITIAL_MICRO_STEP_ID
    self.overflow = False  # not known on the host: a non-finite step is skipped by the kernel (found_inf)
    _absorb_copied_skips(self)  # an earlier step's skip, if its count has reached the host: this step's rate is right
    # each group's gradients flattened into its fp32 partition first (DeepSpeed's own code for it), then the norm
    # over those few flat tensors: the same values (bf16 -> fp32 is exact) as DeepSpeed's norm over the gradients
    # one by one, without the host assembling a list of every gradient for it
    grads, partition_ids = [], []
    for i in range(len(self.bit16_groups)):
        partition_id = dist.get_rank(group=self.real_dp_process_group[i])
        partition_ids.append(partition_id)
        self.free_grad_in_param_list(self.params_not_in_partition[i])  # ZeRO-2: gradients other ranks update
        flat = self._get_preflattened_grad_partition(i)
        if flat is None:
            if partition_id == dist.get_world_size(group=self.real_dp_process_group[i]) - 1:
                flat = self.flatten_dense_tensors_aligned(self.averaged_gradients[i], int(self.partition_size[i]))
            else:
                flat = self.flatten(self.averaged_gradients[i])
        grad = flat.to(self.single_partition_of_fp32_groups[i].dtype)
        del flat
        if grad.numel() != self.partition_size[i]:
            raise RuntimeError(f"gradient partition of group {i} has {grad.numel()} elements, its partition "
                               f"{self.partition_size[i]}")
        grads.append(grad)
        self.free_grad_in_param_list(self.params_in_partition[i])
        self._release_preflattened_grad_buffers(i)
        self.averaged_gradients[i] = None
        self.all_grad_tensors[i] = None
    total = _summed_squares(self, grads).sqrt()  # not finite exactly when some rank's gradient holds a NaN or an inf
    finite, found_inf, grad_scale = _skip_flag_and_clip_scale(self, total)
    self._global_grad_norm = (torch.where(finite, total / float(self.loss_scale), float("inf"))
                              if self.compute_grad_norm else None)

    inner = self.optimizer
    for i, partition_id in enumerate(partition_ids):
        fp32_partition = self.single_partition_of_fp32_groups[i]
        fp32_partition.grad = grads[i]
        inner.grad_scale, inner.found_inf = grad_scale, found_inf  # read by torch's fused Adam (GradScaler's hook)
        try:
            self._optimizer_step(i)
        finally:
            del inner.grad_scale, inner.found_inf
        fp32_partition.grad = None
        grads[i] = None
        self.parallel_partitioned_bit16_groups[i][partition_id].data.copy_(fp32_partition.data)

    all_gather_dp_groups(groups_flat=self.bit16_groups_flat, partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                         dp_process_group=self.real_dp_process_group, start_alignment_factor=self.nccl_start_alignment_factor,
                         allgather_bucket_size=self.allgather_bucket_size)
    for i in range(len(self.bit16_groups)):
        self._update_model_bit16_weights(i)


def _is_stage3(optimizer) -> bool:
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return False
    return isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3)


def _stage3_device_step_unsupported(optimizer) -> str | None:
    why = stage3_norm_unsupported(optimizer) or _host_driven_step(optimizer)
    if why is not None:
        return why
    if getattr(optimizer, "swap_optimizer", False) or getattr(optimizer, "offload_param", False):
        return "NVMe/CPU offload swaps partitions in and out on the host"
    if any(flat is None for flat in getattr(optimizer, "fp16_partitioned_groups_flat", [None])):
        return "a parameter partition is swapped out"
    for name in ("_pre_step", "_partition_all_parameters", "_get_norm_groups", "_prepare_fp32_grad_for_sub_group",
                 "_optimizer_step", "_reassign_or_swap_out_partitioned_parameters", "_release_sub_group", "_post_step",
                 "fp32_partitioned_groups_flat", "loss_scale", "clip_grad", "n_caching_allocator_flushes"):
        if not hasattr(optimizer, name):
            return f"this deepspeed's ZeRO-3 optimizer has no {name!r}"
    return None


@torch.no_grad()
def _stage3_device_step(self, closure=None):
    """`DeepSpeedZeroOptimizer_Stage3.step` (deepspeed 0.19) without offload, Muon, ZenFlow or a dynamic loss scale,
    with the overflow and the clip factor left on the device for the fused Adam kernel (the module docstring).
    DeepSpeed reads the norm on the host to decide whether to step at all; here every sub-group steps and the kernel
    skips a non-finite step. The norm is DeepSpeed's: the same per-group norms, combined the same way."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    self._pre_step()
    self._partition_all_parameters()
    self.overflow = False  # not known on the host: a non-finite step is skipped by the kernel (found_inf)
    _absorb_copied_skips(self)
    # the multi-tensor norm of each group (`_stage3_grad_norm`, -1 where not finite), combined: inf where any is not
    total = combine_grad_norm_groups(self._get_norm_groups())  # an fp16 overflow makes it non-finite too
    finite, found_inf, grad_scale = _skip_flag_and_clip_scale(self, total)
    self._global_grad_norm = torch.where(finite, total / float(self.loss_scale), float("inf"))

    self.zero_grad(set_to_none=True)  # the epilogue has copied every gradient into the partition buffers
    inner, timer_names = self.optimizer, set()
    for sub_group_id in range(len(self.fp16_groups)):
        _prepare_fp32_grad(self, sub_group_id)
        inner.grad_scale, inner.found_inf = grad_scale, found_inf  # read by torch's fused Adam (GradScaler's hook)
        try:
            self._optimizer_step(sub_group_id)
        finally:
            del inner.grad_scale, inner.found_inf
        self._reassign_or_swap_out_partitioned_parameters(sub_group_id)
        self._release_sub_group(sub_group_id, timer_names)
    self._post_step(timer_names)
    _warn_of_allocator_flushes(self)


_FLAT_GRADIENTS = {"on": True}  # process-wide, so that a benchmark can alternate it with DeepSpeed's loops


def use_flat_gradient_slices() -> None:
    """Let ZeRO-3's multi-tensor norm and device step read each sub-group's gradients as one slice of DeepSpeed's
    flat gradient buffer (the default; `_flat_gradients`). Returns None: nothing to refuse."""
    _FLAT_GRADIENTS["on"] = True


def restore_per_gradient_loops() -> None:
    """Undo `use_flat_gradient_slices`: the norm takes the gradient list, the step DeepSpeed's concatenation."""
    _FLAT_GRADIENTS["on"] = False


def flat_gradient_slices_active() -> bool:
    """Whether `use_flat_gradient_slices` is in effect in this process now."""
    return _FLAT_GRADIENTS["on"]


def _grad_span(self, sub_group_id: int):
    """The sub-group's gradient partitions as they lie in DeepSpeed's flat gradient buffer: (weak references to the
    partition views, in the group's order; offset; elements) when they lie back to back there (how DeepSpeed lays
    them out), else None. Found once per sub-group and buffer, and again when DeepSpeed replaces the buffer (its
    `offload_states` / `reload_states` move it); held weakly, so that a buffer DeepSpeed lets go of is freed."""
    buffer = getattr(self, "grad_partitions_flat_buffer", None)
    partitions = getattr(self, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", None)
    if buffer is None or partitions is None:
        return None
    spans = self.__dict__.setdefault("_grad_spans", {})
    cached = spans.get(sub_group_id)
    if cached is not None and cached[0]() is buffer:
        return cached[1]
    span = None
    views = tuple(partitions.get(p.ds_id) for p in self.fp16_groups[sub_group_id])
    if views and views[0] is not None and views[0].data_ptr() >= buffer.data_ptr():
        # every view in the buffer's storage, each starting where the one before ends
        base, size = buffer.data_ptr(), buffer.element_size()
        start = offset = (views[0].data_ptr() - base) // size
        for view in views:
            if (view is None or view.dtype != buffer.dtype or not view.is_contiguous()
                    or view.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
                    or view.data_ptr() != base + offset * size):
                break
            offset += view.numel()
        else:
            span = (tuple(weakref.ref(view) for view in views), start, offset - start)
    spans[sub_group_id] = (weakref.ref(buffer), span)
    return span


def _flat_gradients(self, sub_group_id: int, gradients) -> torch.Tensor | None:
    """`gradients` (sub-group `sub_group_id`'s) as one slice of DeepSpeed's flat gradient buffer when they are its
    partition views back to back there (`_grad_span`): their concatenation, without a copy. Else None."""
    span = _grad_span(self, sub_group_id) if _FLAT_GRADIENTS["on"] else None
    if (span is None or gradients is None or len(gradients) != len(span[0])
            or not all(map(operator.is_, gradients, map(weakref.ref.__call__, span[0])))):
        return None
    return self.grad_partitions_flat_buffer.narrow(0, span[1], span[2])


def _prepare_fp32_grad(self, sub_group_id: int) -> None:
    """DeepSpeed's `_prepare_fp32_grad_for_sub_group` (deepspeed 0.19, no offload) without its two loops over every
    gradient when the sub-group's gradients are DeepSpeed's partition views, back to back in its flat buffer (the
    epilogue puts them there): their concatenation is then one slice of that buffer, converted in one copy, and
    DeepSpeed's `record_stream` on each view changes nothing (the buffer is never freed). Under ZeRO-3 at the
    InternVL3-1B geometry those loops were ~1,250 Python iterations per step on the host's critical path. Anything
    else (a frozen parameter's zeros, another layout) goes to DeepSpeed's."""
    flat = _flat_gradients(self, sub_group_id, self.averaged_gradients[sub_group_id])
    if flat is None:
        return self._prepare_fp32_grad_for_sub_group(sub_group_id)
    fp32_flat = self.fp32_partitioned_groups_flat[sub_group_id]
    if flat.numel() != fp32_flat.numel():
        raise RuntimeError(f"ZeRO-3 sub-group {sub_group_id}: its gradients hold {flat.numel()} elements, its fp32 "
                           f"partition {fp32_flat.numel()}")
    # a copy, as DeepSpeed's flatten makes one, even where the buffer already has the fp32 partition's dtype
    fp32_flat.grad = flat.to(fp32_flat.dtype, copy=True)
    self.averaged_gradients[sub_group_id] = None


def _stage3_epilogue_unsupported(optimizer) -> str | None:
    why = not_the_checked_stage3(
        optimizer,
        ("ipg_buckets", "reduce_and_partition_stream", "params_already_reduced", "averaged_gradients",
         "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads",
         "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", "_epilogue_ran_this_backward"),
    )
    if why is not None:
        return why
    if getattr(optimizer, "offload_optimizer", False):
        return "offloaded gradients are read on the host"
    return None


def _stage3_epilogue_without_host_wait(self):
    """`DeepSpeedZeroOptimizer_Stage3.independent_gradient_partition_epilogue` (deepspeed 0.19) with the device, not
    the host, waiting for the reduction stream: the last buckets reduced, and the default stream ordered after them
    before anything reads the gradient partitions. DeepSpeed synchronises the host with that stream here, so the
    step's host work (tens of milliseconds of per-parameter Python under ZeRO-3) started only once the device had
    finished the backward, and the device idled through it; now it runs while the device finishes. Tensors the
    reduction used were made on its stream or recorded there, so the allocator does not hand them out before it is
    done, and the next backward's reductions wait for the default stream before they start."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.torch_autocast import sort_dtypes

    for comm_dtype in sort_dtypes(self.ipg_buckets.keys()):
        self._DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads(comm_dtype)
    accelerator = get_accelerator()
    if not accelerator.resolves_data_dependency():
        accelerator.current_stream().wait_stream(self.reduce_and_partition_stream)
    for param_id in self.params_already_reduced.keys():
        self.params_already_reduced[param_id] = False
    partitions = self._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
    for i, sub_group in enumerate(self.fp16_groups):
        self.averaged_gradients[i] = [
            partitions[param.ds_id] if param.requires_grad else torch.zeros_like(param.ds_tensor) for param in sub_group
        ]
    self._epilogue_ran_this_backward = True  # DeepSpeed's count of micro-steps advances at the next forward


def _warn_of_allocator_flushes(self) -> None:
    """DeepSpeed's warning at the end of its ZeRO-3 step when the caching allocator had to flush (memory pressure)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger

    retries = get_accelerator().memory_stats().get("num_alloc_retries") or 0
    if retries > self.n_caching_allocator_flushes:
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            logger.warning("%d pytorch allocator cache flushes since the last step: memory pressure, which slows the "
                           "steps down (a smaller batch or smaller buckets relieve it)",
                           retries - self.n_caching_allocator_flushes)
        self.n_caching_allocator_flushes = retries


def _skip_flag_and_clip_scale(self, total: torch.Tensor):
    """From the global gradient norm ``total``: whether it is finite, the fused Adam kernel's skip flag (counted on
    the device and copied to the host without waiting) and the clip factor it divides by."""
    finite = torch.isfinite(total)
    found_inf = (~finite).float().reshape(())
    if self._device_skipped_steps is None:
        self._device_skipped_steps = torch.zeros((), dtype=torch.float32, device=found_inf.device)
    self._device_skipped_steps.add_(found_inf)
    _stage_skip_count(self)
    return finite, found_inf, _clip_scale(self, total, finite)


def _clip_scale(self, total: torch.Tensor, finite: torch.Tensor) -> torch.Tensor | None:
    """What the fused Adam kernel divides the gradients by: DeepSpeed's `unscale_and_clip_grads` factor,
    max(1, (norm/scale + 1e-6) / clip) * scale, as a device tensor (None where it is 1)."""
    scale = float(self.loss_scale)
    if self.clip_grad > 0.0:
        clip = ((torch.where(finite, total, 0.0) / scale) + 1e-6) / self.clip_grad
        return (torch.clamp(clip, min=1.0) * scale).float().reshape(())
    if scale != 1.0:
        return torch.full((), scale, dtype=torch.float32, device=total.device)
    return None


def device_step_active(optimizer) -> bool:
    """Whether `optimizer` steps with `_device_step` or `_stage3_device_step` (`use_device_step` took)."""
    return getattr(getattr(optimizer, "step", None), "__func__", None) in (_device_step, _stage3_device_step)


def _stage_skip_count(optimizer) -> None:
    """Copy the device's running count of skipped steps to host memory without waiting (pinned memory and an event
    on CUDA); `_absorb_copied_skips` reads it once the copy is done."""
    counter = optimizer._device_skipped_steps
    if optimizer._skips_host is None:
        optimizer._skips_host = torch.zeros((), dtype=counter.dtype, pin_memory=counter.is_cuda)
    optimizer._skips_host.copy_(counter, non_blocking=counter.is_cuda)
    if counter.is_cuda:
        if optimizer._skips_event is None:
            optimizer._skips_event = torch.cuda.Event()
        optimizer._skips_event.record()  # re-recorded each step: query() answers for the latest copy


def _absorb_copied_skips(optimizer) -> None:
    """Apply the skips whose count an earlier step copied to the host, if that copy is done (never waits for it).
    At the next step's start it is done in practice (a forward and a backward lie between); if not, a later step or
    `settle_skipped_steps` applies them."""
    if optimizer._skips_host is None or (optimizer._skips_event is not None and not optimizer._skips_event.query()):
        return
    _apply_skips(optimizer, int(round(float(optimizer._skips_host.numpy()))))  # host memory: no device read


def _apply_skips(optimizer, total: int) -> int:
    """Bring DeepSpeed's count and the schedule to ``total`` skipped steps since the device step began. Returns how
    many were new."""
    new = total - optimizer._skips_settled
    if new <= 0:
        return 0
    optimizer._skips_settled = total
    engine = optimizer._device_step_engine() if optimizer._device_step_engine is not None else None
    if engine is None:
        return new
    engine.skipped_steps += new
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is None:
        return new
    # DeepSpeed does not advance the schedule on a skipped step: step it back, then once more to set the rates
    if hasattr(scheduler, "last_epoch"):  # torch's schedulers
        scheduler.last_epoch -= new + 1
        scheduler.step()
    elif hasattr(scheduler, "last_batch_iteration"):  # DeepSpeed's
        scheduler.last_batch_iteration -= new + 1
        scheduler.step()
    else:
        log.warning("%d optimizer step(s) skipped for non-finite gradients; the learning-rate schedule %s has no "
                    "step count to take back", new, type(scheduler).__name__)
    return new


def use_device_step(optimizer, engine=None) -> str | None:
    """Give `optimizer` (DeepSpeed's ZeRO optimizer, ``engine.optimizer``) the multi-tensor checks and the step
    without host waits. ``engine``: the DeepSpeed engine whose skipped-step count and schedule the skips correct
    (held weakly). Returns None when done, else the reason it was left as it is."""
    why = device_step_unsupported(optimizer)
    if why is not None:
        return why
    stage3 = _is_stage3(optimizer)
    if stage3:
        use_stage3_multi_tensor_norm(optimizer)
        why_epilogue = _stage3_epilogue_unsupported(optimizer)
        if why_epilogue is not None:
            log.info("ZeRO-3 gradient epilogue: DeepSpeed's, the host waiting for the reduction (%s)", why_epilogue)
        elif hasattr(optimizer, "_epilogue_after_flat_reduction"):  # the flat leaf reduction, installed first,
            # reduces and then calls the epilogue it replaced: that one becomes this
            optimizer._epilogue_after_flat_reduction = types.MethodType(_stage3_epilogue_without_host_wait, optimizer)
        else:
            replace_method(optimizer, "independent_gradient_partition_epilogue", _stage3_epilogue_without_host_wait)
    else:
        use_multi_tensor_grad_checks(optimizer)
    optimizer._device_skipped_steps = None  # running count on the device
    optimizer._skips_host, optimizer._skips_event = None, None  # its copy in host memory, and the copy's event
    optimizer._skips_settled = 0  # how many of them the engine's count and the schedule already reflect
    optimizer._device_step_engine = weakref.ref(engine) if engine is not None else None
    replace_method(optimizer, "step", _stage3_device_step if stage3 else _device_step)
    return None


def settle_skipped_steps(engine) -> int:
    """Bring every step `_device_step` skipped to the host now (one read of the device, the only wait it adds): add
    them to DeepSpeed's `engine.skipped_steps` and take the learning-rate schedule back by as many steps, as if
    DeepSpeed had known at each step. The step itself does so at the next step once the count has been copied;
    this catches the rest (the trainer calls it at log steps, where it reads the losses anyway, and at the end of an
    epoch, before a checkpoint). Returns how many were new; 0 (and no read) when the engine does not step on the
    device."""
    optimizer = getattr(engine, "optimizer", None)
    counter = getattr(optimizer, "_device_skipped_steps", None) if device_step_active(optimizer) else None
    if counter is None:
        return 0
    if optimizer._device_step_engine is None or optimizer._device_step_engine() is None:
        optimizer._device_step_engine = weakref.ref(engine)
    return _apply_skips(optimizer, int(round(float(counter))))
