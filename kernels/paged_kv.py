"""Paged KV cache kernels: the K/V write and the one-query decode attention over block tables.

Layout (host bookkeeping in `engine/model/paged/cache.py`): every layer's cache is a pool of fixed-size blocks,
``[num_blocks, block_size, kv_heads, head_dim]`` for K and the same for V; a sequence's block table lists the blocks
that hold its positions ``0, 1, 2, ...`` in order; slot ``block * block_size + offset`` is where one token's K/V
lives. Left padding never reaches the cache, so a row's attention reads exactly ``context_len`` slots, no mask.

Kernels (each with a pure-PyTorch reference of the same name plus ``_reference``):

- `paged_kv_write`: stores new K/V at slot indices; slot -1 (padding) is skipped.
- `paged_decode_attention`: one query per row (latent steps and decoding), GQA, per-row context lengths, split-K
  over the context (each split computes a partial softmax; a reduce kernel merges them with log-sum-exp). Its
  kernel also has a mode that first rotates q and the row's new token and stores the new K/V
  (`decode_attention_launch` with ``rotary``; the public entry point and its reference are
  `kernels.decode_fusions.rotary_paged_decode_attention`), in which q and the new K/V may also be read as the
  q/k/v product's fp32 split-K partial sums and summed (`kernels.decode_linear`).

Jit helpers shared with `kernels.decode_fusions`: `round_to` (a rounding to bf16 the compiler cannot fold away),
`rotary_tables` and `rotated` (the rotary embedding's tables and arithmetic, rounded as transformers rounds it).

The chunk (prefill) attention over the same layout is `kernels/paged_chunk_attention.py`.

Interpreter notes (TRITON_INTERPRET=1): loads are upcast to fp32 before any arithmetic (bf16 math is wrong in the
interpreter); ``tl.dot`` runs in TF32 for 16-bit caches (exact for bf16/fp16 inputs: their mantissas fit) and in
IEEE fp32 for fp32 caches; the GQA group is padded to 16 rows because the GPU wants every dot dimension >= 16.
"""
from __future__ import annotations

import os

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
def round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (to nearest, ties to even), as fp32. For bf16 by integer arithmetic: a
    ``.to(bf16).to(fp32)`` round trip between two products can be folded away by the compiler (triton 3.6 did so in
    some layouts, giving the unrounded sum; measured on an H200), which would not round as the PyTorch modules do.
    NaN stays NaN. Other dtypes (fp16, fp32) take the cast round trip: not checked against folding."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # a NaN's bits would carry into inf or 0
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def rotary_tables(cos_ptr, sin_ptr, row, stride_ct, d, head_dim):
    """For dims ``d`` (a block of any shape) of row ``row``: cos and sin in fp32, and rotate_half's partner dims and
    their signs (-x2, x1): what `rotated` takes. The one reading of the rotary tables for the decode kernels."""
    in_dim = d < head_dim
    cos = tl.load(cos_ptr + row * stride_ct + d, mask=in_dim, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + row * stride_ct + d, mask=in_dim, other=0.0).to(tl.float32)
    half = head_dim // 2
    return cos, sin, tl.where(d < half, d + half, d - half), tl.where(d < half, -1.0, 1.0)


@triton.jit
def rotated(x, partner, cos, sin, sign):
    """``x * cos + rotate_half(x) * sin`` in x's dtype, each product rounded to it first (transformers' rounding);
    ``partner`` is x at the rotate_half positions, ``sign`` its sign, ``cos``/``sin`` fp32. The one definition of
    the rotary embedding's arithmetic for the decode kernels (`kernels.decode_fusions`, the attention's ROTARY
    mode)."""
    a = round_to(x.to(tl.float32) * cos, x.dtype)
    b = round_to(partner.to(tl.float32) * sign * sin, x.dtype)
    return round_to(a + b, x.dtype).to(x.dtype)  # exact: a later widening sees the rounded value either way


@triton.jit
def _operand(ptr, mask, stride_s, SPLITS: tl.constexpr, dtype: tl.constexpr):
    """The values at ``ptr`` (a block of pointers): loaded as they are (SPLITS 0), or the sum of SPLITS fp32
    partial products ``stride_s`` apart (`kernels.decode_linear`), in split order, rounded once to ``dtype`` as the
    product's output would be (as `kernels.decode_fusions.rms_norm` sums them)."""
    if SPLITS == 0:
        return tl.load(ptr, mask=mask, other=0.0)
    else:
        total = tl.load(ptr, mask=mask, other=0.0)
        for split in tl.static_range(1, SPLITS):  # unrolled: every split's load in flight at once
            total += tl.load(ptr + split * stride_s, mask=mask, other=0.0)
        return round_to(total, dtype).to(dtype)


@triton.jit
def _split_range(context, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """[start, end) of a row's context that split ``split`` reads. Splits are balanced per row at run time, so a
    fixed grid (a CUDA graph) serves any context length."""
    per_split = tl.cdiv(tl.cdiv(context, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    return start, tl.minimum(start + per_split, context)


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
    new_k_ptr,
    new_v_ptr,
    cos_ptr,
    sin_ptr,
    slots_ptr,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_ct,
    stride_qs,
    stride_ks,
    stride_vs,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_CACHE_DTYPE: tl.constexpr,
    WIDEN_16BIT_DOTS: tl.constexpr,
    PROGRAMMATIC_LAUNCH: tl.constexpr,
    ROTARY: tl.constexpr,
    LENGTHS_BEFORE_WAIT: tl.constexpr,
    QKV_SPLITS: tl.constexpr,
):
    """One program: one row, one KV head (its GQA group of query heads as the dot's rows), one context split.

    DOT_IN_CACHE_DTYPE: both dots take the cache's (16-bit) dtype, q and the probabilities rounded to it, with fp32
    accumulation (as FlashAttention does): K/V tiles stay 16-bit in registers instead of being widened to fp32.
    WIDEN_16BIT_DOTS (the CPU interpreter, whose 16-bit dots are wrong): the same rounding, dots in fp32.
    PROGRAMMATIC_LAUNCH (Hopper, launched with launch_pdl): the kernel may be launched while the previous one is
    still finishing; it waits for that one's completion before touching memory, and lets the next kernel launch
    (which waits in turn for this one's completion before touching memory): with one split as soon as it has
    waited, so that the next one is resident by the time this one ends; with several, before its stores, where the
    merge kernel's launch was measured.
    LENGTHS_BEFORE_WAIT (with PROGRAMMATIC_LAUNCH; the caller's promise that the previous kernel does not write
    the context lengths): the row's length is loaded before the wait, so that after it q's load does not queue
    behind the length's. The previous kernel is the only one that can still be running then: every kernel here
    launched this way waits for its own predecessor before it lets its successor launch.
    ROTARY (`kernels.decode_fusions.rotary_paged_decode_attention`): q is the projection's output before the rotary
    embedding, and the row's new token (its last context position, slot ``slots[b]``) is not in the cache yet: its
    k and v come from ``new_k``/``new_v``. The program rotates q and the new k as `rotary_kv_write` does (the same
    roundings), attends over the cached positions before the new one, adds the new token's key and value from
    registers, and the program of the last split stores the rotated k and v at the slot (slot -1: nothing).
    QKV_SPLITS (with ROTARY; 0: off): q, new_k and new_v are the q/k/v product's fp32 split-K partial sums
    (`kernels.decode_linear`, the bias in the first split), QKV_SPLITS of them ``stride_qs``/``stride_ks``/``stride_vs``
    apart: each program sums the values it reads and rounds them to the cache's dtype, as the product would have."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    if PROGRAMMATIC_LAUNCH and not LENGTHS_BEFORE_WAIT:
        tl.extra.cuda.gdc_wait()  # everything the previous kernels wrote (q, the new K/V) is visible after this
    context = tl.load(context_lens_ptr + b)
    if PROGRAMMATIC_LAUNCH and LENGTHS_BEFORE_WAIT:  # the length's load is under way while the kernel waits
        tl.extra.cuda.gdc_wait()
    start, end = _split_range(context, split, NUM_SPLITS, BLOCK_N)
    if PROGRAMMATIC_LAUNCH and NUM_SPLITS == 1:  # the next kernel may launch; it waits for our completion itself
        tl.extra.cuda.gdc_launch_dependents()

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g.to(tl.int64)
    q_mask = g_mask[:, None] & d_mask[None, :]
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    cache_dtype: tl.constexpr = key_cache_ptr.dtype.element_ty
    q = _operand(q_rows + d[None, :], q_mask, stride_qs, QKV_SPLITS, cache_dtype)
    if ROTARY:  # q, and the new token's k and v, rotated and stored as `rotary_kv_write` does
        cos, sin, partner, sign = rotary_tables(cos_ptr, sin_ptr, b, stride_ct, d, HEAD_DIM)
        q_partner = _operand(q_rows + partner[None, :], q_mask, stride_qs, QKV_SPLITS, cache_dtype)
        q = rotated(q, q_partner, cos[None, :], sin[None, :], sign[None, :])
        k_row = new_k_ptr + b * stride_kb + kv_head * stride_kh
        new_k = rotated(_operand(k_row + d, d_mask, stride_ks, QKV_SPLITS, cache_dtype),
                        _operand(k_row + partner, d_mask, stride_ks, QKV_SPLITS, cache_dtype), cos, sin, sign)
        new_v = _operand(new_v_ptr + b * stride_vb + kv_head * stride_vh + d, d_mask, stride_vs, QKV_SPLITS,
                         cache_dtype)  # fmt: skip
        slot = tl.load(slots_ptr + b).to(tl.int64)
        safe = tl.maximum(slot, 0)
        dst = (safe // block_size) * stride_cb + (safe % block_size) * stride_co + kv_head * stride_ch + d
        stores = ((slot >= 0) & (split == NUM_SPLITS - 1)).to(tl.int32)  # one program per (row, KV head) stores
        store_new = d_mask & ((d * 0 + stores) > 0)  # a block, not a scalar, in the mask
        tl.store(key_cache_ptr + dst, new_k.to(key_cache_ptr.dtype.element_ty), mask=store_new)
        tl.store(value_cache_ptr + dst, new_v.to(value_cache_ptr.dtype.element_ty), mask=store_new)
        last = context - 1  # the new token's position: from registers, not from the cache
        has_new = (context > 0) & (start <= last) & (last < end)
        end = tl.minimum(end, last)
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
        # (GROUP_PAD, BLOCK_N), log2 units; fp32 again: torch.compile passes Python floats to user kernels as fp64,
        # which would widen the scores and make the second tl.dot fail
        s = (tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e).to(tl.float32)
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
    if ROTARY:  # the new token: one more key, its score and value from registers
        s_new = (tl.sum(q.to(tl.float32) * new_k.to(tl.float32)[None, :], 1) * scale_log2e).to(tl.float32)
        s_new = tl.where(has_new, s_new, float("-inf"))
        m_new = tl.maximum(m_i, s_new)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p_new = tl.exp2(s_new - m_use)
        l_i = l_i * alpha + p_new
        if DOT_IN_CACHE_DTYPE:  # the probability rounded to the cache dtype, as the loop's value product takes it
            p_new = round_to(p_new, new_v.dtype)
        acc = acc * alpha[:, None] + p_new[:, None] * new_v.to(tl.float32)[None, :]
        m_i = m_new

    if PROGRAMMATIC_LAUNCH and NUM_SPLITS > 1:  # the merge kernel: launched before the stores, as measured
        tl.extra.cuda.gdc_launch_dependents()
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
    PROGRAMMATIC_LAUNCH: tl.constexpr,
):
    """Merge the splits of one (row, query head): out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s."""
    if PROGRAMMATIC_LAUNCH:
        tl.extra.cuda.gdc_wait()  # the partials of the split kernel
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


def index_tensor(t: torch.Tensor, name: str, ndim: int, device: torch.device) -> torch.Tensor:
    """An index argument (slots, block tables, lengths, offsets) as the kernels read it: integer, on the caches'
    device, with unit stride along its last dimension (the kernels step through it by position, so a strided view
    would read the wrong entries without a word). Returns it contiguous; a contiguous tensor is returned as is."""
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        got = f"{t.dim()}-D" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {ndim}-D integer tensor, got {got}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers (int32 or int64), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the caches on {device}")
    return t if t.is_contiguous() else t.contiguous()


def _check_queries(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Checks of the attention entry points: the caches, and q (rows, q_heads, head_dim) against them. Returns
    q with a contiguous last dimension and the GQA group size (query heads per KV head)."""
    _check_cache(key_cache, value_cache)
    if q.device != key_cache.device:
        raise ValueError(f"q is on {q.device}, the caches on {key_cache.device}")
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
    if key.dim() != 3:
        raise ValueError(f"key must be (N, kv_heads, head_dim), got {tuple(key.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.device != key_cache.device:
            raise ValueError(f"{name} is on {t.device}, the caches on {key_cache.device}")
    slot_mapping = index_tensor(slot_mapping, "slot_mapping", 1, key_cache.device)
    n, heads, head_dim = key.shape
    if value.shape != key.shape or key_cache.shape[2:] != (heads, head_dim) or slot_mapping.shape != (n,):
        raise ValueError(
            f"paged_kv_write shapes: key {tuple(key.shape)}, value {tuple(value.shape)}, cache "
            f"{tuple(key_cache.shape)}, slots {tuple(slot_mapping.shape)}"
        )
    if n == 0:
        return
    if key.dtype != key_cache.dtype or value.dtype != value_cache.dtype:  # rounded by PyTorch (the interpreter
        key, value = key.to(key_cache.dtype), value.to(value_cache.dtype)  # truncates fp32 -> bf16 casts)
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


# Shared memory the decode kernel may use per program: the device's opt-in limit less what it needs besides the
# pipelined tiles (measured on the H200 with triton 3.6: depth x tile + 8-19 KB, e.g. 140 KB for 5 stages of
# 128 x 128 bf16 tiles). Off the GPU the H100/H200's 227 KB, so CPU tests compute the same defaults.
SHARED_HEADROOM_BYTES = 24 * 1024
HOPPER_SHARED_BYTES = 227 * 1024
MAX_PIPELINE_STAGES = 5  # the depth the H200 sweeps found fastest at the 1B, 2B and 8B geometries


def shared_memory_bytes(device: torch.device) -> int:
    """The shared memory a program may use on ``device`` (its opt-in limit; off the GPU the H100/H200's)."""
    if device.type != "cuda":
        return HOPPER_SHARED_BYTES
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def stages_that_fit(stage_bytes: int, shared_bytes: int) -> int:
    """Pipeline depth for stages of ``stage_bytes`` each: as many as ``shared_bytes`` of shared memory hold (less
    `SHARED_HEADROOM_BYTES`), at most `MAX_PIPELINE_STAGES`, at least 1."""
    return int(max(1, min(MAX_PIPELINE_STAGES, (shared_bytes - SHARED_HEADROOM_BYTES) // stage_bytes)))


def pipeline_stages(block_n: int, head_dim: int, element_size: int, device: torch.device | str) -> int:
    """Pipeline depth of the decode loop for a tile (`stages_that_fit` on the device's shared memory)."""
    tile = block_n * max(16, triton.next_power_of_2(head_dim)) * element_size
    return stages_that_fit(tile, shared_memory_bytes(torch.device(device)))


def default_block_n(head_dim: int, element_size: int, programs: int, device: torch.device | str) -> int:
    """Context tokens per tile of the decode kernel: 128 when the (row, KV head) programs fit one per SM (each then
    streams alone, and longer tiles keep more of its loads in flight) or heads are at most 64 wide, else 64; halved
    until two tiles fit the shared memory (`pipeline_stages`). On the H200 sweeps: InternVL3-1B and -2B at batch 64
    (128 programs) fastest at 128, -8B (256 programs of 128-wide heads) at 64, at depth 5 everywhere."""
    device = torch.device(device)
    block_n = 128 if programs <= _sm_count(device) or head_dim <= 64 else 64
    while block_n > 16 and pipeline_stages(block_n, head_dim, element_size, device) < 2:
        block_n //= 2
    return block_n


def choose_num_splits(
    batch: int, kv_heads: int, max_context: int, device: torch.device | str, *, block_n: int = 128
) -> int:
    """Context splits per (row, KV head): about one program per SM, each streaming its split through a deep
    pipeline (on the H200 one program per SM beat four: fewer partials to merge, longer loops to pipeline), each
    split at least one tile long. Needs no device sync (``max_context`` is a bound)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    programs = max(1, batch * kv_heads)
    most = max(1, triton.cdiv(max_context, block_n))
    return int(max(1, min(_sm_count(device) // programs, most, 32)))


def programmatic_launch_supported(device: torch.device | str) -> bool:
    """Programmatic dependent launch (a kernel launched while the previous one finishes): NVIDIA Hopper and later,
    compiled kernels only (not the interpreter, not ROCm, whose capability numbers mean something else)."""
    device = torch.device(device)
    if device.type != "cuda" or _INTERPRETED or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    dot_in_cache_dtype: bool = True,
    programmatic_launch: bool | None = None,
    lengths_before_wait: bool = False,
) -> torch.Tensor:
    """Attention of one query per row over that row's paged context.

    q: (B, q_heads, head_dim); caches: [num_blocks, block_size, kv_heads, head_dim]; block_tables: (B, max_blocks)
    int32; context_lens: (B,) int32 (the row's positions 0..len-1 are visible; 0 gives a zero output). Query head h
    reads KV head ``h // (q_heads // kv_heads)``. ``num_splits`` > 1 splits each row's context into that many
    partitions merged with log-sum-exp (None: chosen from the batch, the GPU and the table width, without reading
    the lengths back to the host). ``block_n``/``num_stages``: tokens per tile and pipeline depth (None:
    `default_block_n`, `pipeline_stages`). ``dot_in_cache_dtype`` (16-bit caches): the score and value products in
    the cache's dtype with fp32 accumulation, q and the softmax probabilities rounded to it, as FlashAttention does
    (False: fp32 operands, slower). ``programmatic_launch``: launch while the previous kernel finishes (None: where
    `programmatic_launch_supported`). ``lengths_before_wait``: the caller's promise that the kernel launched just
    before this one does not write ``context_lens`` (true of the paged runner's step, which computes them before
    its layers; enough when every kernel launched with programmatic launch before it waits for its own predecessor
    before it lets the next launch, as this project's do): with programmatic launch the kernel then loads the row's
    length before it waits for that kernel. Returns (B, q_heads, head_dim) in q's dtype.
    """
    return decode_attention_launch(
        q, key_cache, value_cache, block_tables, context_lens, None, scale=scale, num_splits=num_splits,
        block_n=block_n, num_warps=num_warps, num_stages=num_stages, dot_in_cache_dtype=dot_in_cache_dtype,
        programmatic_launch=programmatic_launch, lengths_before_wait=lengths_before_wait,
    )  # fmt: skip


def decode_attention_launch(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    rotary: tuple | None,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    dot_in_cache_dtype: bool = True,
    programmatic_launch: bool | None = None,
    lengths_before_wait: bool = False,
) -> torch.Tensor:
    """`paged_decode_attention`'s launch; with ``rotary`` = (new k, new v, cos, sin, slots) the kernel's ROTARY
    mode (`kernels.decode_fusions.rotary_paged_decode_attention`, which checks those inputs). With ``rotary``, q
    (splits, B, q_heads, head_dim) float32 and new k, v likewise are the q/k/v product's split-K partial sums
    (the kernel's QKV_SPLITS mode); the output then has the cache's dtype."""
    # partial sums: their dtype, splits and strides checked by `rotary_paged_decode_attention`; one split as q here
    qkv_splits = q.shape[0] if rotary is not None and q.dim() == 4 else 0
    if qkv_splits:
        _, group = _check_queries(q[0], key_cache, value_cache)
    else:
        q, group = _check_queries(q, key_cache, value_cache)
    batch, q_heads, head_dim = q.shape[-3:]
    _, block_size, kv_heads, _ = key_cache.shape
    if block_n is None:
        block_n = default_block_n(head_dim, key_cache.element_size(), batch * kv_heads, q.device)
    for name, value, least in (("block_n", block_n, 16), ("num_warps", num_warps, 1)):
        if value < least or value & (value - 1):  # tl.arange and tl.dot tiles: powers of two, dots >= 16
            raise ValueError(f"{name} must be a power of two >= {least}, got {value}")
    block_tables = index_tensor(block_tables, "block_tables", 2, key_cache.device)
    context_lens = index_tensor(context_lens, "context_lens", 1, key_cache.device)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 (or None to choose), got {num_splits}")
    if block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} must have "
            f"{batch} rows"
        )
    scale = head_dim**-0.5 if scale is None else scale
    if num_splits is None:
        num_splits = choose_num_splits(batch, kv_heads, block_tables.shape[1] * block_size, q.device, block_n=block_n)
    if num_stages is None:
        num_stages = pipeline_stages(block_n, head_dim, key_cache.element_size(), q.device)
    if programmatic_launch is None:
        programmatic_launch = programmatic_launch_supported(q.device)
    launch = {"launch_pdl": True} if programmatic_launch else {}
    out = torch.empty(q.shape[-3:], device=q.device, dtype=key_cache.dtype if qkv_splits else q.dtype)
    if batch == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    if num_splits > 1:
        part_out = torch.empty(batch, q_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_ml = torch.empty(batch, q_heads, num_splits, 2, device=q.device, dtype=torch.float32)
    else:
        part_out, part_ml = out, out  # unused
    if rotary is None:  # unused pointers and strides
        rotary_args = (q, q, q, q, context_lens, 0, 0, 0, 0, 0, 0, 0, 0)
    else:
        new_k, new_v, cos, sin, slots = rotary
        rotary_args = (new_k, new_v, cos, sin, slots, new_k.stride(-3), new_k.stride(-2), new_v.stride(-3),
                       new_v.stride(-2), cos.stride(0), q.stride(0) if qkv_splits else 0,
                       new_k.stride(0) if qkv_splits else 0, new_v.stride(0) if qkv_splits else 0)  # fmt: skip
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
        q.stride(-3),
        q.stride(-2),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        *po_strides,
        *ml_strides,
        block_size,
        *rotary_args,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=_dot_precision(key_cache.dtype),
        DOT_IN_CACHE_DTYPE=bool(dot_in_cache_dtype and key_cache.dtype in (torch.bfloat16, torch.float16)),
        WIDEN_16BIT_DOTS=q.device.type != "cuda" or _INTERPRETED,
        PROGRAMMATIC_LAUNCH=bool(programmatic_launch),
        ROTARY=rotary is not None,
        LENGTHS_BEFORE_WAIT=bool(lengths_before_wait),
        QKV_SPLITS=qkv_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        **launch,
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
            PROGRAMMATIC_LAUNCH=bool(programmatic_launch),
            **launch,
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
