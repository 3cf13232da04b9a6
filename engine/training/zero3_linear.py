"""ZeRO-3's memory-efficient linear layer without its per-call argument binding.

Under ZeRO-3 DeepSpeed (0.19) replaces `torch.nn.functional.linear` process-wide with `zero3_linear_wrap`
(`zero_optimization.memory_efficient_linear`, on by default): an autograd function that saves the weight parameter
itself for the backward, not a view of its gathered storage, so the storage goes when ZeRO-3 releases the
parameter after the forward and the backward reads it re-gathered. torch's own linear saves the transposed weight,
a view that would keep every gathered weight alive from the forward to the backward.

That function is written in the split style (`forward` without a context, then `setup_context`), for which
`torch.autograd.Function.apply` binds the call's arguments to the forward's signature through `inspect.signature` at
every call; its forward also adds the bias as a kernel of its own after a plain product. Both cost host time per
linear call (~20% of a ZeRO-3 forward's host time on CPU ranks in benchmarks/zero3_host_cost.py), and a latent
forward makes hundreds of such calls.

`MemoryEfficientLinear` keeps DeepSpeed's contract and its backward (inherited, so the gradients are computed by
DeepSpeed's own code, autocast state and the re-gather of a released weight included) and changes the forward:
the context-style forward (no argument binding) computes torch's own linear (the bias fused into the product, as
ZeRO-1/2 compute it). `use_memory_efficient_linear()` installs it where DeepSpeed's wrap is installed;
`restore_deepspeed_linear()` undoes it. tests/test_zero3_linear.py compares it with DeepSpeed's function and
torch's linear. Not supported, unlike DeepSpeed's split-style function: `torch.func` transforms (grad, vmap, jacrev)
through it; `zero_grad_checks=deepspeed` keeps DeepSpeed's for them.
"""

from __future__ import annotations

import functools

import torch

_TORCH_LINEAR = torch._C._nn.linear  # torch's own, whatever `torch.nn.functional.linear` is replaced by
_REPLACED = {}  # DeepSpeed's wrap, kept to restore


@functools.cache
def _function():
    """The autograd function, made once (DeepSpeed's class is imported late: it picks its accelerator at import)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.linear import LinearFunctionForZeroStage3, _get_autocast_dtype, _is_autocast_enabled

    class MemoryEfficientLinear(LinearFunctionForZeroStage3):
        """DeepSpeed's `LinearFunctionForZeroStage3` with a context-style forward computing torch's linear."""

        generate_vmap_rule = False  # the split style's vmap rule; this forward takes the context itself
        setup_context = torch.autograd.Function.setup_context  # not defined: `apply` binds no arguments

        @staticmethod
        def forward(ctx, input, weight, bias=None):
            device_type = get_accelerator().device_name()
            ctx._dtype = _get_autocast_dtype(device_type)  # read by DeepSpeed's backward, as its setup_context sets
            ctx._fwd_used_autocast = _is_autocast_enabled(device_type)
            ctx.save_for_backward(input, weight, bias)  # the parameter itself: released storage is not kept
            # detached: autocast caches its casts of leaves that need a gradient until the region ends, which would
            # keep every gathered weight (and the values it had then) past its release
            out = _TORCH_LINEAR(input, weight.detach(), None if bias is None else bias.detach())
            # torch's linear can return a view (3-d input, with bias): a custom function's view output could not be
            # modified in place afterwards, where DeepSpeed's output and torch's linear can
            return out.detach() if out._is_view() else out

    return MemoryEfficientLinear


def memory_efficient_linear(input, weight, bias=None):
    """`torch.nn.functional.linear` for ZeRO-3 (the module docstring)."""
    return _function().apply(input, weight, bias)


def linear_unsupported() -> str | None:
    """Why `memory_efficient_linear` cannot stand in for DeepSpeed's wrap now, or None when it can."""
    from engine.training.zero_step import unchecked_release

    try:
        from deepspeed.runtime.zero.linear import (  # noqa: F401 (the names the function needs)
            _get_autocast_dtype,
            _is_autocast_enabled,
            zero3_linear_wrap,
        )
    except ImportError:
        return "this deepspeed has no ZeRO-3 linear wrap to stand in for"
    unchecked = unchecked_release("the replacement was")
    if unchecked is not None:
        return unchecked
    if torch.nn.functional.linear is memory_efficient_linear:
        return None
    if torch.nn.functional.linear is not zero3_linear_wrap:
        return "torch.nn.functional.linear is not DeepSpeed's ZeRO-3 wrap (memory_efficient_linear off, or replaced)"
    return None


def use_memory_efficient_linear() -> str | None:
    """Replace DeepSpeed's ZeRO-3 `torch.nn.functional.linear` (process-wide, as DeepSpeed installs it) with
    `memory_efficient_linear`. Returns None when done, else the reason it was left as it is."""
    why = linear_unsupported()
    if why is not None:
        return why
    _function()  # made here, not at a first call that torch.compile might be tracing
    if torch.nn.functional.linear is not memory_efficient_linear:
        _REPLACED["linear"] = torch.nn.functional.linear
        torch.nn.functional.linear = memory_efficient_linear
    return None


def memory_efficient_linear_active() -> bool:
    """Whether `use_memory_efficient_linear` is installed in this process now."""
    return torch.nn.functional.linear is memory_efficient_linear


def restore_deepspeed_linear() -> None:
    """Undo `use_memory_efficient_linear` (DeepSpeed's wrap again)."""
    if torch.nn.functional.linear is memory_efficient_linear and "linear" in _REPLACED:
        torch.nn.functional.linear = _REPLACED["linear"]
