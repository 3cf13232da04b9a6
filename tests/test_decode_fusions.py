"""The decode-step fusions against their references and transformers' modules, on awkward shapes."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels.decode_fusions import (
    rms_norm,
    rms_norm_reference,
    rotary_qk,
    rotary_qk_reference,
    silu_mul,
    silu_mul_reference,
)
from kernels.paged_kv import round_to

# fp32: same math up to summation order. bf16: the interpreter truncates fp32 -> bf16 casts (the GPU rounds),
# so a result may differ by one bf16 ulp of its magnitude.
TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,hidden", [(1, 1), (3, 33), (5, 64), (2, 97)])
def test_rms_norm_matches_reference_and_transformers(dtype, rows, hidden):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    x = _randn(rows, hidden, dtype=dtype) * 3
    norm = Qwen2RMSNorm(hidden, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(_randn(hidden, dtype=dtype, seed=1))
        expected = norm(x)
        torch.testing.assert_close(rms_norm_reference(x, norm.weight, 1e-6), expected, atol=0, rtol=0)
        torch.testing.assert_close(rms_norm(x, norm.weight, 1e-6), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_with_residual_returns_the_sum_too(dtype):
    x, residual = _randn(4, 40, dtype=dtype), _randn(4, 40, dtype=dtype, seed=2)
    weight = _randn(40, dtype=dtype, seed=3)
    out, summed = rms_norm(x, weight, 1e-5, residual=residual)
    ref_out, ref_sum = rms_norm_reference(x, weight, 1e-5, residual=residual)
    torch.testing.assert_close(summed, ref_sum, **TOL[dtype])
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    # strided rows (a column slice of a wider buffer) read correctly
    wide = _randn(4, 50, dtype=dtype, seed=4)
    torch.testing.assert_close(rms_norm(wide[:, 5:45], weight, 1e-5), rms_norm_reference(wide[:, 5:45], weight, 1e-5),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,q_heads,k_heads,head_dim", [(1, 1, 1, 2), (3, 14, 2, 64), (5, 3, 3, 6), (2, 7, 1, 34)])
def test_rotary_qk_matches_reference_and_transformers(dtype, tokens, q_heads, k_heads, head_dim):
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    q = _randn(tokens, q_heads, head_dim, dtype=dtype)
    k = _randn(tokens, k_heads, head_dim, dtype=dtype, seed=1)
    angle = _randn(tokens, head_dim // 2, dtype=torch.float32, seed=2) * 3
    emb = torch.cat([angle, angle], -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    # transformers' layout: (B=1, heads, T, D) with cos/sin (1, T, D)
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    rq, rk = rotary_qk_reference(q, k, cos, sin)
    torch.testing.assert_close(rq, hq[0].transpose(0, 1), atol=0, rtol=0)
    torch.testing.assert_close(rk, hk[0].transpose(0, 1), atol=0, rtol=0)
    q_before, k_before = q.clone(), k.clone()
    fq, fk = rotary_qk(q, k, cos, sin)
    torch.testing.assert_close(fq, rq, **TOL[dtype])
    torch.testing.assert_close(fk, rk, **TOL[dtype])
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "inputs must not change"


def test_rotary_qk_takes_strided_views():
    qkv = _randn(3, 6, 8, dtype=torch.float32)  # as if q and k were views of one projection output
    q, k = qkv[:, :4], qkv[:, 4:]
    angle = _randn(3, 4, dtype=torch.float32, seed=5)
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    for got, want in zip(rotary_qk(q, k, cos, sin), rotary_qk_reference(q, k, cos, sin)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,width", [(1, 1), (3, 37), (2, 1030)])
def test_silu_mul_matches_reference(dtype, rows, width):
    gate, up = _randn(rows, width, dtype=dtype) * 4, _randn(rows, width, dtype=dtype, seed=1)
    torch.testing.assert_close(silu_mul(gate, up), silu_mul_reference(gate, up), **TOL[dtype])


def test_bad_shapes_are_named():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8), 1e-6, residual=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="cos and sin"):
        rotary_qk(torch.zeros(2, 1, 8), torch.zeros(2, 1, 8), torch.zeros(2, 6), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="head_dim must be even"):
        rotary_qk(torch.zeros(2, 1, 7), torch.zeros(2, 1, 7), torch.zeros(2, 7), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="must match"):
        silu_mul(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_self_check_passes_here_and_names_a_failure(dtype, monkeypatch):
    import kernels.decode_fusions as fusions

    assert fusions.decode_fusions_self_check("cpu", dtype) is None
    monkeypatch.setattr(fusions, "silu_mul", lambda gate, up: gate * up)  # a wrong kernel
    reason = fusions.decode_fusions_self_check("cpu", dtype)
    assert reason is not None and reason.startswith("silu_mul")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rotary_attention_self_check_passes_here_and_names_a_failure(dtype, monkeypatch):
    """Its own check: a wrong fused attention fails it (naming it) and leaves the other fusions' check passing; the
    runner's decision then keeps the rotary kernel outside the attention."""
    import kernels.decode_fusions as fusions
    from engine.model import fast_paths

    assert fusions.rotary_attention_self_check("cpu", dtype) is None
    real = fusions.rotary_paged_decode_attention
    monkeypatch.setattr(fusions, "rotary_paged_decode_attention", lambda *a, **k: real(*a, **k) * 1.5)
    reason = fusions.rotary_attention_self_check("cpu", dtype)
    assert reason is not None and reason.startswith("rotary_paged_decode_attention")
    assert fusions.decode_fusions_self_check("cpu", dtype) is None
    cpu = torch.device("cpu")
    assert fast_paths.rotary_in_attention(True, True, cpu, dtype).choice == "on"
    assert fast_paths.rotary_in_attention(False, True, cpu, dtype).reason == "asked for"
    assert fast_paths.rotary_in_attention(True, False, cpu, dtype).choice == "off"
    monkeypatch.setattr(fast_paths, "_self_checks", {})  # what the CUDA decision runs, with the wrong kernel
    decision = fast_paths._after_self_check("rotary_in_attention", "rotary inside the attention",
                                            fusions.rotary_attention_self_check, cpu, dtype)  # fmt: skip
    assert decision.choice == "reference" and "rotary_paged_decode_attention" in decision.reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "tokens,q_heads,k_heads,head_dim,block_size", [(1, 1, 1, 2, 1), (7, 14, 2, 64, 4), (5, 3, 3, 6, 16), (9, 7, 1, 34, 3)]
)
def test_rotary_kv_write_matches_rotary_then_cache_write(dtype, tokens, q_heads, k_heads, head_dim, block_size):
    """q rotated as rotary_qk does; k rotated and v stored at their slots, padding slots (-1) skipped, every other
    slot of the cache unchanged. q/k/v are strided views of one projection output, as the runner passes them."""
    from kernels.decode_fusions import rotary_kv_write, rotary_kv_write_reference

    qkv = _randn(tokens, q_heads + 2 * k_heads, head_dim, dtype=dtype)
    q, k, v = qkv[:, :q_heads], qkv[:, q_heads : q_heads + k_heads], qkv[:, q_heads + k_heads :]
    angle = _randn(tokens, head_dim // 2, dtype=torch.float32, seed=2) * 3
    cos, sin = torch.cat([angle, angle], -1).cos().to(dtype), torch.cat([angle, angle], -1).sin().to(dtype)
    num_blocks = -(-2 * tokens // block_size) + 1
    key_cache = _randn(num_blocks, block_size, k_heads, head_dim, dtype=dtype, seed=3)
    value_cache = _randn(num_blocks, block_size, k_heads, head_dim, dtype=dtype, seed=4)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(5))[:tokens]
    slots[1::3] = -1
    ref_k, ref_v = key_cache.clone(), value_cache.clone()
    q_ref = rotary_kv_write_reference(q, k, v, cos, sin, ref_k, ref_v, slots)
    q_rot = rotary_kv_write(q, k, v, cos, sin, key_cache, value_cache, slots)
    torch.testing.assert_close(q_rot, q_ref, **TOL[dtype])
    torch.testing.assert_close(key_cache, ref_k, **TOL[dtype])
    assert torch.equal(value_cache, ref_v), "v is copied, not computed: bit-exact"
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    untouched = _randn(num_blocks, block_size, k_heads, head_dim, dtype=dtype, seed=3).reshape(-1, k_heads, head_dim)
    assert torch.equal(key_cache.reshape(-1, k_heads, head_dim)[~written], untouched[~written])


def test_rotary_kv_write_names_bad_inputs():
    from kernels.decode_fusions import rotary_kv_write

    q, k = torch.zeros(2, 4, 8), torch.zeros(2, 2, 8)
    cos = sin = torch.zeros(2, 8)
    cache = torch.zeros(3, 4, 2, 8)
    with pytest.raises(ValueError, match="slots"):
        rotary_kv_write(q, k, k, cos, sin, cache, cache.clone(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="cache's dtype"):
        rotary_kv_write(q, k, k, cos, sin, cache.bfloat16(), cache.bfloat16(), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("q_heads,k_heads,head_dim,block_size", [(4, 2, 16, 4), (6, 2, 24, 8), (3, 1, 32, 16)])
def test_rotary_paged_decode_attention_is_the_write_then_the_attention(dtype, num_splits, q_heads, k_heads, head_dim,
                                                                       block_size):  # fmt: skip
    """One kernel for `rotary_kv_write` + `paged_decode_attention`: the same output and the same caches as the two,
    on rows whose new token falls at a tile's start, inside one, in a split of its own, alone (context 1), and a
    padding row (context 0, slot -1). q/k/v are strided views of one projection output; the cache holds stale
    values at the new tokens' slots, which the kernel must not read."""
    from kernels.decode_fusions import rotary_paged_decode_attention, rotary_paged_decode_attention_reference

    lens = [17, 16, 1, 0, 33, 5]
    rows = len(lens)
    per_row = -(-max(lens) // block_size) + 1
    num_blocks = rows * per_row + 2
    g = torch.Generator().manual_seed(21)
    tables = torch.randperm(num_blocks, generator=g)[: rows * per_row].view(rows, per_row).to(torch.int32)
    context = torch.tensor(lens, dtype=torch.int32)
    slots = torch.tensor([int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1
                          for i, n in enumerate(lens)])  # fmt: skip
    qkv = _randn(rows, q_heads + 2 * k_heads, head_dim, dtype=dtype, seed=22)
    q, k, v = qkv[:, :q_heads], qkv[:, q_heads : q_heads + k_heads], qkv[:, q_heads + k_heads :]
    angle = _randn(rows, head_dim // 2, dtype=torch.float32, seed=23) * 3
    cos, sin = torch.cat([angle, angle], -1).cos().to(dtype), torch.cat([angle, angle], -1).sin().to(dtype)
    key_cache = _randn(num_blocks, block_size, k_heads, head_dim, dtype=dtype, seed=24)  # stale at the slots
    value_cache = _randn(num_blocks, block_size, k_heads, head_dim, dtype=dtype, seed=25)
    ref_k, ref_v = key_cache.clone(), value_cache.clone()
    want = rotary_paged_decode_attention_reference(q, k, v, cos, sin, ref_k, ref_v, slots, tables, context)
    got = rotary_paged_decode_attention(q, k, v, cos, sin, key_cache, value_cache, slots, tables, context,
                                        num_splits=num_splits, block_n=16)  # fmt: skip
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(key_cache.float(), ref_k.float(), **tol)
    assert torch.equal(value_cache, ref_v), "v is copied, not computed"
    assert torch.equal(got[3], torch.zeros_like(got[3])), "a padding row attends to nothing"
    # the stale value at a slot is never read: poisoning the slots changes nothing
    key_cache.view(-1, k_heads, head_dim)[slots[slots >= 0]] = float("nan")
    value_cache.view(-1, k_heads, head_dim)[slots[slots >= 0]] = float("nan")
    again = rotary_paged_decode_attention(q, k, v, cos, sin, key_cache, value_cache, slots, tables, context,
                                          num_splits=num_splits, block_n=16)  # fmt: skip
    assert torch.equal(again, got)


def _summed_in_split_order(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    total = partials[0].clone()
    for split in partials[1:]:
        total += split
    return total.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qkv_splits,num_splits", [(1, 1), (3, 1), (5, 3)])
def test_rotary_paged_decode_attention_sums_partial_products(dtype, qkv_splits, num_splits):
    """q, k, v given as a q/k/v product's fp32 split-K partial sums (strided views of one (splits, rows, width)
    tensor): the output and the caches are those of the same call on the sums rounded to the cache's dtype, bit
    for bit, and the reference's up to the attention's rounding; a padding row stays zero."""
    from kernels.decode_fusions import rotary_paged_decode_attention, rotary_paged_decode_attention_reference

    q_heads, k_heads, head_dim, block_size = 6, 2, 24, 8
    lens = [17, 16, 1, 0, 9]
    rows = len(lens)
    per_row = -(-max(lens) // block_size) + 1
    num_blocks = rows * per_row + 1
    tables = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(40))[: rows * per_row]
    tables = tables.view(rows, per_row).to(torch.int32)
    context = torch.tensor(lens, dtype=torch.int32)
    slots = torch.tensor([int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1
                          for i, n in enumerate(lens)])  # fmt: skip
    partials = _randn(qkv_splits, rows, (q_heads + 2 * k_heads) * head_dim, dtype=torch.float32, seed=41)
    heads = partials.unflatten(-1, (q_heads + 2 * k_heads, head_dim))
    pq, pk, pv = heads[:, :, :q_heads], heads[:, :, q_heads : q_heads + k_heads], heads[:, :, q_heads + k_heads :]
    pk = pk.contiguous()  # a split stride of its own: the kernel must not take q's for k
    q, k, v = (_summed_in_split_order(t, dtype) for t in (pq, pk, pv))
    angle = _randn(rows, head_dim // 2, dtype=torch.float32, seed=42) * 3
    cos, sin = torch.cat([angle, angle], -1).cos().to(dtype), torch.cat([angle, angle], -1).sin().to(dtype)
    key_cache = _randn(num_blocks, block_size, k_heads, head_dim, dtype=dtype, seed=43)
    value_cache = _randn(num_blocks, block_size, k_heads, head_dim, dtype=dtype, seed=44)
    caches = [(key_cache.clone(), value_cache.clone()) for _ in range(3)]
    options = dict(num_splits=num_splits, block_n=16)
    got = rotary_paged_decode_attention(pq, pk, pv, cos, sin, *caches[0], slots, tables, context, **options)
    dense = rotary_paged_decode_attention(q, k, v, cos, sin, *caches[1], slots, tables, context, **options)
    want = rotary_paged_decode_attention_reference(pq, pk, pv, cos, sin, *caches[2], slots, tables, context)
    assert got.dtype == dtype and got.shape == (rows, q_heads, head_dim)
    assert torch.equal(got, dense), "the summed partials are the dense operands"
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(caches[0][0].float(), caches[2][0].float(), **tol)
    assert torch.equal(got[3], torch.zeros_like(got[3]))
    if qkv_splits > 1:  # every split is read: dropping the last one changes the result
        dropped = rotary_paged_decode_attention(pq[:-1], pk[:-1], pv[:-1], cos, sin, key_cache.clone(),
                                                value_cache.clone(), slots, tables, context, **options)  # fmt: skip
        assert not torch.equal(dropped, got)


def test_rotary_paged_decode_attention_names_bad_inputs():
    from kernels.decode_fusions import rotary_paged_decode_attention

    q, k = torch.zeros(2, 4, 8), torch.zeros(2, 2, 8)
    cos = sin = torch.zeros(2, 8)
    cache = torch.zeros(3, 4, 2, 8)
    tables, lens = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="slots"):
        rotary_paged_decode_attention(q, k, k, cos, sin, cache, cache.clone(), torch.zeros(3, dtype=torch.long), tables, lens)
    with pytest.raises(ValueError, match="cache's dtype"):
        rotary_paged_decode_attention(q, k, k, cos, sin, cache.bfloat16(), cache.bfloat16(), torch.zeros(2, dtype=torch.long),
                                      tables, lens)  # fmt: skip
    slots = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="partial sums"):  # partial sums of q, but not of k and v
        rotary_paged_decode_attention(q[None], k, k, cos, sin, cache, cache.clone(), slots, tables, lens)
    with pytest.raises(ValueError, match="partial sums"):  # 16-bit partial sums
        rotary_paged_decode_attention(q[None].bfloat16(), k[None].bfloat16(), k[None].bfloat16(), cos, sin, cache,
                                      cache.clone(), slots, tables, lens)  # fmt: skip
    with pytest.raises(ValueError, match="partial sums"):  # different split counts
        rotary_paged_decode_attention(q.expand(3, -1, -1, -1), k[None], k[None], cos, sin, cache, cache.clone(), slots,
                                      tables, lens)  # fmt: skip
    with pytest.raises(ValueError, match="slots"):  # the rows checked on one split
        rotary_paged_decode_attention(q[None], k[None], k[None], cos, sin, cache, cache.clone(),
                                      torch.zeros(3, dtype=torch.long), tables, lens)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("q_heads,k_heads,head_dim", [(14, 2, 64), (12, 2, 128), (28, 4, 128)])  # 1B, 2B, 8B
@pytest.mark.parametrize("num_splits", [None, 4])
def test_gpu_rotary_paged_decode_attention_matches_the_two_kernels(q_heads, k_heads, head_dim, num_splits):
    """On the GPU (bf16, the default launch: programmatic launch, the cache-dtype dots), at the InternVL3 geometries,
    64 ragged rows and a padding row: the output and the caches of `rotary_kv_write` + `paged_decode_attention`
    (up to bf16 rounding of another summation order), eagerly and replayed from a graph after the inputs changed."""
    from kernels.decode_fusions import rotary_kv_write, rotary_paged_decode_attention
    from kernels.paged_kv import paged_decode_attention

    g = torch.Generator(device="cuda").manual_seed(31)
    block_size, rows = 16, 65
    lens = torch.randint(1, 1400, (rows,), device="cuda", generator=g).to(torch.int32)
    lens[7] = 0
    per_row = -(-1400 // block_size)
    num_blocks = rows * per_row
    tables = torch.randperm(num_blocks, device="cuda", generator=g).view(rows, per_row).to(torch.int32)
    last = (lens - 1).clamp(min=0).long()
    slots = tables[torch.arange(rows, device="cuda"), last // block_size].long() * block_size + last % block_size
    slots[lens == 0] = -1
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
    qkv = r(rows, q_heads + 2 * k_heads, head_dim)
    q, k, v = qkv[:, :q_heads], qkv[:, q_heads : q_heads + k_heads], qkv[:, q_heads + k_heads :]
    angle = torch.rand(rows, head_dim // 2, device="cuda", generator=g) * 6
    cos, sin = torch.cat([angle, angle], -1).cos().bfloat16(), torch.cat([angle, angle], -1).sin().bfloat16()
    key_cache, value_cache = r(num_blocks, block_size, k_heads, head_dim), r(num_blocks, block_size, k_heads, head_dim)

    def two_kernels():
        kc, vc = key_cache.clone(), value_cache.clone()
        q_rot = rotary_kv_write(q, k, v, cos, sin, kc, vc, slots)
        return paged_decode_attention(q_rot, kc, vc, tables, lens, num_splits=num_splits), kc, vc

    kc, vc = key_cache.clone(), value_cache.clone()

    def one_kernel():
        return rotary_paged_decode_attention(q, k, v, cos, sin, kc, vc, slots, tables, lens, num_splits=num_splits)

    want, want_k, want_v = two_kernels()
    got = one_kernel()
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v), "the same rotated k and v in the same slots"
    assert torch.equal(got[7], torch.zeros_like(got[7]))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = one_kernel()
    qkv.normal_()
    kc.copy_(key_cache)
    vc.copy_(value_cache)
    graph.replay()
    want, want_k, want_v = two_kernels()
    torch.testing.assert_close(replayed.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@triton.jit
def _round_to_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    keep = i < n
    tl.store(out_ptr + i, round_to(tl.load(x_ptr + i, mask=keep, other=0.0), DTYPE), mask=keep)


def test_round_to_rounds_to_nearest_even_as_torch():
    """`round_to`'s integer rounding to bf16 gives what torch's cast gives, ties (to even) and NaN included; fp16
    goes through the cast."""
    g = torch.Generator().manual_seed(41)
    x = torch.randn(200, generator=g) * torch.logspace(-8, 8, 200)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x40490000 | 0x8000], dtype=torch.int64).to(torch.int32)
    x = torch.cat([x, ties.view(torch.float32), torch.tensor([0.0, -0.0, 1.0])])
    for dtype, tl_dtype in ((torch.bfloat16, tl.bfloat16), (torch.float16, tl.float16)):
        values = x if dtype == torch.bfloat16 else x[x.abs() < 6e4]  # within fp16's range
        out = torch.empty_like(values)
        _round_to_kernel[(1,)](values, out, values.numel(), DTYPE=tl_dtype, BLOCK=256)
        assert torch.equal(out, values.to(dtype).float()), dtype
    # NaNs whose bits would carry into inf or zero under the rounding (the GPU's canonical NaN is 0x7FFFFFFF)
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7FFF8000, 0x7F800001, 0x7FC00000], dtype=torch.int64).to(torch.int32)
    nans = nans.view(torch.float32)
    out = torch.empty_like(nans)
    _round_to_kernel[(1,)](nans, out, nans.numel(), DTYPE=tl.bfloat16, BLOCK=8)
    assert torch.isnan(out).all(), out
