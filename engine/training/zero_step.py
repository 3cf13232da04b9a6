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
"""

from __future__ import annotations

import types

import torch

NORM_DTYPE = torch.float64  # DeepSpeed accumulates gradient norms in fp64 (deepspeed.runtime.zero.utils)
# the DeepSpeed releases whose two methods these were compared with (tests/test_zero_step.py); another release keeps
# its own loops until it is checked the same way
CHECKED_DEEPSPEED = ((0, 19),)


def deepspeed_release_checked() -> bool:
    """Whether the installed DeepSpeed is a release the replacement was compared with (`CHECKED_DEEPSPEED`)."""
    import deepspeed

    release = tuple(int(part) for part in deepspeed.__version__.split(".")[:2] if part.isdigit())
    return release in CHECKED_DEEPSPEED


def multi_tensor_unsupported(optimizer) -> str | None:
    """Why the multi-tensor checks cannot stand in for `optimizer`'s own, or None when they can."""
    try:
        import deepspeed
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return "deepspeed is not importable"
    if not deepspeed_release_checked():
        return f"deepspeed {deepspeed.__version__}: the replacement was checked against 0.19 only"
    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return f"{type(optimizer).__name__} is not DeepSpeed's ZeRO-1/2 optimizer"
    for name in ("get_grad_norm_direct", "has_overflow_partitioned_grads_serial", "averaged_gradients",
                 "bit16_groups", "dp_process_group", "_model_parallel_all_reduce"):
        if not hasattr(optimizer, name):
            return f"this deepspeed's ZeRO optimizer has no {name!r}"
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


def _grad_norm(self, gradients, params, norm_type=2):
    """`DeepSpeedZeroOptimizer.get_grad_norm_direct` for the L2 norm: the same gradients (padding skipped, one per
    parameter), the same reductions over ranks, the same -1 for a non-finite norm."""
    if float(norm_type) != 2.0:
        return self._deepspeed_grad_norm_direct(gradients, params, norm_type)
    from deepspeed import comm as dist

    grads = [g.data for g, _ in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params)]
    if grads:
        total = _norms(grads).pow(2).sum().float()
    else:
        total = torch.tensor(0.0, dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    return total.masked_fill_(~torch.isfinite(total), -1.0)  # DeepSpeed's -1 for an invalid norm, no host tensor


def _has_overflow(self):
    """`DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial`: whether any gradient holds a NaN or an
    infinity, as a one-element bool tensor on the device (no host synchronisation)."""
    grads = [g.data for i in range(len(self.bit16_groups)) for g in self.averaged_gradients[i] if g is not None]
    if not grads:
        return torch.zeros([1], dtype=torch.bool, device=self.device)
    return (~torch.isfinite(_norms(grads))).any().reshape(1)


def multi_tensor_active(optimizer) -> bool:
    """Whether `optimizer` runs the multi-tensor checks (`use_multi_tensor_grad_checks` took)."""
    return getattr(getattr(optimizer, "get_grad_norm_direct", None), "__func__", None) is _grad_norm


def use_multi_tensor_grad_checks(optimizer) -> str | None:
    """Give `optimizer` (DeepSpeed's ZeRO-1/2 optimizer, i.e. `engine.optimizer`) the multi-tensor gradient norm
    and overflow check. Returns None when done, else the reason it was left as it is."""
    why = multi_tensor_unsupported(optimizer)
    if why is not None:
        return why
    if not hasattr(optimizer, "_deepspeed_grad_norm_direct"):
        optimizer._deepspeed_grad_norm_direct = optimizer.get_grad_norm_direct  # the non-L2 norms
    optimizer.get_grad_norm_direct = types.MethodType(_grad_norm, optimizer)
    optimizer.has_overflow_partitioned_grads_serial = types.MethodType(_has_overflow, optimizer)
    return None
