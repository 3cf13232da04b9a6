"""One query position per row attending to a cached prefix and the latent passes' own keys, with its backward:
the attention of the training latent block's one-position passes (`engine/model/latent_block.py`).

Why. Each of a step's latent passes runs this attention in every layer (6 passes x 24 layers at InternVL3-1B).
Written with torch ops (`one_query_attention_reference`: two score products, a join, scale, mask, softmax, a cast
and two value products) it is ~12 kernels forward and more than twice that backward, each a few microseconds
for a few MB of data. Here it is one kernel forward and one backward per layer and pass: a program per (row, KV
head) holds the KV head's query group and walks the keys once, with an online softmax forward and the saved
log-sum-exp backward.

    one_query_attention(q, prefix_k, prefix_v, new_k, new_v, blocked, scale) -> o

- ``q`` (B, KV, G, D): one position's query heads, grouped by the KV head they share (GQA groups G);
- ``prefix_k``, ``prefix_v`` (B, KV, P, D): the cached prefix; ``new_k``, ``new_v`` (B, KV, J, D): the keys and
  values of the passes so far (this one's last); the keys are the prefix's, then the new ones;
- ``blocked`` (B, P + J) bool: keys a row must not see (its padding);
- returns ``o`` (B, KV, G, D) in q's dtype: ``softmax(scale * q k^T, blocked keys out) v``.

Every input but ``blocked`` gets its gradient. Scores and the softmax are fp32; the probabilities are rounded
to the values' dtype before their products with the values and with the output gradient, as the reference rounds
them (its scores are rounded to the inputs' dtype by their product, the kernel's are not: bf16 results differ
by bf16 rounding; fp32 results to fp32 rounding). A row whose keys are all blocked gets zeros (the reference:
NaN); the block never makes one (a pass's own key is always real).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton's wheels are Linux-only: elsewhere the reference still imports (the engine's
    triton = tl = None  # reference layer ops call it), and the kernels say why they cannot run


def _jit(fn):
    return fn if triton is None else triton.jit(fn)

__all__ = ["one_query_attention", "one_query_attention_reference"]

BLOCK_KEYS = 64  # keys per step of a program's walk


def one_query_attention_reference(q, prefix_k, prefix_v, new_k, new_v, blocked, scale):
    """The same attention with torch ops (the block's path without the kernels: its CPU path and the spec)."""
    batch, kv, groups, dim = q.shape
    prefix_len = prefix_k.shape[-2]
    scores = torch.cat([q @ prefix_k.transpose(-1, -2), q @ new_k.transpose(-1, -2)], dim=-1)
    scores = scores.float().mul_(scale).masked_fill_(blocked[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).to(new_v.dtype)
    rows = batch * kv  # one matrix per (row, kv head): the prefix's product accumulates onto the rest
    o = torch.baddbmm(
        (probs[..., prefix_len:] @ new_v).reshape(rows, groups, dim),
        probs[..., :prefix_len].reshape(rows, groups, prefix_len),
        prefix_v.reshape(rows, prefix_len, dim),
    )
    return o.view(batch, kv, groups, dim)


@_jit
def _dot(a, b, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    if DOT_FP32:  # the interpreter's bf16 products are wrong (triton 3.6): products in fp32 there
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@_jit
def _group_offsets(groups, dim, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program's query-group rows and head dimensions, and which of them are real."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    return offs_g, offs_d, (offs_g[:, None] < groups) & (offs_d[None, :] < dim)


@_jit
def _group_tile(ptr, b, h, offs_g, offs_d, keep, s_b, s_h, s_g):
    """The (G, D) tile of one row's KV-head query group of a (B, KV, G, D) tensor (0 outside ``keep``)."""
    return tl.load(ptr + b * s_b + h * s_h + offs_g[:, None] * s_g + offs_d[None, :], mask=keep, other=0.0)


@_jit
def _load_keys(prefix_ptr, new_ptr, b, h, n, offs_d, prefix_len, keys, dim, sp_b, sp_h, sp_n, sn_b, sn_h, sn_n):
    """Rows n of the joined keys (or values): the prefix's below prefix_len, the new ones after; 0 past the end."""
    in_prefix = n < prefix_len
    in_new = (n >= prefix_len) & (n < keys)
    d_ok = offs_d[None, :] < dim
    from_prefix = tl.load(prefix_ptr + b * sp_b + h * sp_h + n[:, None] * sp_n + offs_d[None, :],
                          mask=in_prefix[:, None] & d_ok, other=0.0)  # fmt: skip
    new_n = tl.where(in_new, n - prefix_len, 0)
    from_new = tl.load(new_ptr + b * sn_b + h * sn_h + new_n[:, None] * sn_n + offs_d[None, :],
                       mask=in_new[:, None] & d_ok, other=0.0)  # fmt: skip
    return tl.where(in_prefix[:, None], from_prefix, from_new)


@_jit
def _key_block(
    q, pk_ptr, pv_ptr, nk_ptr, nv_ptr, blocked_ptr, b, h, start, offs_d, prefix_len, keys, dim, scale,
    sp_b, sp_h, sp_n, sn_b, sn_h, sn_n, sm_b, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    """One step of a program's walk over the joined keys, the same forward and backward: the key positions n, their
    keys and values, which of them the row may see, and the scaled scores q k^T (G, N) in fp32."""
    n = start + tl.arange(0, BLOCK_N)
    k = _load_keys(pk_ptr, nk_ptr, b, h, n, offs_d, prefix_len, keys, dim, sp_b, sp_h, sp_n, sn_b, sn_h, sn_n)
    v = _load_keys(pv_ptr, nv_ptr, b, h, n, offs_d, prefix_len, keys, dim, sp_b, sp_h, sp_n, sn_b, sn_h, sn_n)
    allowed = tl.load(blocked_ptr + b * sm_b + n, mask=n < keys, other=1) == 0
    return n, k, v, allowed, _dot(q, tl.trans(k), PRECISION, DOT_FP32) * scale


@_jit
def _one_query_attention_kernel(
    q_ptr, pk_ptr, pv_ptr, nk_ptr, nv_ptr, blocked_ptr, o_ptr, lse_ptr,
    kv_heads, groups, dim, prefix_len, keys, scale,
    sq_b, sq_h, sq_g, sp_b, sp_h, sp_n, sn_b, sn_h, sn_n, sm_b, so_b, so_h, so_g,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, h = pid // kv_heads, pid % kv_heads
    offs_g, offs_d, gd_ok = _group_offsets(groups, dim, BLOCK_G, BLOCK_D)
    q = _group_tile(q_ptr, b, h, offs_g, offs_d, gd_ok, sq_b, sq_h, sq_g)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for start in range(0, keys, BLOCK_N):
        n, k, v, allowed, s = _key_block(
            q, pk_ptr, pv_ptr, nk_ptr, nv_ptr, blocked_ptr, b, h, start, offs_d, prefix_len, keys, dim, scale,
            sp_b, sp_h, sp_n, sn_b, sn_h, sn_n, sm_b, BLOCK_N, PRECISION, DOT_FP32,
        )  # fmt: skip
        s = tl.where(allowed[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: exp(-inf - 0) = 0, no NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, DOT_FP32)
        m = m_new
    seen = l > 0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + offs_g[:, None] * so_g + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=gd_ok)  # fmt: skip
    lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), float("inf"))  # inf: every probability 0 backward
    tl.store(lse_ptr + pid * BLOCK_G + offs_g, lse)


@_jit
def _store_keys(prefix_ptr, new_ptr, b, h, n, offs_d, prefix_len, keys, dim, value,
                sp_b, sp_h, sp_n, sn_b, sn_h, sn_n):  # fmt: skip
    """Stores rows n of a joined-keys gradient to the prefix's gradient or the new keys' gradient."""
    in_prefix = n < prefix_len
    in_new = (n >= prefix_len) & (n < keys)
    d_ok = offs_d[None, :] < dim
    value = value.to(prefix_ptr.dtype.element_ty)
    tl.store(prefix_ptr + b * sp_b + h * sp_h + n[:, None] * sp_n + offs_d[None, :], value,
             mask=in_prefix[:, None] & d_ok)  # fmt: skip
    new_n = tl.where(in_new, n - prefix_len, 0)
    tl.store(new_ptr + b * sn_b + h * sn_h + new_n[:, None] * sn_n + offs_d[None, :], value,
             mask=in_new[:, None] & d_ok)  # fmt: skip


@_jit
def _one_query_attention_backward_kernel(
    q_ptr, pk_ptr, pv_ptr, nk_ptr, nv_ptr, blocked_ptr, o_ptr, do_ptr, lse_ptr,
    dq_ptr, dpk_ptr, dpv_ptr, dnk_ptr, dnv_ptr,
    kv_heads, groups, dim, prefix_len, keys, scale,
    sq_b, sq_h, sq_g, sp_b, sp_h, sp_n, sn_b, sn_h, sn_n, sm_b, so_b, so_h, so_g, sd_b, sd_h, sd_g,
    sdq_b, sdq_h, sdq_g, sgp_b, sgp_h, sgp_n, sgn_b, sgn_h, sgn_n,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, h = pid // kv_heads, pid % kv_heads
    offs_g, offs_d, gd_ok = _group_offsets(groups, dim, BLOCK_G, BLOCK_D)
    q = _group_tile(q_ptr, b, h, offs_g, offs_d, gd_ok, sq_b, sq_h, sq_g)
    o = _group_tile(o_ptr, b, h, offs_g, offs_d, gd_ok, so_b, so_h, so_g)
    do = _group_tile(do_ptr, b, h, offs_g, offs_d, gd_ok, sd_b, sd_h, sd_g)
    lse = tl.load(lse_ptr + pid * BLOCK_G + offs_g)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(dO * O): the softmax backward's term
    dq = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for start in range(0, keys, BLOCK_N):
        n, k, v, allowed, s = _key_block(
            q, pk_ptr, pv_ptr, nk_ptr, nv_ptr, blocked_ptr, b, h, start, offs_d, prefix_len, keys, dim, scale,
            sp_b, sp_h, sp_n, sn_b, sn_h, sn_n, sm_b, BLOCK_N, PRECISION, DOT_FP32,
        )  # fmt: skip
        p = tl.where(allowed[None, :], tl.exp(s - lse[:, None]), 0.0)  # (G, N) fp32
        p_in = p.to(v.dtype)
        dv = _dot(tl.trans(p_in), do, PRECISION, DOT_FP32)  # (N, D)
        dp = _dot(do, tl.trans(v), PRECISION, DOT_FP32)  # (G, N)
        ds = p * (dp - delta[:, None])
        ds_in = ds.to(q.dtype)
        dq += _dot(ds_in, k, PRECISION, DOT_FP32)
        dk = _dot(tl.trans(ds_in), q, PRECISION, DOT_FP32) * scale  # (N, D)
        _store_keys(dpk_ptr, dnk_ptr, b, h, n, offs_d, prefix_len, keys, dim, dk, sgp_b, sgp_h, sgp_n, sgn_b, sgn_h, sgn_n)
        _store_keys(dpv_ptr, dnv_ptr, b, h, n, offs_d, prefix_len, keys, dim, dv, sgp_b, sgp_h, sgp_n, sgn_b, sgn_h, sgn_n)
    dq = dq * scale
    tl.store(dq_ptr + b * sdq_b + h * sdq_h + offs_g[:, None] * sdq_g + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=gd_ok)  # fmt: skip


def _launch_shape(groups: int, dim: int) -> dict:
    # tl.dot needs every dimension >= 16
    return {"BLOCK_G": max(16, triton.next_power_of_2(groups)), "BLOCK_D": max(16, triton.next_power_of_2(dim)),
            "BLOCK_N": BLOCK_KEYS}  # fmt: skip


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else None  # fp32 inputs: exact products, not TF32


def _interpreted() -> bool:
    """Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 when they were decorated)."""
    return type(_one_query_attention_kernel).__name__ == "InterpretedFunction"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _OneQueryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, prefix_k, prefix_v, new_k, new_v, blocked, scale):
        batch, kv, groups, dim = q.shape
        prefix_len, keys = prefix_k.shape[-2], prefix_k.shape[-2] + new_k.shape[-2]
        shape = _launch_shape(groups, dim)
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(batch * kv, shape["BLOCK_G"], dtype=torch.float32, device=q.device)
        blocked = blocked.to(torch.uint8)
        if batch * kv:
            _one_query_attention_kernel[(batch * kv,)](
                q, prefix_k, prefix_v, new_k, new_v, blocked, o, lse,
                kv, groups, dim, prefix_len, keys, float(scale),
                q.stride(0), q.stride(1), q.stride(2), prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
                new_k.stride(0), new_k.stride(1), new_k.stride(2), blocked.stride(0),
                o.stride(0), o.stride(1), o.stride(2),
                PRECISION=_precision(q.dtype), DOT_FP32=_interpreted(), **shape,
            )  # fmt: skip
        ctx.save_for_backward(q, prefix_k, prefix_v, new_k, new_v, blocked, o, lse)
        ctx.scale = float(scale)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_o):
        q, prefix_k, prefix_v, new_k, new_v, blocked, o, lse = ctx.saved_tensors
        batch, kv, groups, dim = q.shape
        prefix_len, keys = prefix_k.shape[-2], prefix_k.shape[-2] + new_k.shape[-2]
        grad_o = _last_dim_contiguous(grad_o)
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        d_prefix = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (prefix_k, prefix_v)]
        d_new = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (new_k, new_v)]
        if batch * kv:
            _one_query_attention_backward_kernel[(batch * kv,)](
                q, prefix_k, prefix_v, new_k, new_v, blocked, o, grad_o, lse,
                dq, d_prefix[0], d_prefix[1], d_new[0], d_new[1],
                kv, groups, dim, prefix_len, keys, ctx.scale,
                q.stride(0), q.stride(1), q.stride(2), prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
                new_k.stride(0), new_k.stride(1), new_k.stride(2), blocked.stride(0),
                o.stride(0), o.stride(1), o.stride(2), grad_o.stride(0), grad_o.stride(1), grad_o.stride(2),
                dq.stride(0), dq.stride(1), dq.stride(2), d_prefix[0].stride(0), d_prefix[0].stride(1), d_prefix[0].stride(2),
                d_new[0].stride(0), d_new[0].stride(1), d_new[0].stride(2),
                PRECISION=_precision(q.dtype), DOT_FP32=_interpreted(), **_launch_shape(groups, dim),
            )  # fmt: skip
        return dq, d_prefix[0], d_prefix[1], d_new[0], d_new[1], None, None


def one_query_attention(q, prefix_k, prefix_v, new_k, new_v, blocked, scale):
    """See the module docstring. Shapes are checked; the last dimension of each tensor must be contiguous (copied
    where it is not)."""
    if triton is None:
        raise RuntimeError("one_query_attention needs Triton, which is not installed here (its reference needs none)")
    if q.dim() != 4:
        raise ValueError(f"q must be (B, KV, G, D), got {tuple(q.shape)}")
    batch, kv, _, dim = q.shape
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v), ("new_k", new_k), ("new_v", new_v)):
        if t.dim() != 4 or t.shape[:2] != (batch, kv) or t.shape[-1] != dim:
            raise ValueError(f"{name} must be (B={batch}, KV={kv}, positions, D={dim}), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} is {t.dtype}, q is {q.dtype}: one dtype for all")
    if prefix_k.shape != prefix_v.shape or new_k.shape != new_v.shape:
        raise ValueError(
            f"keys and values must match: prefix {tuple(prefix_k.shape)} vs {tuple(prefix_v.shape)}, "
            f"new {tuple(new_k.shape)} vs {tuple(new_v.shape)}"
        )
    keys = prefix_k.shape[-2] + new_k.shape[-2]
    if blocked.shape != (batch, keys) or blocked.dtype != torch.bool:
        raise ValueError(f"blocked must be a bool (B={batch}, keys={keys}) mask, got {blocked.dtype} {tuple(blocked.shape)}")
    q, prefix_k, prefix_v, new_k, new_v = map(_last_dim_contiguous, (q, prefix_k, prefix_v, new_k, new_v))
    if prefix_k.stride() != prefix_v.stride() or new_k.stride() != new_v.stride():  # one set of strides each
        prefix_k, prefix_v, new_k, new_v = (t.contiguous() for t in (prefix_k, prefix_v, new_k, new_v))
    blocked = blocked if blocked.stride(-1) == 1 else blocked.contiguous()
    return _OneQueryAttention.apply(q, prefix_k, prefix_v, new_k, new_v, blocked, scale)
