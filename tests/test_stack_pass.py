"""A multi-position pass through the layer stack over transformers' cache (`engine/model/stack_pass.py`): it must
compute what a transformers call computes (values, the cache it leaves, every gradient), stay causal, and be taken
only where `fast_paths.stack_passes` says so."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from engine import load_model
from engine.model import fast_paths
from engine.model.compat import cache_kwargs
from engine.model.fused_ops import GradFusedOps
from engine.model.layers import ReferenceOps
from engine.model.stack_pass import pass_mask, stack_pass
from tests.helpers import CountProducts, random_pixels, sample_ids

TOL = 2e-5


def two_passes(lm, x, mask, positions, split, run):
    """The pass over columns [0, split) then [split, T) with one cache; ``run(x, mask, positions, cache)``."""
    cache = DynamicCache(config=lm.config)
    first = run(x[:, :split], mask[:, :split], positions[:, :split], cache)
    second = run(x[:, split:], mask, positions[:, split:], cache)
    return torch.cat([first, second], 1), cache


def transformers_pass(lm):
    def run(x, mask, positions, cache):
        return lm(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwargs(lm, cache)).last_hidden_state

    return run


def layer_stack_pass(lm, ops):
    return lambda x, mask, positions, cache: stack_pass(lm, x, mask, positions, cache, ops)


def left_padded(lm, pads, length, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(pads), length, lm.config.hidden_size, generator=g)
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return x, mask, positions


@pytest.mark.parametrize(
    "overrides,pads,split",
    [
        ({}, (0, 3, 1), 6),  # left padding: masks in both passes
        ({}, (0, 0, 0), 9),  # no padding: is_causal in the first pass, a mask after the cache
        ({"text_heads": 6, "text_kv_heads": 2, "text_hidden_size": 48}, (2, 0), 10),  # GQA 3, a one-query second pass
        ({"text_heads": 4, "text_kv_heads": 4}, (0, 0), 5),  # no GQA
    ],
)
@pytest.mark.parametrize("ops_name", ["reference", "fused", "fused_merged"])
def test_stack_pass_computes_the_transformers_pass(overrides, pads, split, ops_name):
    """Values at real positions, the cache and the gradients of the inputs and of every parameter (fp32; the fused
    ops interpreted on CPU; merged: each layer's q/k/v and gate/up as one product each, 4 products per layer and
    pass instead of 7)."""
    model, _, _ = load_model("tiny", model_overrides=overrides, seed=5)
    lm = model.language_model
    x, mask, positions = left_padded(lm, pads, 11, seed=1)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ops = {"reference": lambda: ReferenceOps(lm), "fused": lambda: GradFusedOps(lm),
           "fused_merged": lambda: GradFusedOps(lm, merge_projections=True)}[ops_name]()  # fmt: skip
    results = []
    for run in (transformers_pass(lm), layer_stack_pass(lm, ops)):
        lm.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(True)
        with CountProducts() as counter:
            hidden, cache = two_passes(lm, inputs, mask, positions, split, run)
        real = mask.bool()
        (hidden[real] * weights[real]).sum().backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
        results.append((hidden.detach(), cache, inputs.grad.clone(), grads))
    (ref, ref_cache, ref_dx, ref_grads), (out, cache, dx, grads) = results
    assert counter.products == 2 * lm.config.num_hidden_layers * (4 if ops_name == "fused_merged" else 7)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=TOL, rtol=1e-5)
    for a, b in zip(cache.layers, ref_cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=TOL, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=TOL, rtol=1e-5)
    torch.testing.assert_close(dx[real], ref_dx[real], atol=TOL, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=TOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fused", [False, True])
def test_stack_pass_is_causal(fused):
    """Changing the inputs from column t on moves no output before t, in a pass after a cached prefix too."""
    model, _, _ = load_model("tiny", seed=6)
    lm = model.language_model
    x, mask, positions = left_padded(lm, (2, 0), 12, seed=3)
    changed = x.clone()
    changed[:, 8:] += torch.randn(changed[:, 8:].shape, generator=torch.Generator().manual_seed(4))
    run = layer_stack_pass(lm, GradFusedOps(lm) if fused else ReferenceOps(lm))
    with torch.no_grad():
        a, _ = two_passes(lm, x, mask, positions, 5, run)
        b, _ = two_passes(lm, changed, mask, positions, 5, run)
    real = mask.bool()
    assert (a[:, :8][real[:, :8]] - b[:, :8][real[:, :8]]).abs().max() == 0
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 0


def test_pass_mask_is_causal_over_real_keys():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    allowed = pass_mask(mask, 2)  # queries at columns 2 and 3
    assert allowed.shape == (2, 1, 2, 4)
    assert allowed[0, 0].tolist() == [[False, True, True, False], [False, True, True, True]]
    assert allowed[1, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    full = torch.ones(2, 4, dtype=torch.long)
    assert pass_mask(full, 4) is None  # no padding, no cached prefix: SDPA's causal flag
    assert pass_mask(full, 1) is None  # one query sees every key
    assert pass_mask(full, 2) is not None  # after a cached prefix the causal pattern needs a mask


def test_pass_mask_takes_the_hosts_answer_and_the_schedule_knows_it():
    from engine.model.schedule import real_prefix_columns

    full = torch.ones(2, 4, dtype=torch.long)
    assert pass_mask(full, 4, all_real=True) is None
    assert pass_mask(full, 4, all_real=False) is not None  # the caller's answer is taken as given
    assert real_prefix_columns(torch.tensor([[0, 1, 1], [1, 1, 1]])) == 0  # left padding
    assert real_prefix_columns(torch.tensor([[1, 1, 0], [1, 1, 1]])) == 2  # right padding
    assert real_prefix_columns(torch.ones(2, 3)) == 3


@pytest.mark.parametrize("padding,min_passes", [("none", 0), ("right", 0), ("left", 0), ("right", 6)])
def test_a_training_forward_tells_the_stack_pass_whether_its_keys_are_real(
    tiny_model, tiny_tok, monkeypatch, padding, min_passes
):
    """The forward answers from the schedule's host copy of the mask (the pass does not read the device mask, a
    synchronisation), and answers right for every pass (lockstep passes from min_passes included): all real
    without padding, none with left padding, the first but not the last with right padding."""
    import engine.model.stack_pass as sp

    seen = []
    real_pass_mask = sp.pass_mask

    def spy(attention_mask, queries, all_real=None):
        assert all_real is not None
        seen.append((all_real, bool(attention_mask.bool().all())))
        return real_pass_mask(attention_mask, queries, all_real)

    monkeypatch.setattr(sp, "pass_mask", spy)
    row = sample_ids(tiny_tok, tiny_model, tiles=1, question="Which way?", n_latents=2)
    ids = torch.tensor([row + [row[-1]] * 3] * 2)
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, -3:] = 0
    elif padding == "left":
        ids = torch.cat([torch.full((2, 2), tiny_tok.pad_token_id), ids], 1)
        mask = torch.cat([torch.tensor([[0, 0], [1, 1]]), mask], 1)
    pv = random_pixels(2, tiny_model.config.vision_config.image_size[0], 0)
    tiny_model.set_layer_ops("fused")
    tiny_model.set_latent_passes("transformers")  # every pass a stack pass
    try:
        tiny_model(ids, mask, pv, labels=ids.masked_fill(mask == 0, -100), min_passes=min_passes).loss.backward()
    finally:
        tiny_model.set_layer_ops("auto")
        tiny_model.set_latent_passes("auto")
        tiny_model.zero_grad(set_to_none=True)
    assert len(seen) == max(3, min_passes) and all(told == truth for told, truth in seen)
    told = [t for t, _ in seen]
    if padding == "right":  # the passes up to the padded columns are real, the ones over them not
        assert told[0] and not told[-1]
    else:
        assert told == [padding == "none"] * len(seen)


def test_training_forward_through_the_stack_matches_transformers(tiny_model, tiny_tok):
    """A batch without latents (one pass) and one with scattered latents (several passes, no block): with the
    fused layer ops every pass runs through the stack, with the transformers passes' loss and gradients."""
    rows = [sample_ids(tiny_tok, tiny_model, tiles=1, question=q, n_latents=n) for q, n in (("A?", 0), ("Longer question?", 2))]
    width = max(len(r) for r in rows)
    ids = torch.full((2, width), tiny_tok.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):  # right padding: latents in different columns
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    pv = random_pixels(2, tiny_model.config.vision_config.image_size[0], 0)
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for ops in ("reference", "fused"):
        tiny_model.set_layer_ops(ops)
        try:
            decision = fast_paths.stack_passes(tiny_model, torch.device("cpu"), torch.float32)
            assert decision.choice == ("layer_stack" if ops == "fused" else "transformers")
            tiny_model.zero_grad(set_to_none=True)
            out = tiny_model(ids, mask, pv, labels=labels)
            out.loss.backward()
            results.append((out, {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}))
        finally:
            tiny_model.set_layer_ops("auto")
    (ref, ref_grads), (out, grads) = results
    assert out.num_passes == ref.num_passes > 1
    torch.testing.assert_close(out.loss, ref.loss, atol=TOL, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=TOL, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=TOL, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_stack_passes_keep_transformers_calls_where_something_acts_on_them(tiny_model):
    cpu = torch.device("cpu")

    def choice():
        return fast_paths.stack_passes(tiny_model, cpu, torch.float32)

    tiny_model.set_layer_ops("fused")
    try:
        assert choice().choice == "layer_stack"
        with torch.no_grad():
            assert choice() == fast_paths.Decision("stack_passes", "transformers", "without gradients")
        tiny_model.activation_checkpointing = True
        assert "activation checkpointing" in choice().reason
        tiny_model.activation_checkpointing = False
        tiny_model.language_model.config._attn_implementation = "eager"
        assert choice().reason == "attention backend 'eager' (the stack uses SDPA)"
        tiny_model.language_model.config._attn_implementation = "sdpa"
        tiny_model._liger_pieces = ("fused_linear_cross_entropy",)  # the loss only: the passes are untouched
        assert choice().choice == "layer_stack"
        tiny_model._liger_pieces = ("fused_linear_cross_entropy", "rms_norm")
        assert choice().reason == "Liger-Kernel's module patches are on (rms_norm)"
        tiny_model._liger_pieces = ()
        tiny_model.language_model.config.attention_dropout = 0.1
        tiny_model.train()
        assert choice().reason == "attention dropout (the stack's attention has none)"
    finally:
        tiny_model.language_model.config.attention_dropout = 0.0
        tiny_model.language_model.config._attn_implementation = "sdpa"
        tiny_model.activation_checkpointing = False
        tiny_model._liger_pieces = ()
        tiny_model.set_layer_ops("auto")
    assert choice().choice == "transformers"  # auto on CPU: the modules


def test_cache_keyword_follows_the_installed_transformers(tiny_model):
    """The keyword each transformers forward takes its cache by (``cache`` from 5.24, ``past_key_values`` before),
    read from the forward's own signature: no deprecation warning from the engine's calls."""
    import inspect
    import warnings

    lm = tiny_model.language_model
    (keyword,) = cache_kwargs(lm, None)
    assert keyword in inspect.signature(type(lm).forward).parameters
    ids = torch.tensor([[5, 6, 7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        tiny_model(ids, torch.ones_like(ids))
