"""The kernels' public entry points given what a caller may well pass: strided index tensors and weights (the
kernels read them by position, so a view gave wrong results without a word), arguments of the wrong kind (a
named error, not an interpreter traceback), and launch settings that would leave the output unwritten."""

from __future__ import annotations

import pytest
import torch

from kernels.decode_fusions import (
    rms_norm,
    rms_norm_reference,
    rotary_kv_write,
    rotary_kv_write_reference,
    rotary_paged_decode_attention,
    rotary_paged_decode_attention_reference,
)
from kernels.decode_linear import decode_linear_config
from kernels.layer_grads import rms_norm_grad
from kernels.paged_chunk_attention import paged_chunk_attention, paged_chunk_attention_reference
from kernels.paged_kv import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_kv_write,
    paged_kv_write_reference,
)


def assert_close(got, want):
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view with stride 2 along its last dimension (every other column of a wider tensor,
    the other columns holding values that would be wrong, or out of range, to read)."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), 10**6, dtype=t.dtype)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def _column_major(t: torch.Tensor) -> torch.Tensor:
    view = t.t().contiguous().t()
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def _pool(num_blocks=16, block_size=4, kv_heads=2, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g),
            torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g))  # fmt: skip


def test_paged_kv_write_reads_a_strided_slot_mapping_by_value():
    key_cache, value_cache = _pool()
    g = torch.Generator().manual_seed(1)
    key, value = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    slots = torch.tensor([3, 17, -1, 40, 62])
    want_k, want_v = key_cache.clone(), value_cache.clone()
    paged_kv_write_reference(key, value, want_k, want_v, slots)
    got_k, got_v = key_cache.clone(), value_cache.clone()
    paged_kv_write(key, value, got_k, got_v, _strided(slots))
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def _attention_case():
    key_cache, value_cache = _pool()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 4, 16, generator=g)
    tables = torch.randperm(16, generator=g).view(4, 4).to(torch.int32)
    lengths = torch.tensor([4, 5, 16, 1], dtype=torch.int32)
    return q, key_cache, value_cache, tables, lengths


@pytest.mark.parametrize("which", ["block_tables", "context_lens"])
def test_paged_decode_attention_reads_strided_tables_and_lengths_by_value(which):
    q, key_cache, value_cache, tables, lengths = _attention_case()
    want = paged_decode_attention_reference(q, key_cache, value_cache, tables, lengths)
    if which == "block_tables":
        tables = _column_major(tables)
    else:
        lengths = _strided(lengths)
    got = paged_decode_attention(q, key_cache, value_cache, tables, lengths, block_n=16)
    assert_close(got, want)


@pytest.mark.parametrize("which", ["block_tables", "query_start_loc", "visible_lens"])
def test_paged_chunk_attention_reads_strided_index_tensors_by_value(which):
    q, key_cache, value_cache, tables, _ = _attention_case()
    tables = tables[:2]
    starts = torch.tensor([0, 1, 4], dtype=torch.int32)
    visible = torch.tensor([13, 14, 15, 16], dtype=torch.int32)
    want = paged_chunk_attention_reference(q, key_cache, value_cache, tables, starts, visible)
    args = {"block_tables": tables, "query_start_loc": starts, "visible_lens": visible}
    args[which] = _column_major(tables) if which == "block_tables" else _strided(args[which])
    got = paged_chunk_attention(q, key_cache, value_cache, args["block_tables"], args["query_start_loc"],
                                args["visible_lens"], max_query_len=3, block_n=16)  # fmt: skip
    assert_close(got, want)


def test_rotary_writes_go_to_the_values_of_strided_slots():
    key_cache, value_cache = _pool()
    g = torch.Generator().manual_seed(3)
    n = 3
    q, k, v = torch.randn(n, 4, 16, generator=g), torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g)
    angle = torch.rand(n, 8, generator=g) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    slots = torch.tensor([5, 22, 41])
    want_k, want_v = key_cache.clone(), value_cache.clone()
    want = rotary_kv_write_reference(q, k, v, cos, sin, want_k, want_v, slots)
    got_k, got_v = key_cache.clone(), value_cache.clone()
    got = rotary_kv_write(q, k, v, cos, sin, got_k, got_v, _strided(slots))
    assert_close(got, want)
    assert_close(got_k, want_k)
    assert_close(got_v, want_v)

    # the fused step: each row's new token is its last position, at its own slot
    tables = torch.arange(12, dtype=torch.int32).view(3, 4)
    lengths = torch.tensor([6, 9, 16], dtype=torch.int32)
    slots = torch.stack([tables[b, (lengths[b] - 1) // 4] * 4 + (lengths[b] - 1) % 4 for b in range(n)]).long()
    want_k, want_v = key_cache.clone(), value_cache.clone()
    want = rotary_paged_decode_attention_reference(q, k, v, cos, sin, want_k, want_v, slots, tables, lengths)
    got_k, got_v = key_cache.clone(), value_cache.clone()
    got = rotary_paged_decode_attention(q, k, v, cos, sin, got_k, got_v, _strided(slots), tables, _strided(lengths),
                                        block_n=16, num_splits=1)  # fmt: skip
    assert_close(got, want)
    assert_close(got_k, want_k)


def test_rms_norm_reads_a_strided_weight_by_value_forward_and_backward():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 24, generator=g)
    wide = torch.randn(24, 2, generator=g)
    assert_close(rms_norm(x, wide[:, 0], 1e-6), rms_norm_reference(x, wide[:, 0].contiguous(), 1e-6))
    wide.requires_grad_()
    weight = wide[:, 0]  # a strided view: its gradient reaches the wide tensor's first column
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    wr = wide[:, 0].detach().clone().requires_grad_()
    out, ref = rms_norm_grad(xs, weight, 1e-6), rms_norm_reference(xr, wr, 1e-6)
    grad = torch.randn(ref.shape, generator=g)
    out.backward(grad)
    ref.backward(grad)
    assert_close(out, ref)
    assert_close(xs.grad, xr.grad)
    assert_close(wide.grad[:, 0], wr.grad)


def test_wrong_arguments_are_named():
    q, key_cache, value_cache, tables, lengths = _attention_case()
    with pytest.raises(ValueError, match=r"num_splits must be >= 1"):
        paged_decode_attention(q, key_cache, value_cache, tables, lengths, num_splits=0)
    with pytest.raises(ValueError, match=r"block_tables must be a 2-D integer tensor, got 1-D"):
        paged_decode_attention(q, key_cache, value_cache, tables[0], lengths)
    with pytest.raises(ValueError, match=r"context_lens must hold integers .* got torch.float32"):
        paged_decode_attention(q, key_cache, value_cache, tables, lengths.float())
    with pytest.raises(ValueError, match=r"q is on meta, the caches on cpu"):
        paged_decode_attention(q.to("meta"), key_cache, value_cache, tables, lengths)
    with pytest.raises(ValueError, match=r"key must be \(N, kv_heads, head_dim\)"):
        paged_kv_write(q[:, 0], q[:, 0], key_cache, value_cache, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"max_query_len=2 but a chunk holds 3 queries"):
        paged_chunk_attention(q, key_cache, value_cache, tables[:2], torch.tensor([0, 1, 4], dtype=torch.int32),
                              lengths, max_query_len=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"block_n must be a power of two >= 16, got 48"):
        paged_chunk_attention(q, key_cache, value_cache, tables[:2], torch.tensor([0, 1, 4], dtype=torch.int32),
                              lengths, max_query_len=3, block_n=48)  # fmt: skip
    with pytest.raises(ValueError, match=r"weight \(torch.float32, cpu\) must have x's dtype and device \(torch.bfloat16"):
        rms_norm(torch.randn(2, 8).bfloat16(), torch.ones(8), 1e-6)  # torch would return fp32 here, the kernel bf16
    assert decode_linear_config(1, 896, 0, 132).splits == 1  # an empty reduction: one (zero) split, no ZeroDivision
