"""Products sharing a weight, its gradient taken once for all of them (engine/model/shared_weight.py): every
gradient equals autograd's through plain `F.linear` uses, with one weight product in backward for all the small
uses, and the latent block takes it so for each of its layers' weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model import shared_weight
from engine.model.shared_weight import SharedWeight
from tests.helpers import CountProducts, latent_block_inputs


def chained_uses(linear, x, spread, rows_big):
    """Uses of one (n, n) weight in a chain, each fed what came before: a 2-D and a 3-D use, then (``rows_big``)
    a use of that many rows (the final chunk's kind), then a last small use."""
    h = linear(torch.tanh(linear(x)) * spread)  # (3, 5, n)
    last, loss = torch.tanh(h[0]), 0
    if rows_big:
        big = linear(torch.tanh(h).flatten(0, 1).repeat(-(-rows_big // 15), 1)[:rows_big])
        last, loss = last + big[:5], big.square().mean()
    return loss + linear(last).sum()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows_big", [0, shared_weight.STASH_ROWS + 3])
def test_shared_weight_gradients_equal_autograds(bias, rows_big):
    """Inputs' and parameters' gradients equal those of plain products (fp64), with the weight a non-leaf (as the
    block's merged weights are); the small uses' weight gradient is one product in backward."""
    g = torch.Generator().manual_seed(0)
    n = 6
    weight = torch.randn(n, n, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    x = torch.randn(5, n, generator=g, dtype=torch.float64, requires_grad=True)
    spread = torch.randn(3, 1, n, generator=g, dtype=torch.float64)
    results = []
    for shared in (False, True):
        scaled = weight * 1.5  # a non-leaf weight: the gradient flows on through it
        linear = SharedWeight(scaled, b) if shared else (lambda t, w=scaled: F.linear(t, w, b))
        loss = chained_uses(linear, x, spread, rows_big)
        with CountProducts() as counter:
            grads = torch.autograd.grad(loss, [x, weight] + ([b] if bias else []))
        results.append((loss.detach(), grads, counter.products))
    (want_loss, want, _), (got_loss, got, products) = results
    torch.testing.assert_close(got_loss, want_loss)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    uses = 4 if rows_big else 3
    # an input-gradient product per use, one weight product for the small uses, one more for the big use
    assert products == uses + 1 + bool(rows_big), products


@pytest.mark.parametrize("rows, kept", [(300, True), (400, False)])
def test_a_big_use_of_a_wide_weight_is_kept_to_the_end(rows, kept):
    """A use of more than `STASH_ROWS` rows is kept for the one product at the end while its input and output
    gradient are smaller than the weight's gradient (1,024 x 600: up to 378 rows), else its product is added at
    once; the gradients are autograd's either way."""
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(600, 1024, generator=g, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(rows, 1024, generator=g, dtype=torch.float64) for _ in range(2)]
    assert shared_weight.kept_to_the_end(rows, 1024, 600) is kept
    shared = SharedWeight(weight)
    loss = sum(torch.tanh(shared(x)).sum() for x in xs)
    with CountProducts() as counter:
        (got,) = torch.autograd.grad(loss, weight)
    (want,) = torch.autograd.grad(sum(torch.tanh(F.linear(x, weight)).sum() for x in xs), weight)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert counter.products == (1 if kept else 2), counter.products  # one weight product for both, or one each


def test_shared_weight_backward_twice_and_other_uses():
    """A retained graph differentiated twice gives the same gradients (the kept uses are consumed each time); a
    use of the alias outside the shared products adds its own gradient."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 4, generator=g, requires_grad=True)
    x = torch.randn(3, 4, generator=g)
    shared = SharedWeight(weight)
    loss = shared(torch.tanh(shared(x))).sum() + shared.weight.square().sum()
    first = torch.autograd.grad(loss, weight, retain_graph=True)[0]
    second = torch.autograd.grad(loss, weight)[0]
    w = weight.detach().requires_grad_()
    want = torch.autograd.grad((torch.tanh(x @ w.T) @ w.T).sum() + w.square().sum(), w)[0]
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(second, want)


def test_a_backward_that_stops_before_the_weight_leaves_nothing_behind():
    """autograd.grad of the input alone (retaining the graph), then of the weight: the first backward's kept
    uses do not join the second's gradient (they would double it)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 4, generator=g, requires_grad=True)
    x = torch.randn(3, 4, generator=g, requires_grad=True)
    big = torch.randn(shared_weight.STASH_ROWS + 1, 4, generator=g)
    shared = SharedWeight(weight)
    loss = shared(torch.tanh(shared(x))).sum() + shared(big).sum()
    torch.autograd.grad(loss, x, retain_graph=True)
    (got,) = torch.autograd.grad(loss, weight)
    w = weight.detach().requires_grad_()
    want = torch.autograd.grad((torch.tanh(x @ w.T) @ w.T).sum() + (big @ w.T).sum(), w)[0]
    torch.testing.assert_close(got, want)


def test_a_shared_weight_is_freed_with_its_graph():
    """No reference cycle through the autograd nodes: once the outputs are gone the object is freed without
    Python's cycle collector (the block's merged weight copies, ~0.5 GB at 1B, would wait for it)."""
    import gc
    import weakref

    weight = torch.randn(4, 4, requires_grad=True)
    enabled = gc.isenabled()
    gc.disable()
    try:
        shared = SharedWeight(weight * 2.0)
        shared(torch.randn(3, 4)).sum().backward()
        alive = weakref.ref(shared)
        del shared
        assert alive() is None
    finally:
        if enabled:
            gc.enable()


def test_shared_weight_keeps_no_view_of_a_released_parameter():
    """As under ZeRO-3 (a leaf module): the parameter's gathered storage is released after the forward and gathered
    anew into fresh storage before the backward. Nothing the uses saved shares the first storage (a saved view
    would keep a whole gathered weight alive from forward to backward), and the gradients equal autograd's through
    plain products."""
    g = torch.Generator().manual_seed(4)
    weight = torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    big = torch.randn(shared_weight.STASH_ROWS + 1, 4, generator=g, dtype=torch.float64)
    gathered = weight.data
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        shared = SharedWeight(weight, bias)
        hidden = shared(x)
        loss = (shared(big).square().mean() + hidden.square().sum())
        del shared
    assert any(t is weight for t in saved)  # the parameter itself, whose storage follows ZeRO-3's release
    views = [t for t in saved if t is not weight]
    assert views, "the uses saved nothing else: the check below would mean nothing"
    assert not any(t.untyped_storage().data_ptr() == gathered.untyped_storage().data_ptr() for t in views)
    weight.data = torch.empty(0, dtype=torch.float64)  # released
    weight.data = gathered.clone()  # gathered again: the same values, other storage
    del gathered
    got = torch.autograd.grad(loss, (x, weight, bias))
    w, b = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    x2 = x.detach().requires_grad_()
    want = torch.autograd.grad((F.linear(big, w, b).square().mean() + F.linear(x2, w, b).square().sum()), (x2, w, b))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


def test_a_merged_weight_is_freed_by_the_backward():
    """A weight computed in the forward (the block's merged copies) goes with the saved tensors at the end of the
    backward, while the loss, and so the graph, are still held (the trainer keeps them through its step)."""
    import weakref

    g = torch.Generator().manual_seed(7)
    weight = torch.randn(4, 4, generator=g, requires_grad=True)
    merged = weight * 2.0
    alive = weakref.ref(merged)
    shared = SharedWeight(merged)
    loss = shared(torch.tanh(shared(torch.randn(3, 4, generator=g)))).sum()
    del merged, shared
    assert alive() is not None  # saved for the backward
    loss.backward()
    assert alive() is None and loss.grad_fn is not None


def test_shared_weight_frozen_parameters_keep_nothing():
    """Where the weight needs no gradient, the uses keep no inputs for it, and the input's gradient is right."""
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 4, generator=g)
    x = torch.randn(3, 4, generator=g, requires_grad=True)
    shared = SharedWeight(weight)
    (dx,) = torch.autograd.grad(shared(shared(x)).sum(), x)
    torch.testing.assert_close(dx, torch.autograd.grad((x @ weight.T @ weight.T).sum(), x)[0])
    assert not shared._uses.kept and shared._uses.grad_weight is None


def test_block_takes_each_weight_gradient_once(tiny_model, monkeypatch):
    """The latent block with shared weight gradients against the block without (fp32, fused ops, merged
    projections both times): the same outputs and every gradient, with per layer and pass four input-gradient
    products in backward and per layer four weight products, where without sharing each pass has eight."""
    from engine.model import fused_ops
    from engine.model.latent_block import latent_block

    lm = tiny_model.language_model
    layers, columns = lm.config.num_hidden_layers, 4
    inputs = latent_block_inputs(lm, columns=columns)
    params = [p for p in lm.parameters() if p.requires_grad]
    results = {}
    for share in (True, False):
        if not share:
            monkeypatch.setattr(fused_ops, "shared_weight_unsupported",
                                lambda layers, lm=None: "switched off for the comparison")
        outputs = latent_block(lm, *inputs, fused_ops=True)
        cotangents = [torch.randn(o.shape, generator=torch.Generator().manual_seed(3)) for o in outputs]
        with CountProducts() as counter:
            grads = torch.autograd.grad(outputs, [inputs[0], inputs[1], inputs[5], *params], cotangents, allow_unused=True)
        results[share] = (outputs, grads, counter.products)
    (shared_out, shared_grads, shared_products), (plain_out, plain_grads, plain_products) = results[True], results[False]
    assert plain_products == layers * columns * 8, plain_products
    assert shared_products == layers * columns * 4 + layers * 4, shared_products
    for a, b in zip(shared_out, plain_out):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    names = ["prev", "column_embeds", "prefix_kv", *(n for n, p in lm.named_parameters() if p.requires_grad)]
    for name, a, b in zip(names, shared_grads, plain_grads, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_shared_weight_grads_are_refused_for_partitioned_or_wrapped_projections(tiny_model):
    import copy

    from engine.model import fused_ops

    model = copy.deepcopy(tiny_model)
    layers = list(model.language_model.layers)
    assert fused_ops.shared_weight_unsupported(layers) is None
    layers[1].mlp.down_proj = torch.nn.Sequential(layers[1].mlp.down_proj)
    assert fused_ops.shared_weight_unsupported(layers) == "layer 1 down_proj is a Sequential, not a plain torch.nn.Linear"
    layers[1].mlp.down_proj = layers[1].mlp.down_proj[0]
    handle = layers[0].self_attn.o_proj.register_forward_hook(lambda *args: None)
    assert fused_ops.shared_weight_unsupported(layers) == "layer 0 o_proj has forward hooks, which its products would bypass"
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_ops.shared_weight_unsupported(layers) == "autocast is on (the products would cast the weights)"
    # as DeepSpeed ZeRO-3 marks its parameters: partitioned (ds_id) and whether gathered now (ds_status)
    status = lambda name: type("ZeroParamStatus", (), {"name": name})()  # noqa: E731
    params = [p for layer in layers for p in layer.parameters()]
    for index, p in enumerate(params):
        p.ds_id, p.ds_status = index, status("AVAILABLE")
    refused = "ZeRO-3 partitions the weights and the language model is not gathered whole around the block"
    lm = model.language_model
    # gathered now, but each module fetched on its own (no leaf): nothing would gather them again for the backward
    assert fused_ops.shared_weight_unsupported(layers, lm) == refused
    lm._z3_leaf = True  # as deepspeed.utils.set_z3_leaf_modules marks it
    assert fused_ops.shared_weight_unsupported(layers, lm) is None  # gathered whole around the block
    params[-1].ds_status = status("NOT_AVAILABLE")
    assert fused_ops.shared_weight_unsupported(layers, lm) == refused
