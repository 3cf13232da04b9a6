"""Paged multimodal KV cache: block pool, write kernel, paged attention, visual-prefix sharing.

The cache of every layer is a pool of fixed-size blocks, ``[num_blocks, block_size, kv_heads, head_dim]`` for K
and the same for V (all layers live in one tensor, ``[layers, num_blocks, ...]``, so that copying a block is one
op). A sequence owns a *block table*: the list of blocks that hold its positions ``0, 1, 2, ...`` in order. Slot
``block * block_size + offset`` is where one token's K/V lives.

Left padding never reaches the cache: a sequence stores only its real tokens, at their position ids (which start at
0 at the first real token), so a row's attention reads exactly ``context_len`` slots and needs no mask.

Visual-prefix sharing. Rows whose prompts start with the same image and the same tokens share the full blocks of
that prefix. Each full block is keyed by a chain hash: ``h_i = sha256(h_{i-1} || tokens of block i)`` with
``h_{-1}`` a digest of the row's pixel content, so a block is found only when the image and every token before it
match. Shared blocks are reference-counted and return to the free list when the count drops to 0. A sequence forked
from another (n samples of one prompt) shares all of its blocks, the partial last one included; the first write
into a shared partial block copies it first (copy-on-write). So n samples per question, or several questions about
one image, pay for the image's KV once.

Kernels (each with a pure-PyTorch reference of the same name plus ``_reference``):

- `paged_kv_write`: stores new K/V at slot indices; slot -1 (padding) is skipped.
- `paged_decode_attention`: one query per row (latent steps and decoding), GQA, per-row context lengths, split-K
  over the context (each split computes a partial softmax; a reduce kernel merges them with log-sum-exp).
- `paged_chunk_attention`: a packed chunk of queries per sequence continuing from cached blocks (prefill), each
  query with its own visible length (causal inside the chunk when ``visible = cached + i + 1``).

Interpreter notes (TRITON_INTERPRET=1): loads are upcast to fp32 before any arithmetic (bf16 math is wrong in the
interpreter); ``tl.dot`` runs in TF32 for 16-bit caches (exact for bf16/fp16 inputs: their mantissas fit) and in
IEEE fp32 for fp32 caches; the GQA group is padded to 16 rows because the GPU wants every dot dimension >= 16.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from typing import Sequence

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Interpreted programs cost ~0.5 ms each whatever their size: fewer, larger programs there.
_WRITE_TOKENS_PER_PROGRAM = 256 if _INTERPRETED else 8

# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _paged_kv_write_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    num_tokens,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_cb,
    stride_co,
    stride_ch,
    block_size,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    """One program: BLOCK_T tokens x all their (kv_head, dim) values."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    t_mask = t < num_tokens
    slot = tl.load(slot_ptr + t, mask=t_mask, other=-1).to(tl.int64)
    keep = t_mask & (slot >= 0)  # slot -1 marks a padding token: nothing is stored
    c = tl.arange(0, BLOCK_HD)
    h = (c // HEAD_DIM).to(tl.int64)
    d = (c % HEAD_DIM).to(tl.int64)
    mask = keep[:, None] & (c < NUM_HEADS * HEAD_DIM)[None, :]
    k = tl.load(key_ptr + t[:, None] * stride_kn + (h * stride_kh + d)[None, :], mask=mask)
    v = tl.load(value_ptr + t[:, None] * stride_vn + (h * stride_vh + d)[None, :], mask=mask)
    row = (slot // block_size) * stride_cb + (slot % block_size) * stride_co
    dst = row[:, None] + (h * stride_ch + d)[None, :]
    tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_ml_ptr,
    scale_log2e,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_tb,
    stride_ob,
    stride_oh,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_mlb,
    stride_mlh,
    stride_mls,
    block_size,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_CACHE_DTYPE: tl.constexpr,
    WIDEN_16BIT_DOTS: tl.constexpr,
):
    """One program: one row, one KV head (its GQA group of query heads as the dot's rows), one context split.

    DOT_IN_CACHE_DTYPE: both dots take the cache's (16-bit) dtype, q and the probabilities rounded to it, with fp32
    accumulation (as FlashAttention does): K/V tiles stay 16-bit in registers instead of being widened to fp32.
    WIDEN_16BIT_DOTS (the CPU interpreter, whose 16-bit dots are wrong): the same rounding, dots in fp32."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    context = tl.load(context_lens_ptr + b)
    # Splits are balanced per row at run time, so a fixed grid (a CUDA graph) serves any context length.
    per_split = tl.cdiv(tl.cdiv(context, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, context)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g.to(tl.int64)
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    if DOT_IN_CACHE_DTYPE:
        q = q.to(key_cache_ptr.dtype.element_ty)
    if WIDEN_16BIT_DOTS or not DOT_IN_CACHE_DTYPE:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + b * stride_tb
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        block = tl.load(table_row + n // block_size, mask=n_mask, other=0).to(tl.int64)
        row = block * stride_cb + (n % block_size).to(tl.int64) * stride_co + kv_head * stride_ch
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(key_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if WIDEN_16BIT_DOTS or not DOT_IN_CACHE_DTYPE:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # (GROUP_PAD, BLOCK_N), log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(value_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if DOT_IN_CACHE_DTYPE and WIDEN_16BIT_DOTS:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision=DOT_PRECISION)
            acc = acc * alpha[:, None] + pv
        elif DOT_IN_CACHE_DTYPE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
        m_i = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # a row with no context (a padding row) gets zeros
        out = acc / l_safe[:, None]
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        split64 = split.to(tl.int64)
        part = part_out_ptr + b * stride_pb + heads[:, None] * stride_ph + split64 * stride_ps + d[None, :]
        tl.store(part, acc, mask=out_mask)
        ml = part_ml_ptr + b * stride_mlb + heads * stride_mlh + split64 * stride_mls
        tl.store(ml, m_i, mask=g_mask)  # running max (log2 units)
        tl.store(ml + 1, l_i, mask=g_mask)  # softmax denominator relative to that max


@triton.jit
def _paged_decode_reduce_kernel(
    part_out_ptr,
    part_ml_ptr,
    out_ptr,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_mlb,
    stride_mlh,
    stride_mls,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge the splits of one (row, query head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    d_mask = d < HEAD_DIM
    ml = part_ml_ptr + b * stride_mlb + h * stride_mlh + s.to(tl.int64) * stride_mls
    m = tl.load(ml, mask=s_mask, other=float("-inf"))
    l = tl.load(ml + 1, mask=s_mask, other=0.0)
    m_max = tl.maximum(tl.max(m, 0), -1.0e30)  # finite even when every split is empty (context 0)
    w = tl.exp2(m - m_max)  # empty splits: exp2(-inf) = 0
    acc = tl.load(
        part_out_ptr + b * stride_pb + h * stride_ph + s.to(tl.int64)[:, None] * stride_ps + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    den_vec = tl.zeros([BLOCK_D], tl.float32) + den
    out = num / tl.where(den_vec > 0.0, den_vec, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _paged_chunk_kernel(
    q_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    query_start_ptr,
    visible_ptr,
    out_ptr,
    scale_log2e,
    stride_qn,
    stride_qh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_tb,
    stride_on,
    stride_oh,
    block_size,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    QUERIES_PER_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: QUERIES_PER_TILE queries of one sequence x the GROUP query heads of one KV head.

    The dot's rows are (query, head-in-group) pairs, row r = query (r // GROUP), head (r % GROUP), so one K/V tile
    load serves every query head of the group.
    """
    seq = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2).to(tl.int64)
    q_start = tl.load(query_start_ptr + seq)
    q_end = tl.load(query_start_ptr + seq + 1)
    first = q_start + tile * QUERIES_PER_TILE
    if first < q_end:
        r = tl.arange(0, BLOCK_M)
        qi = (first + r // GROUP).to(tl.int64)
        heads = kv_head * GROUP + (r % GROUP).to(tl.int64)
        row_mask = (r < QUERIES_PER_TILE * GROUP) & (qi < q_end)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        q_mask = row_mask[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + qi[:, None] * stride_qn + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
        q = q.to(tl.float32)
        visible = tl.load(visible_ptr + qi, mask=row_mask, other=0)
        kv_end = tl.max(visible, 0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table_row = block_tables_ptr + seq * stride_tb
        for n0 in range(0, kv_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_mask = n < kv_end
            block = tl.load(table_row + n // block_size, mask=n_mask, other=0).to(tl.int64)
            row = block * stride_cb + (n % block_size).to(tl.int64) * stride_co + kv_head * stride_ch
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(key_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # (BLOCK_M, BLOCK_N)
            s = tl.where(n[None, :] < visible[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet stay at zero
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(value_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(
            out_ptr + qi[:, None] * stride_on + heads[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=q_mask,
        )


# ----------------------------------------------------------------------------------------------------- launchers


def _dot_precision(dtype: torch.dtype) -> str:
    # 16-bit inputs are exact in TF32 (7 or 10 mantissa bits); fp32 caches keep full precision.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache and value_cache must both be [num_blocks, block_size, kv_heads, head_dim], got "
            f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1:
        raise ValueError(
            f"key_cache and value_cache need the same strides and a contiguous head_dim, got {key_cache.stride()} "
            f"and {value_cache.stride()}"
        )


def _check_queries(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Checks of the attention entry points: the caches, and q (rows, q_heads, head_dim) against them. Returns
    q with a contiguous last dimension and the GQA group size (query heads per KV head)."""
    _check_cache(key_cache, value_cache)
    if q.dim() != 3 or q.shape[2] != key_cache.shape[3] or q.shape[1] % key_cache.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit the cache {tuple(key_cache.shape)}: q must be (rows, q_heads, "
            "head_dim) with the cache's head_dim and q_heads a multiple of kv_heads"
        )
    return (q if q.stride(-1) == 1 else q.contiguous()), q.shape[1] // key_cache.shape[2]


def paged_kv_write(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` (N, kv_heads, head_dim) at ``slot_mapping`` (N,) slots of the caches, in place.

    Slot ``s`` is block ``s // block_size``, offset ``s % block_size``; slot -1 (a padding token) is skipped.
    """
    _check_cache(key_cache, value_cache)
    n, heads, head_dim = key.shape
    if value.shape != key.shape or key_cache.shape[2:] != (heads, head_dim) or slot_mapping.shape != (n,):
        raise ValueError(
            f"paged_kv_write shapes: key {tuple(key.shape)}, value {tuple(value.shape)}, cache "
            f"{tuple(key_cache.shape)}, slots {tuple(slot_mapping.shape)}"
        )
    if n == 0:
        return
    if key.dtype != key_cache.dtype:  # rounded by PyTorch (the interpreter truncates fp32 -> bf16 casts)
        key, value = key.to(key_cache.dtype), value.to(value_cache.dtype)
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    block_t = min(_WRITE_TOKENS_PER_PROGRAM, triton.next_power_of_2(n))
    _paged_kv_write_kernel[(triton.cdiv(n, block_t),)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        n,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        key_cache.shape[1],
        NUM_HEADS=heads,
        HEAD_DIM=head_dim,
        BLOCK_T=block_t,
        BLOCK_HD=triton.next_power_of_2(heads * head_dim),
    )


def paged_kv_write_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[keep].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[keep].to(value_cache.dtype)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def choose_num_splits(
    batch: int, kv_heads: int, max_context: int, device: torch.device | str, *, block_n: int = 64
) -> int:
    """Context splits per (row, KV head): about four programs per SM (enough loads in flight to stream the cache
    at full bandwidth), each split at least two tiles long. Needs no device sync (``max_context`` is a bound)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    programs = max(1, batch * kv_heads)
    want = triton.cdiv(4 * _sm_count(device), programs)
    most = max(1, max_context // (2 * block_n))
    return int(max(1, min(want, most, 32)))


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int | None = None,
    dot_in_cache_dtype: bool = False,
) -> torch.Tensor:
    """Attention of one query per row over that row's paged context.

    q: (B, q_heads, head_dim); caches: [num_blocks, block_size, kv_heads, head_dim]; block_tables: (B, max_blocks)
    int32; context_lens: (B,) int32 (the row's positions 0..len-1 are visible; 0 gives a zero output). Query head h
    reads KV head ``h // (q_heads // kv_heads)``. ``num_splits`` > 1 splits each row's context into that many
    partitions merged with log-sum-exp (None: chosen from the batch, the GPU and the table width, without reading
    the lengths back to the host). ``dot_in_cache_dtype`` (16-bit caches): the score and value products in the
    cache's dtype with fp32 accumulation, q and the softmax probabilities rounded to it (default: fp32 operands).
    Returns (B, q_heads, head_dim) in q's dtype.
    """
    q, group = _check_queries(q, key_cache, value_cache)
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = key_cache.shape
    for name, value, least in (("block_n", block_n, 16), ("num_warps", num_warps, 1)):
        if value < least or value & (value - 1):  # tl.arange and tl.dot tiles: powers of two, dots >= 16
            raise ValueError(f"{name} must be a power of two >= {least}, got {value}")
    if block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} must have "
            f"{batch} rows"
        )
    scale = head_dim**-0.5 if scale is None else scale
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, block_tables.shape[1] * block_size, q.device, block_n=block_n)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    if num_splits > 1:
        part_out = torch.empty(batch, q_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_ml = torch.empty(batch, q_heads, num_splits, 2, device=q.device, dtype=torch.float32)
    else:
        part_out, part_ml = out, out  # unused
    po_strides = part_out.stride()[:3] if num_splits > 1 else (0, 0, 0)
    ml_strides = part_ml.stride()[:3] if num_splits > 1 else (0, 0, 0)
    _paged_decode_kernel[(batch, kv_heads, num_splits)](
        q,
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        out,
        part_out,
        part_ml,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        *po_strides,
        *ml_strides,
        block_size,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=_dot_precision(key_cache.dtype),
        DOT_IN_CACHE_DTYPE=bool(dot_in_cache_dtype and key_cache.dtype in (torch.bfloat16, torch.float16)),
        WIDEN_16BIT_DOTS=q.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}),
    )
    if num_splits > 1:
        _paged_decode_reduce_kernel[(batch, q_heads)](
            part_out,
            part_ml,
            out,
            *po_strides,
            *ml_strides,
            out.stride(0),
            out.stride(1),
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            num_warps=1 if head_dim <= 64 else 2,
        )
    return out


def paged_chunk_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    visible_lens: torch.Tensor,
    *,
    max_query_len: int,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """Attention of packed query chunks over their sequences' paged caches (prefill continuing from cache).

    q: (N, q_heads, head_dim), sequence s owning rows ``query_start_loc[s] : query_start_loc[s + 1]`` (an empty
    chunk is allowed); block_tables: (S, max_blocks); visible_lens: (N,) int32, query i sees its sequence's
    positions ``0 .. visible_lens[i] - 1`` (causal inside the chunk when the chunk's K/V are written first and
    ``visible = cached + i + 1``). ``max_query_len`` (host int) sizes the grid without a device sync.
    """
    q, group = _check_queries(q, key_cache, value_cache)
    n, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = key_cache.shape
    num_seqs = query_start_loc.shape[0] - 1
    if block_tables.shape[0] != num_seqs or visible_lens.shape != (n,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} must have one row per sequence ({num_seqs}) and visible_lens "
            f"{tuple(visible_lens.shape)} one entry per query ({n})"
        )
    block_m = max(16, triton.next_power_of_2(max(block_m, group)))
    queries_per_tile = block_m // group
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    if n == 0 or num_seqs == 0 or max_query_len <= 0:
        return out
    grid = (num_seqs, triton.cdiv(max_query_len, queries_per_tile), kv_heads)
    _paged_chunk_kernel[grid](
        q,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        visible_lens,
        out,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        block_size,
        GROUP=group,
        BLOCK_M=block_m,
        QUERIES_PER_TILE=queries_per_tile,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(key_cache.dtype),
        num_warps=num_warps,
    )
    return out


# ----------------------------------------------------------------------------------------------------- references


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Positions ``0 .. length-1`` of one sequence from a [num_blocks, block_size, kv_heads, head_dim] cache."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_table.to(cache.device).long()[pos // block_size]
    return cache[blocks, pos % block_size]  # (length, kv_heads, head_dim)


def _attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q (M, Hq, D) over k/v (L, Hkv, D) (every query sees all L) in fp32; L == 0 gives zeros."""
    if k.shape[0] == 0:
        return torch.zeros_like(q, dtype=torch.float32)
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,lhd->hml", q.float(), k) * scale
    return torch.einsum("hml,lhd->mhd", scores.softmax(-1), v)


def paged_decode_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Gather each row's context from the pool, then plain softmax attention (fp32)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for b, length in enumerate(context_lens.tolist()):
        k = gather_kv(key_cache, block_tables[b], length)
        v = gather_kv(value_cache, block_tables[b], length)
        out[b] = _attend_reference(q[b : b + 1], k, v, scale)[0].to(q.dtype)
    return out


def paged_chunk_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    visible_lens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    visible = visible_lens.tolist()
    for s in range(len(starts) - 1):
        for i in range(starts[s], starts[s + 1]):
            k = gather_kv(key_cache, block_tables[s], visible[i])
            v = gather_kv(value_cache, block_tables[s], visible[i])
            out[i] = _attend_reference(q[i : i + 1], k, v, scale)[0].to(q.dtype)
    return out


# ----------------------------------------------------------------------------------------------------- the pool


class PoolExhaustedError(RuntimeError):
    """The block pool has too few free blocks for a request; nothing was allocated."""

    def __init__(self, needed: int, free: int, block_size: int, num_blocks: int):
        self.needed, self.free, self.block_size, self.num_blocks = needed, free, block_size, num_blocks
        super().__init__(
            f"paged KV pool exhausted: {needed} block(s) of {block_size} tokens needed, {free} free of {num_blocks}. "
            f"Give the cache more blocks (num_blocks >= {num_blocks + needed - free}), lower the batch size or "
            "max_new_tokens, or free finished sequences first."
        )


def image_digest(pixel_values: torch.Tensor | None) -> bytes:
    """sha256 of the pixel content (shape, dtype and bytes); b'' when there is no image."""
    if pixel_values is None or pixel_values.numel() == 0:
        return b""
    t = pixel_values.detach().contiguous().cpu()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, seed: bytes = b"") -> list[bytes]:
    """Chain hashes of the full blocks of ``token_ids``: h_i = sha256(h_{i-1} || tokens of block i), h_{-1} = seed."""
    hashes, h = [], hashlib.sha256(b"paged-kv|" + seed).digest()
    for i in range(len(token_ids) // block_size):
        chunk = token_ids[i * block_size : (i + 1) * block_size]
        h = hashlib.sha256(h + b"|" + ",".join(str(int(t)) for t in chunk).encode()).digest()
        hashes.append(h)
    return hashes


class BlockAllocator:
    """Free list, reference counts and the hash -> block table of shareable full blocks (host-side)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise PoolExhaustedError(count, len(self._free), self.block_size, self.num_blocks)
        blocks = [self._free.popleft() for _ in range(count)]
        for blk in blocks:
            self.ref_counts[blk] = 1
        return blocks

    def share(self, block: int) -> int:
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} is free; only allocated blocks can be shared")
        self.ref_counts[block] += 1
        return block

    def release(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} is already free (double release)")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            h = self._hash_of.pop(block, None)
            if h is not None and self._by_hash.get(h) == block:
                del self._by_hash[h]
            self._free.append(block)

    def lookup(self, block_hash: bytes) -> int | None:
        return self._by_hash.get(block_hash)

    def register(self, block: int, block_hash: bytes) -> None:
        if block_hash not in self._by_hash:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash


class PagedKVCache:
    """K/V block pools of every layer plus the block tables of live sequences.

    Typical use for a batch: for each row in order, ``add_sequence`` (finds shared prefix blocks; returns how many
    leading positions are already provided) then ``reserve`` (allocates the rest of the prompt; blocks that carry a
    prefix hash are registered so later rows find them). The owner of a registered block writes it in the same
    layer pass in which the later rows first read it (every layer writes K/V before it attends), so rows of one
    batch share prefix blocks without any ordering between rows. ``fork`` shares a whole sequence (n samples);
    ``reserve`` copies a shared partial last block before it is written into (copy-on-write).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        enable_prefix_sharing: bool = True,
    ):
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        self.num_layers = num_layers
        self.enable_prefix_sharing = enable_prefix_sharing
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device)
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}  # positions with a slot (reserved), per sequence
        self._pending_hashes: dict[int, list[bytes]] = {}  # prefix hashes of blocks not yet allocated

    # -- shapes and views
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def device(self) -> torch.device:
        return self.key.device

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key_cache, value_cache) of one layer, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self.key[index], self.value[index]

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used

    # -- sequences
    def add_sequence(self, seq_id: int, shareable_tokens: Sequence[int] = (), *, seed: bytes = b"") -> int:
        """Start a sequence; return the number of leading positions served by shared blocks (a multiple of the
        block size). ``shareable_tokens`` are the prompt tokens whose K/V depend only on themselves and the image
        (``seed`` = its digest); only their full blocks are keyed."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already exists")
        hashes = prefix_block_hashes(shareable_tokens, self.block_size, seed) if self.enable_prefix_sharing else []
        table: list[int] = []
        for h in hashes:
            block = self.allocator.lookup(h)
            if block is None:
                break
            table.append(self.allocator.share(block))
        self.tables[seq_id] = table
        self.lengths[seq_id] = len(table) * self.block_size
        self._pending_hashes[seq_id] = hashes[len(table) :]
        return self.lengths[seq_id]

    def fork(self, parent: int, child: int) -> None:
        """``child`` shares every block of ``parent`` (the partial last one too, copied on its first write)."""
        if child in self.tables:
            raise ValueError(f"sequence {child} already exists")
        self.tables[child] = [self.allocator.share(b) for b in self.tables[parent]]
        self.lengths[child] = self.lengths[parent]
        self._pending_hashes[child] = []

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Blocks ``reserve(seq_id, num_tokens)`` would allocate (copy-on-write included)."""
        length, table = self.lengths[seq_id], self.tables[seq_id]
        if num_tokens <= length:
            return 0
        new = triton.cdiv(num_tokens, self.block_size) - len(table)
        cow = length % self.block_size != 0 and self.allocator.ref_counts[table[length // self.block_size]] > 1
        return new + int(cow)

    def reserve(self, seq_id: int, num_tokens: int) -> list[tuple[int, int]]:
        """Give positions ``< num_tokens`` slots. Returns the changed table entries as (index, block)."""
        needed = self.blocks_needed(seq_id, num_tokens)
        if needed > self.allocator.num_free:
            raise PoolExhaustedError(needed, self.allocator.num_free, self.block_size, self.num_blocks)
        length, table = self.lengths[seq_id], self.tables[seq_id]
        if num_tokens <= length:
            return []
        changed = []
        if length % self.block_size:
            index = length // self.block_size
            old = table[index]
            if self.allocator.ref_counts[old] > 1:  # copy-on-write of a shared partial block
                (new,) = self.allocator.allocate(1)
                self.key[:, new] = self.key[:, old]
                self.value[:, new] = self.value[:, old]
                self.allocator.release(old)
                table[index] = new
                changed.append((index, new))
        grow = triton.cdiv(num_tokens, self.block_size) - len(table)
        pending = self._pending_hashes[seq_id]
        for blk in self.allocator.allocate(max(0, grow)):
            index = len(table)
            table.append(blk)
            changed.append((index, blk))
            if pending:
                self.allocator.register(blk, pending.pop(0))
        self.lengths[seq_id] = num_tokens
        return changed

    def free_sequence(self, seq_id: int) -> None:
        for block in self.tables.pop(seq_id):
            self.allocator.release(block)
        del self.lengths[seq_id]
        self._pending_hashes.pop(seq_id, None)

    def free_all(self) -> None:
        for seq_id in list(self.tables):
            self.free_sequence(seq_id)

    def slot(self, seq_id: int, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def block_table(self, seq_ids: Sequence[int], width: int | None = None, device=None) -> torch.Tensor:
        """(len(seq_ids), width) int32 block tables, unused entries 0 (never read: reads stop at the length)."""
        width = max((len(self.tables[s]) for s in seq_ids), default=0) if width is None else width
        out = torch.zeros(len(seq_ids), max(width, 1), dtype=torch.int32)
        for row, s in enumerate(seq_ids):
            table = self.tables[s]
            if len(table) > width:
                raise ValueError(f"sequence {s} has {len(table)} blocks, more than the table width {width}")
            out[row, : len(table)] = torch.tensor(table, dtype=torch.int32)
        return out.to(self.device if device is None else device)
