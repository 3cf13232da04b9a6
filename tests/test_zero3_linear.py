"""engine/training/zero3_linear.py: the ZeRO-3 linear computes torch's linear forward and DeepSpeed's backward, keeps
DeepSpeed's memory contract (the backward reads the weight parameter as it is then, not a saved view of its storage),
binds no arguments per call, and is installed only over DeepSpeed's wrap. CPU, one process."""

from __future__ import annotations

import inspect

import pytest
import torch

from engine.training import zero3_linear
from engine.training.zero_step import deepspeed_release_checked

pytestmark = pytest.mark.skipif(not deepspeed_release_checked(),
                                reason="the replacement applies to checked DeepSpeed releases only")

# awkward shapes: a vector, a matrix, 3-d batches (strided, and contiguous: torch's linear returns a view of its
# product there), one output feature
CASES = [((7,), 5, True), ((3, 7), 5, True), ((2, 3, 7), 5, True), ((2, 3, 7), 1, False), ((4, 1, 7), 5, False),
         ((2, 5, 7), 5, "contiguous")]


def _inputs(shape, out_features, bias, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if len(shape) == 3 and bias != "contiguous":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # strided
    w = torch.nn.Parameter(torch.randn(out_features, shape[-1], generator=gen, dtype=torch.float64).to(dtype))
    b = torch.nn.Parameter(torch.randn(out_features, generator=gen, dtype=torch.float64).to(dtype)) if bias else None
    return x.requires_grad_(), w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,out_features,bias", CASES)
def test_forward_is_torchs_and_backward_deepspeeds(shape, out_features, bias, dtype):
    from deepspeed.runtime.zero.linear import LinearFunctionForZeroStage3

    grads = {}
    for name in ("ours", "deepspeed", "torch"):
        x, w, b = _inputs(shape, out_features, bias, dtype)
        if name == "ours":
            y = zero3_linear.memory_efficient_linear(x, w, b)
        elif name == "deepspeed":
            y = LinearFunctionForZeroStage3.apply(x, w, b)
        else:
            y = zero3_linear._TORCH_LINEAR(x, w, b)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        y.backward(g)
        grads[name] = (y.detach(), x.grad, w.grad, None if b is None else b.grad)
    ours, theirs, plain = grads["ours"], grads["deepspeed"], grads["torch"]
    torch.testing.assert_close(ours[0], plain[0])  # torch's own forward (on the detached weight: a strided 3-d
    # input may take another product order than with a weight that needs a gradient)
    torch.testing.assert_close(ours[0], theirs[0])  # DeepSpeed's forward adds the bias in a kernel of its own
    for a, b_ in zip(ours[1:], theirs[1:]):  # DeepSpeed's backward code on the same inputs: the same bits
        assert (a is None) == (b_ is None) and (a is None or torch.equal(a, b_))
    for a, b_ in zip(ours[1:], plain[1:]):
        if a is not None:
            torch.testing.assert_close(a, b_)


def test_the_backward_reads_the_parameter_not_a_saved_view():
    """ZeRO-3 swaps a released parameter's storage for an empty one and re-gathers it before the backward: the
    backward must see the weight as it is then. torch's own linear, which saves a view, would use the old values."""
    x, w, b = _inputs((3, 7), 5, True, torch.float32)
    y = zero3_linear.memory_efficient_linear(x, w, b)
    original = w.data
    w.data = torch.empty(0)  # released: with a saved view the old storage would stay alive here
    assert original.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
    w.data = original * 2  # re-gathered (other values, so that a stale read would show)
    g = torch.ones_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ (original * 2))


def test_the_output_can_be_modified_in_place():
    """As DeepSpeed's output and torch's linear allow (a view returned from a custom function would refuse)."""
    results = []
    for linear in (zero3_linear.memory_efficient_linear, zero3_linear._TORCH_LINEAR):
        x, w, b = _inputs((2, 5, 7), 5, "contiguous", torch.float32)
        y = linear(x, w, b)
        y.mul_(2).relu_()
        y.sum().backward()
        results.append((y.detach(), x.grad, w.grad, b.grad))
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_)


def test_under_autocast_the_current_weight_is_read_and_not_kept():
    """Autocast caches its casts of leaves that need a gradient until the region ends: a weight released and
    re-gathered with other values inside one region must be read anew (DeepSpeed's function does), and the
    backward runs under the forward's autocast state, as DeepSpeed's."""
    from deepspeed.runtime.zero.linear import LinearFunctionForZeroStage3

    outputs, grads = {}, {}
    for name, linear in (("ours", zero3_linear.memory_efficient_linear), ("deepspeed", LinearFunctionForZeroStage3.apply)):
        x, w, b = _inputs((3, 7), 5, True, torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first = linear(x, w, b)
            w.data = w.data * 2  # released and re-gathered with new values, still inside the region
            second = linear(x, w, b)
            assert second.dtype == torch.bfloat16
        second.float().sum().backward()
        outputs[name], grads[name] = (first, second), (x.grad, w.grad, b.grad)
    assert not torch.equal(outputs["ours"][0], outputs["ours"][1])  # not the cached cast of the old weight
    for a, b_ in zip(outputs["ours"] + grads["ours"], outputs["deepspeed"] + grads["deepspeed"]):
        torch.testing.assert_close(a, b_)


def test_no_argument_binding_per_call(monkeypatch):
    x, w, b = _inputs((3, 7), 5, True, torch.float32)
    zero3_linear.memory_efficient_linear(x, w, b)  # built once

    def refuse(*args, **kwargs):
        raise AssertionError("inspect.signature called on a linear call")

    monkeypatch.setattr(inspect, "signature", refuse)
    zero3_linear.memory_efficient_linear(x, w, b).sum().backward()
    assert w.grad is not None


def test_installed_only_over_deepspeeds_wrap(monkeypatch):
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear._TORCH_LINEAR)
    assert "not DeepSpeed's ZeRO-3 wrap" in zero3_linear.use_memory_efficient_linear()
    assert torch.nn.functional.linear is zero3_linear._TORCH_LINEAR
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    assert not zero3_linear.memory_efficient_linear_active()
    assert zero3_linear.use_memory_efficient_linear() is None
    assert torch.nn.functional.linear is zero3_linear.memory_efficient_linear
    assert zero3_linear.memory_efficient_linear_active()
    assert zero3_linear.use_memory_efficient_linear() is None  # twice: still ours, DeepSpeed's kept to restore
    layer = torch.nn.Linear(7, 5)
    layer(torch.randn(2, 7)).sum().backward()  # nn.Linear goes through it
    zero3_linear.restore_deepspeed_linear()
    assert torch.nn.functional.linear is zero3_linear_wrap and not zero3_linear.memory_efficient_linear_active()
