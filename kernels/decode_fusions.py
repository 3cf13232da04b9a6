"""Fused elementwise kernels of a one-position step (decode and latent steps of the paged runner).

A decode step of a small model is a few hundred tiny kernels; inside a CUDA graph each still costs a few
microseconds, and transformers' RMSNorm alone is eight of them (upcast, square, mean, add, rsqrt, multiply,
downcast, weight), rotary embedding five per tensor, the residual add and the SwiGLU product one or two more.
These kernels do each of those in one pass over the rows, with the same rounding as the PyTorch modules they
replace (fp32 statistics, a downcast before the weight multiply, bf16 rounding between the rotary terms), so
outputs match transformers' (bit for bit on an H200 in bf16, checked against the PyTorch references at the
InternVL3 geometries; exact in fp32 up to summation order). The roundings between two products go through
`kernels.paged_kv.round_to`, which the compiler cannot fold away as it did a ``.to(bf16).to(fp32)`` round trip.

Public entry points (one name across kernels, tests and benchmarks), each with its PyTorch reference:

- `rms_norm(x, weight, eps, residual=None)`: Qwen2/Llama RMSNorm of ``x`` (N, H); with ``residual`` it first
  forms ``s = residual + x`` (rounded to the input dtype, as ``residual + x`` is) and returns ``(norm(s), s)``;
- `rotary_qk(q, k, cos, sin)`: ``q * cos + rotate_half(q) * sin`` and the same for ``k`` (N, heads, D), one
  program per token for both;
- `rotary_kv_write(q, k, v, cos, sin, key_cache, value_cache, slots)`: `rotary_qk`, with the rotated ``k`` and
  ``v`` stored straight into a paged cache at ``slots`` (`kernels.paged_kv` layout, slot -1 skipped) instead of
  into new tensors: one kernel for what `rotary_qk` + `paged_kv.paged_kv_write` do in two; returns the rotated q;
- `rotary_paged_decode_attention(q, k, v, cos, sin, key_cache, value_cache, slots, block_tables, context_lens)`:
  `rotary_kv_write` and the one-query paged attention after it (`kernels.paged_kv.paged_decode_attention`) in one
  kernel, for one-position steps (each row's new token is its last context position); q, k, v may also be the
  q/k/v product's fp32 split-K partial sums (`kernels.decode_linear`), which the kernel sums as it reads them;
- `silu_mul(gate, up)`: ``silu(gate) * up`` (the SwiGLU product of the MLP).

No autograd here: these serve inference (`engine.model.paged`); `kernels.layer_grads` gives the first three
their backward for training. Interpreter note: bf16 values are upcast to fp32 for arithmetic; the interpreter
truncates fp32 -> bf16 casts instead of rounding, so bf16 results there can differ from the GPU's in the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.paged_kv import (
    _check_cache,
    index_tensor,
    decode_attention_launch,
    paged_decode_attention_reference,
    paged_kv_write_reference,
    programmatic_launch_supported,
    rotary_tables,
    rotated,
    round_to,
)

__all__ = [
    "decode_fusions_self_check",
    "partial_qkv_attention_self_check",
    "rms_norm",
    "rms_norm_reference",
    "rotary_kv_write",
    "rotary_kv_write_reference",
    "rotary_attention_self_check",
    "rotary_paged_decode_attention",
    "rotary_paged_decode_attention_reference",
    "rotary_qk",
    "rotary_qk_reference",
    "silu_mul",
    "silu_mul_reference",
]


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    sum_ptr,
    weight_ptr,
    out_ptr,
    hidden,
    stride_xs,
    stride_x,
    stride_r,
    stride_s,
    stride_o,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    PARTIALS: tl.constexpr,
    SPLITS: tl.constexpr,
    PROGRAMMATIC_LAUNCH: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    if PROGRAMMATIC_LAUNCH:  # launched while the previous kernel finishes: its writes are visible after the wait
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the next product may launch now: it waits for our stores itself
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    keep = cols < hidden
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=keep, other=0.0)
    if PARTIALS:  # fp32 partial products (`kernels.decode_linear`, always with a residual): summed in split order,
        # rounded once as a product
        total = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for split in tl.static_range(SPLITS):  # unrolled: every split's load in flight at once
            total += tl.load(x_ptr + split * stride_xs + row * stride_x + cols, mask=keep, other=0.0)
        dtype: tl.constexpr = r.dtype
        xf = round_to(total, dtype)
    else:
        x = tl.load(x_ptr + row * stride_x + cols, mask=keep, other=0.0)
        dtype: tl.constexpr = x.dtype
        xf = x.to(tl.float32)
    if HAS_RESIDUAL:
        xf = round_to(r.to(tl.float32) + xf, dtype)  # residual + x, rounded like the PyTorch add
        tl.store(sum_ptr + row * stride_s + cols, xf.to(dtype), mask=keep)
    variance = tl.sum(xf * xf, axis=0) / hidden
    # eps is fp64 under torch.compile (Python floats reach user kernels so): back to fp32 before the rsqrt; the
    # downcast before the weight is transformers' rounding (`round_to`: not folded away)
    normed = round_to(xf * tl.math.rsqrt((variance + eps).to(tl.float32)), dtype)
    w = tl.load(weight_ptr + cols, mask=keep, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * normed).to(dtype), mask=keep)


@triton.jit
def _rotate(x_ptr, out_ptr, cos, sin, partner, sign, token, stride_t, stride_h, stride_ot, stride_oh, heads, head_dim,
            BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr, store_ok):  # fmt: skip
    """Rotate the heads of one token (its `rotary_tables`, (1, BLOCK_D) each); ``store_ok`` (0 or 1) gates loads
    and stores (a skipped cache slot)."""
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    keep = (h < heads) & (d < head_dim) & ((h * 0 + store_ok) > 0)  # a block, not a scalar, in the mask
    base = x_ptr + token * stride_t + h * stride_h
    x = tl.load(base + d, mask=keep, other=0.0)
    rot = rotated(x, tl.load(base + partner, mask=keep, other=0.0), cos, sin, sign)
    tl.store(out_ptr + token * stride_ot + h * stride_oh + d, rot, mask=keep)


@triton.jit
def _rotary_qk_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    q_heads,
    k_heads,
    head_dim,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_ct,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cos, sin, partner, sign = rotary_tables(cos_ptr, sin_ptr, token, stride_ct, tl.arange(0, BLOCK_D)[None, :],
                                            head_dim)  # fmt: skip
    _rotate(q_ptr, q_out_ptr, cos, sin, partner, sign, token, stride_qt, stride_qh, stride_qot, stride_qoh, q_heads,
            head_dim, BLOCK_QH, BLOCK_D, 1)  # fmt: skip
    _rotate(k_ptr, k_out_ptr, cos, sin, partner, sign, token, stride_kt, stride_kh, stride_kot, stride_koh, k_heads,
            head_dim, BLOCK_KH, BLOCK_D, 1)  # fmt: skip


@triton.jit
def _rotary_kv_write_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slots_ptr,
    cos_ptr,
    sin_ptr,
    q_heads,
    k_heads,
    head_dim,
    block_size,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qot,
    stride_qoh,
    stride_cb,
    stride_co,
    stride_ch,
    stride_ct,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cos, sin, partner, sign = rotary_tables(cos_ptr, sin_ptr, token, stride_ct, tl.arange(0, BLOCK_D)[None, :],
                                            head_dim)  # fmt: skip
    _rotate(q_ptr, q_out_ptr, cos, sin, partner, sign, token, stride_qt, stride_qh, stride_qot, stride_qoh, q_heads,
            head_dim, BLOCK_QH, BLOCK_D, 1)  # fmt: skip
    slot = tl.load(slots_ptr + token).to(tl.int64)
    store_ok = (slot >= 0).to(tl.int32)
    safe = tl.maximum(slot, 0)
    dst = (safe // block_size) * stride_cb + (safe % block_size) * stride_co  # the slot's row in the cache
    # the rotated k goes to the cache row (token stride 0: the destination is already that row)
    _rotate(k_ptr, key_cache_ptr + dst, cos, sin, partner, sign, token, stride_kt, stride_kh, 0, stride_ch, k_heads,
            head_dim, BLOCK_KH, BLOCK_D, store_ok)  # fmt: skip
    h = tl.arange(0, BLOCK_KH)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    keep = (h < k_heads) & (d < head_dim) & ((h * 0 + store_ok) > 0)
    v = tl.load(v_ptr + token * stride_vt + h * stride_vh + d, mask=keep, other=0.0)
    tl.store(value_cache_ptr + dst + h * stride_ch + d, v, mask=keep)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, width, stride_g, stride_u, stride_o, BLOCK: tl.constexpr,
                     PROGRAMMATIC_LAUNCH: tl.constexpr):  # fmt: skip
    if PROGRAMMATIC_LAUNCH:  # as `_rms_norm_kernel`: wait for the product, then let the next product launch
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < width
    g = tl.load(gate_ptr + row * stride_g + cols, mask=keep, other=0.0)
    u = tl.load(up_ptr + row * stride_u + cols, mask=keep, other=0.0)
    gf = g.to(tl.float32)
    act = round_to(gf / (1.0 + tl.exp(-gf)), g.dtype)  # silu(gate), rounded like the activation module's output
    tl.store(out_ptr + row * stride_o + cols, (act * u.to(tl.float32)).to(g.dtype), mask=keep)


# ------------------------------------------------------------------------------------------------ entry points


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be (rows, width), got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    partial_sums: bool = False,
    programmatic_launch: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` (N, H) (see the module docstring); with ``residual``: ``(norm(residual + x), residual + x)``.
    ``partial_sums`` (with ``residual``): ``x`` is (splits, N, H) fp32 partial products (`kernels.decode_linear`),
    and their sum over splits, rounded to the residual's dtype, is the ``x`` added. ``programmatic_launch``: launch
    while the previous kernel finishes, and let the next one launch as soon as this one has waited (None: with
    partial sums, where the device supports it: the split-K kernel before it lets it launch early)."""
    if partial_sums:
        if residual is None or x.dim() != 3 or x.dtype != torch.float32:
            raise ValueError(f"partial sums must be (splits, N, H) float32 with a residual, got {tuple(x.shape)} "
                             f"{x.dtype}{'' if residual is not None else ' without one'}")  # fmt: skip
        x = x if x.stride(-1) == 1 else x.contiguous()
    else:
        x = _rows(x, "x")
    n, hidden = x.shape[-2:]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be ({hidden},), got {tuple(weight.shape)}")
    want = residual.dtype if partial_sums else x.dtype
    if weight.dtype != want or weight.device != x.device:  # torch's RMSNorm would promote; this kernel writes x's dtype
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must have x's dtype and device ({want}, {x.device})")
    weight = weight if weight.is_contiguous() else weight.contiguous()  # read by position
    if residual is not None:
        residual = _rows(residual, "residual")
        if residual.shape != x.shape[-2:] or (residual.dtype != x.dtype and not partial_sums):
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    if programmatic_launch is None:
        programmatic_launch = partial_sums and programmatic_launch_supported(x.device)
    out = torch.empty_like(residual if partial_sums else x)
    summed = torch.empty_like(out) if residual is not None else out
    if n:
        _rms_norm_kernel[(n,)](
            x,
            residual if residual is not None else x,
            summed,
            weight,
            out,
            hidden,
            x.stride(0) if partial_sums else 0,
            x.stride(-2),
            (residual if residual is not None else x).stride(0),
            summed.stride(0),
            out.stride(0),
            float(eps),
            HAS_RESIDUAL=residual is not None,
            PARTIALS=partial_sums,
            SPLITS=x.shape[0] if partial_sums else 1,
            PROGRAMMATIC_LAUNCH=bool(programmatic_launch),
            BLOCK_H=triton.next_power_of_2(hidden),
            **({"launch_pdl": True} if programmatic_launch else {}),
        )
    return out if residual is None else (out, summed)


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    partial_sums: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """transformers' Qwen2RMSNorm, after an optional residual add (of partial products summed, as `rms_norm`)."""
    if partial_sums:
        x = x.sum(0).to(residual.dtype)
    summed = x if residual is None else residual + x
    xf = summed.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(summed.dtype)
    return out if residual is None else (out, summed)


def _check_rotary(q, k, cos, sin):
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q (N, Hq, D) and k (N, Hk, D) must agree, got {tuple(q.shape)} and {tuple(k.shape)}")
    n, _, head_dim = q.shape
    if cos.shape != (n, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be ({n}, {head_dim}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embedding, got {head_dim}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    return q, k, cos.contiguous(), sin.contiguous()


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q`` (N, q_heads, D) and ``k`` (N, kv_heads, D) with ``cos``/``sin`` (N, D), into new
    contiguous tensors; returns ``(q_rot, k_rot)``. Inputs may be strided views (the last dimension contiguous)."""
    return _launch_per_token(_rotary_qk_kernel, q, k, cos, sin)


def _launch_per_token(kernel, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """One program per token of ``kernel(q, k, q_out, k_out, cos, sin, sizes, strides, blocks)`` (the rotary
    kernel and, in `kernels.layer_grads`, its backward) into new contiguous outputs shaped like q and k."""
    q, k, cos, sin = _check_rotary(q, k, cos, sin)
    n, q_heads, head_dim = q.shape
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if n:
        kernel[(n,)](
            q,
            k,
            q_out,
            k_out,
            cos,
            sin,
            q_heads,
            k.shape[1],
            head_dim,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            cos.stride(0),
            BLOCK_QH=triton.next_power_of_2(q_heads),
            BLOCK_KH=triton.next_power_of_2(k.shape[1]),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return q_out, k_out


def _check_partial_qkv(q, k, v) -> None:
    """q, k, v as split-K partial sums: (splits, N, heads, D) float32, the same splits and rows."""
    if (q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[:2] != k.shape[:2] or v.shape != k.shape
            or q.shape[0] < 1 or any(t.dtype != torch.float32 for t in (q, k, v))):  # fmt: skip
        raise ValueError(
            "partial sums of q, k, v must be (splits, N, heads, head_dim) float32 with the same splits and rows, "
            f"got {tuple(q.shape)} {q.dtype}, {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}"
        )


def _check_new_tokens(name, q, k, v, cos, sin, key_cache, value_cache, slots):
    """The checks of the kernels that rotate new tokens and store their K/V at ``slots``; returns q, k, v, cos, sin
    as the kernels take them (last dimensions contiguous) and the slots contiguous. 4-D q, k, v are split-K partial
    sums (`_check_partial_qkv` passed): one split is checked as the tokens' values, whatever its dtype."""
    _check_cache(key_cache, value_cache)
    for arg, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin)):
        if t.device != key_cache.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, the caches on {key_cache.device}")
    slots = index_tensor(slots, "slots", 1, key_cache.device)
    partial = q.dim() == 4
    one_k, one_v = (k[0], v[0]) if partial else (k, v)
    if one_v.shape != one_k.shape or key_cache.shape[2:] != one_k.shape[1:] or slots.shape != (one_k.shape[0],):
        raise ValueError(
            f"{name} shapes: k {tuple(k.shape)}, v {tuple(v.shape)}, cache {tuple(key_cache.shape)}, "
            f"slots {tuple(slots.shape)}"
        )
    if not partial and (k.dtype != key_cache.dtype or v.dtype != value_cache.dtype):
        raise ValueError(f"k and v ({k.dtype}, {v.dtype}) must have the cache's dtype ({key_cache.dtype})")
    if partial:  # the rotary checks on one split; the kernel reads every split with the same strides
        _, _, cos, sin = _check_rotary(q[0], k[0], cos, sin)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return q, k, v, cos, sin, slots
    q, k, cos, sin = _check_rotary(q, k, cos, sin)
    return q, k, (v if v.stride(-1) == 1 else v.contiguous()), cos, sin, slots


def rotary_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """`rotary_qk` of ``q`` (N, q_heads, D) and ``k`` (N, kv_heads, D), the rotated k and ``v`` (N, kv_heads, D)
    stored at ``slots`` (N,) of the paged caches ([num_blocks, block_size, kv_heads, D], slot -1 skipped), in
    place. Returns the rotated q (new, contiguous). Inputs may be strided views (the last dimension contiguous);
    k and v must have the cache's dtype (the cast would round differently in the interpreter)."""
    q, k, v, cos, sin, slots = _check_new_tokens("rotary_kv_write", q, k, v, cos, sin, key_cache, value_cache, slots)
    n, q_heads, head_dim = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if n:
        _rotary_kv_write_kernel[(n,)](
            q,
            k,
            v,
            q_out,
            key_cache,
            value_cache,
            slots,
            cos,
            sin,
            q_heads,
            k.shape[1],
            head_dim,
            key_cache.shape[1],
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            key_cache.stride(0),
            key_cache.stride(1),
            key_cache.stride(2),
            cos.stride(0),
            BLOCK_QH=triton.next_power_of_2(q_heads),
            BLOCK_KH=triton.next_power_of_2(k.shape[1]),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return q_out


def rotary_paged_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    **attention_options,
) -> torch.Tensor:
    """`rotary_kv_write` then `kernels.paged_kv.paged_decode_attention`, in one kernel, for one-position steps: each
    row's new token is its last context position (``context_lens[b] - 1``) and goes to ``slots[b]`` (-1: a padding
    row, which must have context 0). The attention program of a (row, KV head) rotates q and the new k, takes the
    new token's key and value from registers and the rest of the context from the cache, and one of its programs
    stores the rotated k and v at the slot, as `rotary_kv_write` would. ``attention_options``: those of
    `paged_decode_attention` (scale, num_splits, block_n, num_warps, num_stages, dot_in_cache_dtype,
    programmatic_launch, lengths_before_wait). Returns the attention output (B, q_heads, head_dim) in the cache's
    dtype.

    q, k, v may instead be the q/k/v product's split-K partial sums (`kernels.decode_linear.decode_linear_partials`
    with the bias, split into q, k, v columns): (splits, B, heads, head_dim) float32 each. Every program then sums
    the values it reads in split order and rounds them to the cache's dtype, as the product would have: no kernel
    between the product and the attention."""
    if q.dim() == 4:
        _check_partial_qkv(q, k, v)
        if value_cache.dtype != key_cache.dtype:  # the sums of k and v are both rounded to the key cache's dtype
            raise ValueError(f"the caches must share a dtype, got {key_cache.dtype} and {value_cache.dtype}")
    elif q.dtype != key_cache.dtype:  # the kernel rounds the rotated q to the cache's dtype for its dots
        raise ValueError(f"q ({q.dtype}) must have the cache's dtype ({key_cache.dtype})")
    q, k, v, cos, sin, slots = _check_new_tokens("rotary_paged_decode_attention", q, k, v, cos, sin, key_cache,
                                                 value_cache, slots)  # fmt: skip
    return decode_attention_launch(q, key_cache, value_cache, block_tables, context_lens, (k, v, cos, sin, slots),
                                   **attention_options)  # fmt: skip


def rotary_paged_decode_attention_reference(q, k, v, cos, sin, key_cache, value_cache, slots, block_tables,
                                            context_lens, scale=None) -> torch.Tensor:  # fmt: skip
    """`rotary_kv_write_reference` (the caches written in place), then `paged_decode_attention_reference`; partial
    sums of q, k, v (4-D) summed and rounded to the cache's dtype first."""
    if q.dim() == 4:
        q, k, v = (t.sum(0).to(key_cache.dtype) for t in (q, k, v))
    q_rot = rotary_kv_write_reference(q, k, v, cos, sin, key_cache, value_cache, slots)
    return paged_decode_attention_reference(q_rot, key_cache, value_cache, block_tables, context_lens, scale=scale)


def rotary_kv_write_reference(q, k, v, cos, sin, key_cache, value_cache, slots) -> torch.Tensor:
    """`rotary_qk_reference`, then `paged_kv_write_reference` of the rotated k and v."""
    q_rot, k_rot = rotary_qk_reference(q, k, cos, sin)
    paged_kv_write_reference(k_rot, v, key_cache, value_cache, slots)
    return q_rot


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_qk_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb with cos/sin broadcast over the heads."""
    c, s = cos[:, None, :], sin[:, None, :]
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def silu_mul(gate: torch.Tensor, up: torch.Tensor, programmatic_launch: bool | None = False) -> torch.Tensor:
    """``silu(gate) * up`` for (N, I) inputs. ``programmatic_launch``: launch while the previous kernel finishes and
    let the next one launch as soon as this one has waited (None: where the device supports it; the paged runner's
    steps, whose next kernel is the split-K down product)."""
    gate, up = _rows(gate, "gate"), _rows(up, "up")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    out = torch.empty_like(gate)
    n, width = gate.shape
    block = min(1024, triton.next_power_of_2(max(width, 1)))
    if n and width:
        if programmatic_launch is None:
            programmatic_launch = programmatic_launch_supported(gate.device)
        _silu_mul_kernel[(n, triton.cdiv(width, block))](
            gate, up, out, width, gate.stride(0), up.stride(0), out.stride(0), BLOCK=block,
            PROGRAMMATIC_LAUNCH=bool(programmatic_launch), **({"launch_pdl": True} if programmatic_launch else {}),
        )  # fmt: skip
    return out


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def _cache_outputs(write):
    """For checks (the self-check, the suite): run ``write`` on copies of the caches; (q, key cache, value cache)."""

    def run(q, k, v, cos, sin, key_cache, value_cache, slots, **tables):
        key_cache, value_cache = key_cache.clone(), value_cache.clone()
        return write(q, k, v, cos, sin, key_cache, value_cache, slots, **tables), key_cache, value_cache

    return run


def decode_fusions_self_check(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Run each kernel once on small inputs on ``device`` against its reference: None when all agree, else why not
    (a compile error on this Triton, a wrong result). Callers that switch the fusions on by default check first."""
    r, cos, sin = _check_inputs(device, dtype)
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    cases = {
        "rms_norm": (rms_norm, rms_norm_reference, (r(5, 48), r(48), 1e-6), dict(residual=r(5, 48))),
        "rotary_qk": (rotary_qk, rotary_qk_reference, (r(5, 3, 8), r(5, 1, 8), cos, sin), {}),
        "silu_mul": (silu_mul, silu_mul_reference, (r(5, 40), r(5, 40)), {}),
        "rotary_kv_write": (_cache_outputs(rotary_kv_write), _cache_outputs(rotary_kv_write_reference),
                            (r(5, 3, 8), r(5, 1, 8), r(5, 1, 8), cos, sin, r(3, 4, 1, 8), r(3, 4, 1, 8)),
                            dict(slots=torch.tensor([4, -1, 0, 11, 7], device=device))),
    }
    return _run_checks(cases, tol)


def rotary_attention_self_check(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """`rotary_paged_decode_attention` once on small inputs on ``device`` against its reference: None when they
    agree, else why not. Checked apart from the other fusions: a failure here keeps them."""
    r, cos, sin = _check_inputs(device, dtype)
    return _run_checks({"rotary_paged_decode_attention": _rotary_attention_case(r, cos, sin, device, partial=False)},
                       _rotary_attention_tol(dtype))


def partial_qkv_attention_self_check(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """`rotary_paged_decode_attention` on the q/k/v product's split-K partial sums (the kernel's QKV_SPLITS mode)
    once on small inputs on ``device`` against its reference: None when they agree, else why not. Checked apart
    from the rest: a failure here keeps the attention on the product's values."""
    r, cos, sin = _check_inputs(device, dtype)
    return _run_checks({"rotary_paged_decode_attention on partial sums": _rotary_attention_case(r, cos, sin, device,
                                                                                                partial=True)},
                       _rotary_attention_tol(dtype))  # fmt: skip


def _rotary_attention_tol(dtype: torch.dtype) -> dict:
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)  # attention sums


def _rotary_attention_case(r, cos, sin, device, partial: bool) -> tuple:
    """The self-checks' attention case: rows of their own blocks (3 each), new tokens at positions 4, -, 0, 11, 7;
    q, k, v as they are or as 3 splits' partial sums (3 q heads, 1 k, 1 v; k and v with split strides of their
    own)."""
    tables = dict(slots=torch.tensor([4, -1, 24, 47, 55], device=device),
                  block_tables=torch.arange(15, dtype=torch.int32, device=device).view(5, 3),
                  context_lens=torch.tensor([5, 0, 1, 12, 8], dtype=torch.int32, device=device))  # fmt: skip
    if partial:
        partials = r(3, 5, 5, 8).float()
        qkv = (partials[:, :, :3], partials[:, :, 3:4].contiguous(), partials[:, :, 4:])
    else:
        qkv = (r(5, 3, 8), r(5, 1, 8), r(5, 1, 8))
    return (_cache_outputs(rotary_paged_decode_attention), _cache_outputs(rotary_paged_decode_attention_reference),
            (*qkv, cos, sin, r(15, 4, 1, 8), r(15, 4, 1, 8)), tables)


def _check_inputs(device, dtype):
    """The self-checks' inputs: ``r(*shape)`` draws a seeded random tensor; rotary tables of 5 tokens of 8 dims."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)  # noqa: E731
    angle = torch.randn(5, 4, generator=g)
    cos, sin = (t.to(dtype).to(device) for t in (torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()))
    return r, cos, sin


def _run_checks(cases: dict, tol: dict) -> str | None:
    """Each case's fused op against its reference: None when all agree, else the first failure."""
    for name, (fused, reference, args, kwargs) in cases.items():
        try:
            got, want = fused(*args, **kwargs), reference(*args, **kwargs)
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                torch.testing.assert_close(a, b, **tol)
        except Exception as e:  # noqa: BLE001 - any failure means: do not use the fusions here
            return f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None
