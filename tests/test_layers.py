"""The one decoder-layer stack (`engine/model/layers.py`) and the fast-path decisions (`engine/model/fast_paths.py`)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from engine import load_model
from engine.model import fast_paths
from engine.model.layers import ReferenceOps, layer_geometry, layer_stack_unsupported, run_layers


def causal_attention(ops, geometry):
    """A full-sequence causal attention function for `run_layers`: q, k, v (B, T, heads, D)."""

    def attention(index, q, k, v, cos, sin):
        q, k = ops.rotary(q, k, cos, sin)
        groups = geometry.groups
        k = k.repeat_interleave(groups, dim=2)
        v = v.repeat_interleave(groups, dim=2)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=geometry.scale
        )
        return o.transpose(1, 2)

    return attention


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"text_heads": 6, "text_kv_heads": 3, "text_hidden_size": 48},  # GQA 2 with another head size
        {"text_heads": 4, "text_kv_heads": 4},  # no GQA
    ],
)
def test_reference_stack_computes_what_the_language_model_computes(overrides):
    model, _, _ = load_model("tiny", model_overrides=overrides, seed=3)
    lm = model.language_model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, lm.config.hidden_size, generator=g)
    positions = torch.arange(11).expand(2, -1)
    cos, sin = lm.rotary_emb(x, positions)
    ops, geometry = ReferenceOps(lm), layer_geometry(lm)
    with torch.no_grad():
        ours = run_layers(lm, x, cos, sin, causal_attention(ops, geometry), ops, geometry)
        theirs = lm(inputs_embeds=x, position_ids=positions).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def test_grad_fused_stack_gives_the_reference_values_and_gradients():
    """`GradFusedOps` (Triton kernels with backward, interpreted): the reference stack's output, input gradient and
    every weight gradient, on a model with q/k/v biases and GQA 3."""
    from engine.model.fused_ops import GradFusedOps

    model, _, _ = load_model("tiny", model_overrides={"text_heads": 6, "text_kv_heads": 2, "text_hidden_size": 48}, seed=4)
    lm = model.language_model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, lm.config.hidden_size, generator=g, requires_grad=True)
    cos, sin = lm.rotary_emb(x, torch.arange(5).expand(3, -1))
    cotangent = torch.randn(3, 5, lm.config.hidden_size, generator=g)
    results = []
    for ops in (ReferenceOps(lm), GradFusedOps(lm)):
        geometry = layer_geometry(lm)
        out = run_layers(lm, x, cos, sin, causal_attention(ops, geometry), ops, geometry)
        params = [p for p in lm.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out, [x, *params], cotangent, allow_unused=True)
        results.append((out.detach(), grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert sum(g is not None for g in want_grads) > 20
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"gradient {i}: {m}")


def test_stack_support_names_the_reason(tiny_model):
    lm = copy.deepcopy(tiny_model.language_model)
    assert layer_stack_unsupported(lm) is None
    assert layer_stack_unsupported(lm, training=True, graphs=True) is None

    lm.config.attention_dropout = 0.1
    assert "dropout" in layer_stack_unsupported(lm, training=True)
    assert layer_stack_unsupported(lm) is None  # inference ignores dropout
    lm.config.attention_dropout = 0.0

    lm.config.layer_types = ["full_attention", "sliding_attention"]
    assert "full-attention" in layer_stack_unsupported(lm)
    lm.config.layer_types = ["full_attention"] * lm.config.num_hidden_layers

    lm.layers[1].self_attn.q_norm = torch.nn.Identity()
    assert "layer 1" in layer_stack_unsupported(lm) and "QK-norm" in layer_stack_unsupported(lm)
    del lm.layers[1].self_attn.q_norm

    lm.rotary_emb.rope_type = "longrope"
    assert layer_stack_unsupported(lm) is None, "eager inference can run a host-dependent rope"
    assert "longrope" in layer_stack_unsupported(lm, graphs=True)
    lm.rotary_emb.rope_type = "dynamic"  # the default rope within its range, which its callers keep to
    assert layer_stack_unsupported(lm, graphs=True) is None
    lm.rotary_emb.rope_type = "default"

    lm.config.hidden_act = "gelu"
    assert "silu" in layer_stack_unsupported(lm, fused_ops=True)


def test_fast_path_decisions_are_logged_once_with_their_reason(tiny_model, caplog):
    fast_paths._logged.clear()
    with caplog.at_level(logging.INFO, logger="coconut"):
        for _ in range(3):
            decision = fast_paths.latent_passes(tiny_model, "auto", torch.device("cpu"))
    assert decision.choice == "transformers" and "cpu" in decision.reason
    lines = [r.getMessage() for r in caplog.records if "fast path latent_passes" in r.getMessage()]
    assert lines == ["fast path latent_passes: transformers (auto on cpu)"]

    assert fast_paths.injection(tiny_model, "auto").choice == "reference"
    assert fast_paths.injection(tiny_model, "reference").reason == "asked for"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fast_paths.eval_kv_cache("auto", cpu, 2).choice == "dynamic"
    assert fast_paths.eval_kv_cache("auto", cuda, 2).choice == "paged"
    assert fast_paths.eval_kv_cache("auto", cuda, 3).choice == "dynamic"
    assert fast_paths.eval_kv_cache("auto", cuda, 2, paged_failed=True).choice == "dynamic"
    assert fast_paths.eval_kv_cache("paged", cpu, 0).choice == "paged"
    with pytest.raises(ValueError, match="eval_kv_cache must be one of"):
        fast_paths.eval_kv_cache("static", cpu, 0)
    assert fast_paths.decode_ops(tiny_model.language_model, None, cpu, torch.float32).choice == "reference"
    assert fast_paths.decode_ops(tiny_model.language_model, True, cpu, torch.float32).choice == "fused"


def test_partitioned_parameters_keep_the_transformers_passes(tiny_model):
    """Parameters carrying DeepSpeed's ZeRO-3 `ds_id` are partitioned: the graphed block cannot replay them."""
    model = copy.deepcopy(tiny_model)
    model.language_model.norm.weight.ds_id = 0
    assert fast_paths.is_partitioned(model.language_model.norm)
    decision = fast_paths.latent_passes(model, "auto", torch.device("cuda"))  # decided without touching a GPU
    assert decision.choice == "transformers" and "ZeRO-3" in decision.reason and "per module" in decision.reason
