"""engine/model/compat.py: the cache keyword, and the guard that keeps cuDNN's SDPA backward out of the training
passes whose key count it gets wrong (keys % 128 == 64 with a mask: NaN query gradients on H100/H200). The bug needs
a GPU; these tests check when the guard applies and that every training path enters it, forward and recomputation."""

from __future__ import annotations

import contextlib

import pytest
import torch

from engine.model import compat
from tests.helpers import pad_batch, random_pixels, sample_ids


def test_cudnn_guard_applies_on_cuda_half_a_tile_past_a_multiple_of_128():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [k for k in range(1, 700) if compat.cudnn_attention_backward_unsafe(k, cuda)] == [64, 192, 320, 448, 576]
    assert not any(compat.cudnn_attention_backward_unsafe(k, cpu) for k in range(1, 700))
    assert isinstance(compat.safe_attention(320, cpu), contextlib.nullcontext)
    assert isinstance(compat.safe_attention(384, "cuda"), contextlib.nullcontext)
    assert not isinstance(compat.safe_attention(320, "cuda"), contextlib.nullcontext)
    with torch.no_grad():  # cuDNN's forward is right: nothing to avoid without a backward
        assert isinstance(compat.safe_attention(320, "cuda"), contextlib.nullcontext)


def test_the_guard_turns_cudnn_off_and_nothing_else_on():
    """Inside: cuDNN off, the other backends as the process had them (one switched off stays off); after: all
    restored."""
    cuda = torch.backends.cuda
    flags = (cuda.cudnn_sdp_enabled, cuda.flash_sdp_enabled, cuda.mem_efficient_sdp_enabled, cuda.math_sdp_enabled)
    before = [f() for f in flags]
    cuda.enable_math_sdp(False)
    try:
        with compat.safe_attention(320, "cuda"):
            assert [f() for f in flags] == [False, before[1], before[2], False]
        assert [f() for f in flags] == [before[0], before[1], before[2], False]
    finally:
        cuda.enable_math_sdp(before[3])
    assert [f() for f in flags] == before


@pytest.fixture
def guard_spy(monkeypatch):
    """The guard as if on CUDA (on any device, by key count), recording the key counts it was entered with and
    whether autograd was running backward then; SDPA runs as before (on CPU the guard's backends list excludes
    only cuDNN, which the CPU does not have)."""
    entries = []
    real = compat.safe_attention

    def spy(keys, device):
        if keys % compat.CUDNN_KEY_TILE == compat.CUDNN_KEY_TILE // 2:
            entries.append((keys, torch._C._current_graph_task_id() != -1))
        return real(keys, "cpu")

    for module in ("engine.model.compat", "engine.model.coconut", "engine.model.checkpointing"):
        monkeypatch.setattr(f"{module}.safe_attention", spy)
    return entries


def left_padded_batch(model, tok, length, latents=0):
    """Two left-padded rows of exactly ``length`` columns (the first pass then attends over ``length`` keys)."""
    rows = [sample_ids(tok, model, tiles=1, question=q, n_latents=latents) for q in ("What colour?", "Move right.")]
    rows = [r + [r[-1]] * (length - 2 - len(r)) for r in rows]  # the second row stays 2 shorter: left padding
    rows[0] = rows[0] + [rows[0][-1]] * 2
    ids, mask = pad_batch(rows, tok.pad_token_id, left=[True, True])
    assert ids.shape[1] == length and not bool(mask.all())
    return ids, mask, random_pixels(2, model.config.vision_config.image_size[0], 0)


def train_on_a_left_padded_batch(model, tok, layer_ops: str, length: int = 64) -> None:
    """Forward and backward of a ``length``-column left-padded batch with the given layer ops."""
    ids, mask, pv = left_padded_batch(model, tok, length)
    model.set_layer_ops(layer_ops)
    try:
        model(ids, mask, pv, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    finally:
        model.set_layer_ops("auto")
        model.zero_grad(set_to_none=True)


def test_a_transformers_training_pass_over_an_unsafe_key_count_enters_the_guard(tiny_model, tiny_tok, guard_spy):
    """A 64-column left-padded batch with the reference ops: the transformers call runs inside the guard."""
    train_on_a_left_padded_batch(tiny_model, tiny_tok, "reference")
    assert guard_spy == [(64, False)]


@pytest.fixture
def sdpa_calls_as_on_cuda(monkeypatch):
    """cuDNN's unsafe key counts as on CUDA (on any device), and every SDPA call recorded as (key count, gradients
    on, cuDNN enabled): a call with gradients over an unsafe count while cuDNN is enabled is what gives NaN."""
    real_unsafe = compat.cudnn_attention_backward_unsafe
    monkeypatch.setattr(compat, "cudnn_attention_backward_unsafe", lambda keys, device: real_unsafe(keys, "cuda"))
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((k.shape[-2], torch.is_grad_enabled(), torch.backends.cuda.cudnn_sdp_enabled()))
        return real_sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def unsafe_for_cudnn(calls):
    return [c for c in calls if c[1] and c[2] and c[0] % compat.CUDNN_KEY_TILE == compat.CUDNN_KEY_TILE // 2]


@pytest.mark.parametrize("layer_ops", ["reference", "fused"])
def test_no_training_pass_gives_cudnn_an_unsafe_key_count(tiny_model, tiny_tok, sdpa_calls_as_on_cuda, layer_ops):
    """A 64-column left-padded batch: the transformers call (reference ops) runs with cuDNN off; the stack pass
    (fused ops) appends 64 masked keys in every layer, cuDNN staying on."""
    train_on_a_left_padded_batch(tiny_model, tiny_tok, layer_ops)
    calls = sdpa_calls_as_on_cuda
    layers = tiny_model.language_model.config.num_hidden_layers
    assert calls and unsafe_for_cudnn(calls) == []
    if layer_ops == "fused":  # besides the vision tower's unmasked call over its patches
        assert calls.count((128, True, True)) == layers and not any(c[0] == 64 for c in calls)
    else:
        assert (64, True, False) in calls


def test_masked_sdpa_pads_an_unsafe_key_count_to_the_same_attention(sdpa_calls_as_on_cuda):
    """65 queries over 64 + 128 keys (GQA 2): padded keys hidden by the mask change neither the output nor a
    gradient; without gradients, or with cuDNN off, nothing is padded."""
    from engine.model.layers import LayerGeometry, masked_sdpa

    g = LayerGeometry(num_layers=1, hidden_size=4 * 16, q_heads=4, kv_heads=2, head_dim=16, scale=16**-0.5)
    gen = torch.Generator().manual_seed(0)
    rows, n = 3, 65
    for keys in (64, 192):
        q = torch.randn(rows, 4, n, 16, generator=gen, requires_grad=True)
        k = torch.randn(rows, 2, keys, 16, generator=gen, requires_grad=True)
        v = torch.randn(rows, 2, keys, 16, generator=gen, requires_grad=True)
        allowed = torch.rand(rows, 1, n, keys, generator=gen) > 0.3
        allowed[..., 0] = True  # every query sees a key
        weights = torch.randn(rows, 4, n, 16, generator=gen)
        sdpa_calls_as_on_cuda.clear()
        out = masked_sdpa(q, k, v, allowed, g)
        got = torch.autograd.grad((out * weights).sum(), (q, k, v))
        assert sdpa_calls_as_on_cuda == [(keys + 64, True, True)]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=allowed, scale=g.scale)
        want = torch.autograd.grad((ref * weights).sum(), (q, k, v))
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        for name, a, b in zip("qkv", got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
    sdpa_calls_as_on_cuda.clear()
    with torch.no_grad():
        masked_sdpa(q, k, v, allowed, g)
    cudnn_was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        masked_sdpa(q, k, v, allowed, g)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_was)
    assert [c[0] for c in sdpa_calls_as_on_cuda] == [192, 192]


def test_masked_sdpa_pads_additive_and_broadcast_masks_too(sdpa_calls_as_on_cuda):
    """An additive float mask gets -inf on the appended keys (0 would let them in), a mask broadcast over the keys
    is widened first; fully masked query rows (left padding's) stay what SDPA gives unpadded."""
    from engine.model.layers import LayerGeometry, masked_sdpa

    g = LayerGeometry(num_layers=1, hidden_size=2 * 16, q_heads=2, kv_heads=2, head_dim=16, scale=16**-0.5)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 5, 16, generator=gen)
    k, v = (torch.randn(2, 2, 64, 16, generator=gen) for _ in range(2))
    allowed = torch.rand(2, 1, 5, 64, generator=gen) > 0.4
    allowed[..., 0] = True
    allowed[1, :, 2] = False  # a fully masked query row
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    every_key = torch.ones(2, 1, 5, 1, dtype=torch.bool)
    for mask in (allowed, additive, every_key):
        sdpa_calls_as_on_cuda.clear()
        got = masked_sdpa(q, k, v, mask, g)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=g.scale)
        assert sdpa_calls_as_on_cuda[0][0] == 128
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("queries", [1, 5, 127, 128, 130])
def test_masked_sdpa_packs_the_query_heads_of_few_queries(queries, monkeypatch):
    """Below `PACK_QUERIES_BELOW` queries, each KV head's query heads attend as its queries (one call over
    (B, kv, groups * n, D), no K/V copied per head); from it on, repeat_kv as transformers. Either way the output
    and every gradient are those of SDPA over the repeated K/V (fp32; boolean, broadcast and additive masks)."""
    from engine.model import layers

    g = layers.LayerGeometry(num_layers=1, hidden_size=6 * 8, q_heads=6, kv_heads=2, head_dim=8, scale=0.3)
    gen = torch.Generator().manual_seed(queries)
    rows, keys = 2, 140
    q = torch.randn(rows, queries, 6, 8, generator=gen).transpose(1, 2).requires_grad_(True)  # the stack's layout
    k, v = (torch.randn(rows, 2, keys, 8, generator=gen, requires_grad=True) for _ in range(2))
    allowed = torch.rand(rows, 1, queries, keys, generator=gen) > 0.3
    allowed[..., 0] = True
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    broadcast = torch.rand(rows, 1, 1, keys, generator=gen) > 0.3
    broadcast[..., 0] = True
    weights = torch.randn(rows, 6, queries, 8, generator=gen)
    sdpa, shapes = torch.nn.functional.scaled_dot_product_attention, []

    def spy(query, *args, **kwargs):
        shapes.append(tuple(query.shape))
        return sdpa(query, *args, **kwargs)

    for mask in (allowed, additive, broadcast):
        shapes.clear()
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        out = layers.masked_sdpa(q, k, v, mask, g)
        monkeypatch.undo()
        packed = queries < layers.PACK_QUERIES_BELOW
        assert shapes == [(rows, 2, 3 * queries, 8) if packed else (rows, 6, queries, 8)]
        got = torch.autograd.grad((out * weights).sum(), (q, k, v))
        ref = sdpa(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=mask, scale=g.scale)
        want = torch.autograd.grad((ref * weights).sum(), (q, k, v))
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        for name, a, b in zip("qkv", got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


def test_the_padding_applies_where_cudnn_could_run_an_unsafe_backward():
    assert compat.cudnn_safe_key_padding(320, "cuda") == 64
    assert compat.cudnn_safe_key_padding(384, "cuda") == 0
    assert compat.cudnn_safe_key_padding(320, "cpu") == 0
    with torch.no_grad():
        assert compat.cudnn_safe_key_padding(320, "cuda") == 0


def test_a_pass_over_the_cache_enters_the_guard_by_its_total_key_count(tiny_model, tiny_tok, guard_spy):
    """Latent passes as transformers calls: the final pass starts after the latents and ends at column 64; the
    guard sees the keys it attends over (64), not its own columns."""
    ids, mask, pv = left_padded_batch(tiny_model, tiny_tok, 64, latents=2)
    tiny_model.set_latent_passes("transformers")
    try:
        out = tiny_model(ids, mask, pv, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
    finally:
        tiny_model.set_latent_passes("auto")
        tiny_model.zero_grad(set_to_none=True)
    assert out.num_passes == 3 and guard_spy == [(64, False)]  # prefix, one latent, final: only the last over 64


def test_checkpointed_layers_enter_the_guard_again_when_recomputed(tiny_model, tiny_tok, guard_spy):
    ids, mask, pv = left_padded_batch(tiny_model, tiny_tok, 64)
    tiny_model.set_activation_checkpointing(True)
    try:
        loss = tiny_model(ids, mask, pv, labels=ids.masked_fill(mask == 0, -100)).loss
        forward_entries = len(guard_spy)
        loss.backward()
    finally:
        tiny_model.set_activation_checkpointing(False)
        tiny_model.zero_grad(set_to_none=True)
    layers = tiny_model.language_model.config.num_hidden_layers
    # forward: the call, and each checkpointed layer's body; backward: each layer's recomputation
    assert forward_entries == 1 + layers
    assert guard_spy[forward_entries:] == [(64, True)] * layers


def test_safe_key_counts_leave_the_passes_alone(tiny_model, tiny_tok, guard_spy):
    ids, mask, pv = left_padded_batch(tiny_model, tiny_tok, 65)
    tiny_model(ids, mask, pv, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    tiny_model.zero_grad(set_to_none=True)
    assert guard_spy == []


def test_the_latent_blocks_final_chunk_pads_an_unsafe_key_count(tiny_model, sdpa_calls_as_on_cuda):
    """The block's multi-column (final) chunk attends with a mask through SDPA: over 60 cached + 4 new keys, padded
    to 128."""
    from engine.model.latent_block import _CachedChunkAttention
    from engine.model.layers import ReferenceOps, layer_geometry

    lm = tiny_model.language_model
    g = layer_geometry(lm)
    past = torch.randn(2, g.kv_heads, 60, g.head_dim)
    attention = _CachedChunkAttention(ReferenceOps(lm), g, [[past]], [[past.clone()]],
                                      torch.ones(2, 1, 4, 64, dtype=torch.bool))  # fmt: skip
    q, k, v = torch.randn(2, 4, g.q_heads, g.head_dim), torch.randn(2, 4, g.kv_heads, g.head_dim), torch.randn(2, 4, g.kv_heads, g.head_dim)
    cos, sin = lm.rotary_emb(q, torch.arange(60, 64).expand(2, -1))
    attention(0, q, k, v, cos, sin)
    assert sdpa_calls_as_on_cuda == [(128, True, True)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="cuDNN's attention needs a GPU"))])
def test_stack_pass_attention_keeps_its_gradients_finite_at_an_unsafe_key_count(device):
    """A left-padded masked pass over 320 keys (half a 128-key tile past a multiple: cuDNN's backward returns NaN
    for the fully masked padding queries there) through the stack pass's attention, with the default backends:
    finite gradients equal to the math kernel's (real queries; the loss ignores padding positions as training's
    does). On CPU it checks the test itself."""
    from types import SimpleNamespace

    from transformers import DynamicCache

    from engine.model.layers import LayerGeometry
    from engine.model.stack_pass import _CachePassAttention, pass_mask

    rows, keys, heads, dim = 8, 320, 4, 64
    geometry = LayerGeometry(num_layers=1, hidden_size=heads * dim, q_heads=heads, kv_heads=2, head_dim=dim, scale=dim**-0.5)
    mask = torch.ones(rows, keys, dtype=torch.long, device=device)
    for r in range(rows):
        mask[r, : 3 * r] = 0  # left padding
    g = torch.Generator(device=device).manual_seed(0)
    q = (torch.randn(rows, keys, heads, dim, device=device, generator=g) * 0.1).bfloat16().requires_grad_(True)
    k = (torch.randn(rows, keys, 2, dim, device=device, generator=g) * 0.1).bfloat16().requires_grad_(True)
    v = torch.randn(rows, keys, 2, dim, device=device, generator=g).bfloat16().requires_grad_(True)
    weights = torch.randn(rows, keys, heads, dim, device=device, generator=g) * mask[:, :, None, None]
    ops = SimpleNamespace(rotary=lambda q, k, cos, sin: (q, k))  # no rotation: attention alone
    grads = []
    for backends in (None, [torch.nn.attention.SDPBackend.MATH]):
        attention = _CachePassAttention(ops, geometry, DynamicCache(), pass_mask(mask, keys))
        with torch.nn.attention.sdpa_kernel(backends) if backends else contextlib.nullcontext():
            out = attention(0, q, k, v, None, None)
        grads.append(torch.autograd.grad((out.float() * weights).sum(), (q, k, v)))
    real = mask.bool()
    for name, got, want in zip("qkv", *grads):
        assert torch.isfinite(got).all(), f"non-finite d{name}"
        if name == "q":
            got, want = got[real], want[real]
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2, msg=lambda m: f"d{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("keys", [421, 320])
def test_packed_query_heads_on_cudnn(keys, monkeypatch):
    """The latent block's final chunk on the GPU in bf16 (32 queries, 14/2 heads of 64; 320 keys is a count cuDNN's
    masked backward needs padded for): finite, and the repeat_kv call's output and gradients to bf16 rounding."""
    from engine.model import layers

    g = layers.LayerGeometry(num_layers=1, hidden_size=896, q_heads=14, kv_heads=2, head_dim=64, scale=0.125)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, queries = 64, 32

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16).requires_grad_(True)

    q, k, v = leaf(rows, 14, queries, 64), leaf(rows, 2, keys, 64), leaf(rows, 2, keys, 64)
    real = torch.rand(rows, keys, generator=gen, device="cuda") > 0.1
    real[:, -queries:] = True
    causal = torch.arange(keys, device="cuda")[None, :] <= torch.arange(keys - queries, keys, device="cuda")[:, None]
    allowed = (causal[None] & real[:, None, :])[:, None]
    weights = torch.randn(rows, 14, queries, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
    results = []
    for pack in (layers.PACK_QUERIES_BELOW, 0):
        monkeypatch.setattr(layers, "PACK_QUERIES_BELOW", pack)
        out = layers.masked_sdpa(q, k, v, allowed, g)
        results.append([out, *torch.autograd.grad((out.float() * weights.float()).sum(), (q, k, v))])
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
