"""Paged chunk attention: packed query chunks continuing from cached blocks (prefill over a paged KV cache).

A multi-position pass of the paged runner (`engine/model/paged/`) computes a chunk of positions per sequence whose
K/V it has just written into the paged cache (`kernels/paged_kv.py` layout); each query i attends to its sequence's
positions ``0 .. visible_i - 1``, causal inside the chunk when ``visible = cached + i + 1``. One program handles a
tile of queries of one sequence and one KV head: the GQA group's query heads share each K/V tile read.

`paged_chunk_attention` and its reference `paged_chunk_attention_reference`; interpreter notes as in
`kernels/paged_kv.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.paged_kv import LOG2E, _attend_reference, _check_queries, _dot_precision, gather_kv, index_tensor


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
            # (BLOCK_M, BLOCK_N); fp32 again, as torch.compile passes Python floats to user kernels as fp64
            s = (tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e).to(tl.float32)
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
    ``visible = cached + i + 1``). ``max_query_len`` (host int) sizes the grid without a device sync: it must be
    at least the longest chunk (checked where ``query_start_loc`` is on the host).
    """
    q, group = _check_queries(q, key_cache, value_cache)
    n, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = key_cache.shape
    block_tables = index_tensor(block_tables, "block_tables", 2, key_cache.device)
    query_start_loc = index_tensor(query_start_loc, "query_start_loc", 1, key_cache.device)
    visible_lens = index_tensor(visible_lens, "visible_lens", 1, key_cache.device)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if query_start_loc.device.type == "cpu" and query_start_loc.numel() > 1:  # free to check here, a sync elsewhere
        longest = int((query_start_loc[1:] - query_start_loc[:-1]).max())
        if longest > max_query_len:
            raise ValueError(f"max_query_len={max_query_len} but a chunk holds {longest} queries: its rows past "
                             "max_query_len would be left unwritten")
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
