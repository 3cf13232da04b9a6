"""The decode fusions with their backward: RMSNorm (with the residual add), rotary embedding and SwiGLU, for
training's one-position passes (the latent block, `engine/model/latent_block.py`); and the vision tower's
LayerNorm with its layer-scaled residual add (`engine/model/vision_layers.py`).

Why. A training step's latent passes are 6 one-position passes × 24 layers, forward and backward; each layer's
norms, rotary embedding, SwiGLU product and residual adds run through transformers' modules as ~30 tiny kernels
forward and more backward (autograd's own products, sums and casts). Inside the block's CUDA graphs each still
costs a few microseconds. Here each op is one kernel forward (`kernels.decode_fusions`) and one backward: at the
InternVL3-1B geometry, batch 64, 6 latents, a training step launches 19,451 kernels instead of 29,567 and takes
24 ms less (benchmarks/RESULTS.md, `benchmarks/bench_block_ops.py`). The vision tower's case is bytes as much as
launches: 64 tiles × 1,025 positions × 1,024 features through 24 InternViT layers, where the layer-scale product,
the residual add and the LayerNorm each read and write the whole activation, forward and backward
(benchmarks/RESULTS.md, "the language model's passes through the layer stack").

Entry points (differentiable, any leading shape, last dimension the feature one), each backed by a PyTorch
reference (those of `kernels.decode_fusions`, and `layer_norm_reference` here; autograd through a reference is
the reference gradient):

- `rms_norm_grad(x, weight, eps, residual=None)`: as `decode_fusions.rms_norm`; the gradient of the sum
  ``residual + x`` (when it is returned and used) joins the norm's;
- `rotary_qk_grad(q, k, cos, sin)`: as `decode_fusions.rotary_qk` over (*tokens, heads, D) with cos/sin
  (*tokens, D), which take no gradient (they come from positions);
- `silu_mul_grad(gate, up)`: ``silu(gate) * up``;
- `layer_norm_grad(x, weight, bias, eps, residual=None, scale=None)`: ``F.layer_norm`` of x, or with
  ``residual`` of ``s = residual + scale * x`` (InternVLVisionLayer's ``lambda_1 * attention + hidden_states``),
  returning ``(norm(s), s)``; one kernel forward (its own, here) and one backward, which also gives ``scale``,
  ``weight`` and ``bias`` their gradients (sums over the rows).

The kernels round where autograd through the modules rounds (the products ``g * weight``, ``g * sin``,
``g * up``, ``scale * x`` and ``ds * x`` in the input dtype; statistics, the silu derivative and the LayerNorm
backward in fp32), so that bf16 gradients follow the modules' (the tests compare them within bf16 tolerances: the
interpreter truncates where the GPU rounds; on the GPU the elementwise ones are autograd's bit for bit) and fp32
gradients match to fp32 rounding. Those roundings go through `kernels.paged_kv.round_to`: triton 3.6 folded the
``.to(bf16).to(fp32)`` round trips they were written as before (the layer-scale product's, here). The norms'
weight (and bias, and layer-scale) gradients are summed in fp32 per program, then over programs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.decode_fusions import _launch_per_token, rms_norm, rotary_qk, silu_mul
from kernels.paged_kv import _sm_count, round_to

__all__ = [
    "layer_grads_self_check",
    "layer_norm_grad",
    "layer_norm_reference",
    "rms_norm_grad",
    "rotary_qk_grad",
    "silu_mul_grad",
]

# The norm backwards' launch shapes, from sweeps on an H200 (bf16, triton 3.6; benchmarks/RESULTS.md, 2026-12-01):
# at most 8 programs per SM (1,056 on 132 SMs; each program leaves fp32 partial sums of the weights' gradients).
# With at most 512, the last wave ran part-empty: the vision layers' LayerNorm backward (65,600 x 1,024, 4 rows per
# step) took 429 us in 483 programs against 260 in 1,025, and a stack pass's RMSNorm backward (20,480 x 896) 149 us
# in 512 programs against 71 in 1,024 of one row per step (89-160 us with 2-8 rows). 4 warps at H = 1,024.
_PROGRAMS_PER_SM = 8
_HOPPER_SMS = 132  # off the GPU (the interpreter) the H100/H200's count, so that CPU tests sum as the GPU does


def _norm_programs(device: torch.device) -> int:
    """The most programs (and partial-sum rows) of a norm backward on ``device``."""
    return _PROGRAMS_PER_SM * (_sm_count(device) if device.type == "cuda" else _HOPPER_SMS)


def _norm_warps(hidden: int) -> int:
    return min(max(triton.next_power_of_2(hidden) // 256, 1), 16)


def _norm_block_rows(block_h: int) -> int:
    """Rows per step of a norm backward program (a 2-D block: their loads and reductions overlap)."""
    return max(1, min(8, 4096 // block_h))


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _rms_norm_backward_kernel(
    s_ptr,
    g_ptr,
    g_sum_ptr,
    weight_ptr,
    dx_ptr,
    d_residual_ptr,
    dw_partial_ptr,
    rows,
    hidden,
    rows_per_program,
    stride_s,
    stride_g,
    stride_gs,
    stride_dx,
    stride_dr,
    eps,
    HAS_SUM_GRAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # BLOCK_R rows at a time (a 2-D block: their loads and reductions overlap), over a runtime row count (one
    # compiled kernel for the latent block's 64 rows and a prefix pass's ~20,000)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)[None, :]
    keep = cols < hidden
    w = tl.load(weight_ptr + cols, mask=keep, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)  # the weight's sum over this program's rows
    first = pid.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, BLOCK_R):
        row = first + start + tl.arange(0, BLOCK_R)[:, None]  # (BLOCK_R, 1)
        mask = keep & (row < rows)
        s = tl.load(s_ptr + row * stride_s + cols, mask=mask, other=0.0)
        sf = s.to(tl.float32)
        rstd = tl.math.rsqrt((tl.sum(sf * sf, axis=1)[:, None] / hidden + eps).to(tl.float32))
        normed = round_to(sf * rstd, s.dtype)  # the forward's rounding before the weight
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        dw += tl.sum(tl.where(mask, round_to(g * normed, s.dtype), 0.0), axis=0)  # g * normed rounded as autograd's
        dn = round_to(g * w, s.dtype)  # the gradient of the rounded normed value
        dot = tl.sum(dn * sf, axis=1)[:, None]
        dx = round_to(rstd * dn - rstd * rstd * rstd * sf * (dot / hidden), s.dtype)
        if HAS_SUM_GRAD:  # the residual stream's own gradient joins, one rounded add as autograd's accumulation
            gs = tl.load(g_sum_ptr + row * stride_gs + cols, mask=mask, other=0.0)
            dx = round_to(dx + gs.to(tl.float32), s.dtype)
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(s.dtype), mask=mask)
        if HAS_RESIDUAL:  # the same values, in the residual's own tensor (two leaves must not share a .grad)
            tl.store(d_residual_ptr + row * stride_dr + cols, dx.to(s.dtype), mask=mask)
    out = pid * hidden + tl.arange(0, BLOCK_H)
    tl.store(dw_partial_ptr + out, dw, mask=tl.arange(0, BLOCK_H) < hidden)


@triton.jit
def _layer_norm_kernel(
    x_ptr,
    residual_ptr,
    scale_ptr,
    weight_ptr,
    bias_ptr,
    sum_ptr,
    out_ptr,
    mean_ptr,
    rstd_ptr,
    hidden,
    stride_x,
    stride_r,
    stride_s,
    stride_o,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    keep = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=keep, other=0.0)
    if HAS_RESIDUAL:
        xf = x.to(tl.float32)
        if HAS_SCALE:  # scale * x, rounded like the layer-scale product's output
            xf = round_to(tl.load(scale_ptr + cols, mask=keep, other=0.0).to(tl.float32) * xf, x.dtype)
        r = tl.load(residual_ptr + row * stride_r + cols, mask=keep, other=0.0)
        xf = round_to(r.to(tl.float32) + xf, x.dtype)  # residual + scale * x, rounded like the PyTorch add
        tl.store(sum_ptr + row * stride_s + cols, xf.to(x.dtype), mask=keep)
    else:
        xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / hidden
    centred = tl.where(keep, xf - mean, 0.0)
    # fp32 statistics, one rounding of the affine result (as F.layer_norm in bf16); eps may arrive as fp64
    rstd = tl.math.rsqrt((tl.sum(centred * centred, axis=0) / hidden + eps).to(tl.float32))
    tl.store(mean_ptr + row, mean)  # kept for the backward, as the native layer norm keeps them
    tl.store(rstd_ptr + row, rstd)
    y = centred * rstd
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=keep, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(x.dtype), mask=keep)


@triton.jit
def _layer_norm_backward_kernel(
    s_ptr,
    x_ptr,
    g_ptr,
    g_sum_ptr,
    mean_ptr,
    rstd_ptr,
    scale_ptr,
    weight_ptr,
    dx_ptr,
    d_residual_ptr,
    dw_partial_ptr,
    db_partial_ptr,
    dscale_partial_ptr,
    rows,
    hidden,
    rows_per_program,
    stride_s,
    stride_x,
    stride_g,
    stride_gs,
    stride_dx,
    stride_dr,
    HAS_SUM_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    STORE_DX: tl.constexpr,
    STORE_DR: tl.constexpr,
    DW: tl.constexpr,
    DB: tl.constexpr,
    DSCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # BLOCK_R rows at a time (a 2-D block): their loads and reductions overlap instead of following each other;
    # the statistics come from the forward (fp32), as the native layer norm's backward takes them
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)[None, :]
    keep = cols < hidden
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=keep, other=0.0).to(tl.float32)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + cols, mask=keep, other=0.0).to(tl.float32)
    # the weight, bias and scale sums over this program's rows, one row block added at a time: (BLOCK_H,) each,
    # where (BLOCK_R, BLOCK_H) accumulators took three tiles of registers beside the row block's own
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    db = tl.zeros([BLOCK_H], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_H], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, BLOCK_R):  # a runtime bound: one compiled kernel for every row count
        row = first + start + tl.arange(0, BLOCK_R)[:, None]  # (BLOCK_R, 1)
        in_rows = row < rows
        mask = keep & in_rows
        s = tl.load(s_ptr + row * stride_s + cols, mask=mask, other=0.0)
        mean = tl.load(mean_ptr + row, mask=in_rows, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=in_rows, other=0.0)
        normed = tl.where(mask, (s.to(tl.float32) - mean) * rstd, 0.0)
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        if DW:
            dw += tl.sum(g * normed, axis=0)  # fp32 throughout, as the native layer-norm backward sums it
        if DB:
            db += tl.sum(g, axis=0)
        dn = g
        if HAS_WEIGHT:
            dn = g * w
        c1 = tl.sum(dn, axis=1)[:, None] / hidden
        c2 = tl.sum(dn * normed, axis=1)[:, None] / hidden
        ds = round_to(tl.where(mask, rstd * (dn - c1 - normed * c2), 0.0), s.dtype)  # the norm's input gradient
        if HAS_SUM_GRAD:  # the sum's own gradient joins, one rounded add as autograd's accumulation
            gs = tl.load(g_sum_ptr + row * stride_gs + cols, mask=mask, other=0.0)
            ds = round_to(ds + gs.to(tl.float32), s.dtype)
        if STORE_DR:  # the residual's own tensor (two leaves must not share a .grad)
            tl.store(d_residual_ptr + row * stride_dr + cols, ds.to(s.dtype), mask=mask)
        if HAS_SCALE:
            dsf = ds
            if DSCALE:  # ds * x rounded per element, then summed: autograd's broadcast-product gradient
                xf = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dscale += tl.sum(tl.where(mask, round_to(dsf * xf, s.dtype), 0.0), axis=0)
            if STORE_DX:
                tl.store(dx_ptr + row * stride_dx + cols, (dsf * sc).to(s.dtype), mask=mask)
        else:
            if STORE_DX:
                tl.store(dx_ptr + row * stride_dx + cols, ds.to(s.dtype), mask=mask)
    out = pid * hidden + tl.arange(0, BLOCK_H)
    in_cols = tl.arange(0, BLOCK_H) < hidden
    if DW:
        tl.store(dw_partial_ptr + out, dw, mask=in_cols)
    if DB:
        tl.store(db_partial_ptr + out, db, mask=in_cols)
    if DSCALE:
        tl.store(dscale_partial_ptr + out, dscale, mask=in_cols)


@triton.jit
def _rotate_back(g_ptr, out_ptr, cos, sin_partner, partner, sign, token, stride_t, stride_h, stride_ot, stride_oh,
                 heads, head_dim, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """The gradient of ``x * cos + rotate_half(x) * sin`` for one token's heads: ``g * cos`` plus the transpose
    of rotate_half applied to ``g * sin`` ((a, b) -> (b, -a)), each product rounded as autograd's."""
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    keep = (h < heads) & (d < head_dim)
    base = g_ptr + token * stride_t + h * stride_h
    g = tl.load(base + d, mask=keep, other=0.0)
    g_partner = tl.load(base + partner, mask=keep, other=0.0).to(tl.float32)
    a = round_to(g.to(tl.float32) * cos, g.dtype)
    b = round_to(g_partner * sin_partner, g.dtype) * sign
    tl.store(out_ptr + token * stride_ot + h * stride_oh + d, (a + b).to(g.dtype), mask=keep)


@triton.jit
def _rotary_qk_backward_kernel(
    gq_ptr,
    gk_ptr,
    dq_ptr,
    dk_ptr,
    cos_ptr,
    sin_ptr,
    q_heads,
    k_heads,
    head_dim,
    stride_gqt,
    stride_gqh,
    stride_gkt,
    stride_gkh,
    stride_dqt,
    stride_dqh,
    stride_dkt,
    stride_dkh,
    stride_ct,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    in_dim = d < head_dim
    half = head_dim // 2
    partner = tl.where(d < half, d + half, d - half)
    cos = tl.load(cos_ptr + token * stride_ct + d, mask=in_dim, other=0.0).to(tl.float32)
    sin_partner = tl.load(sin_ptr + token * stride_ct + partner, mask=in_dim, other=0.0).to(tl.float32)
    sign = tl.where(d < half, 1.0, -1.0)
    _rotate_back(gq_ptr, dq_ptr, cos, sin_partner, partner, sign, token, stride_gqt, stride_gqh, stride_dqt,
                 stride_dqh, q_heads, head_dim, BLOCK_QH, BLOCK_D)  # fmt: skip
    _rotate_back(gk_ptr, dk_ptr, cos, sin_partner, partner, sign, token, stride_gkt, stride_gkh, stride_dkt,
                 stride_dkh, k_heads, head_dim, BLOCK_KH, BLOCK_D)  # fmt: skip


@triton.jit
def _silu_mul_backward_kernel(
    gate_ptr, up_ptr, g_ptr, d_gate_ptr, d_up_ptr, width, stride_gate, stride_up, stride_g, stride_dg, stride_du,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < width
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=keep, other=0.0)
    gf = gate.to(tl.float32)
    uf = tl.load(up_ptr + row * stride_up + cols, mask=keep, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=keep, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-gf))
    act = round_to(gf * sig, gate.dtype)  # silu(gate) as the forward rounded it
    d_act = round_to(g * uf, gate.dtype)
    tl.store(d_up_ptr + row * stride_du + cols, (g * act).to(gate.dtype), mask=keep)
    tl.store(d_gate_ptr + row * stride_dg + cols, (d_act * sig * (1.0 + gf * (1.0 - sig))).to(gate.dtype), mask=keep)


# ------------------------------------------------------------------------------------------ autograd functions


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """(*rows, width) -> (rows, width), a view where the layout allows."""
    return _last_dim_contiguous(t.reshape(-1, t.shape[-1]))


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        if residual is None:
            out, summed = rms_norm(x, weight, eps), x
        else:
            out, summed = rms_norm(x, weight, eps, residual=residual)
        ctx.save_for_backward(summed, weight)
        ctx.eps, ctx.has_residual = eps, residual is not None
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read
        return out if residual is None else (out, summed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_sum=None):
        summed, weight = ctx.saved_tensors
        rows, hidden = summed.shape
        if g_out is None:  # only the sum was used: its gradient passes to both addends
            if g_sum is None or not ctx.has_residual:
                return g_sum, None, None, None
            return g_sum, g_sum.clone(), None, None
        g_out = _last_dim_contiguous(g_out)
        g_sum = None if g_sum is None else _last_dim_contiguous(g_sum)
        dx = torch.empty_like(summed)
        d_residual = torch.empty_like(summed) if ctx.has_residual else dx
        block_h = triton.next_power_of_2(hidden)
        block_r = 1  # one row per step: the fastest at a prefix pass's rows (the latent block's: one per program)
        per_program = triton.cdiv(max(rows, 1), _norm_programs(summed.device))
        programs = triton.cdiv(rows, per_program)
        partial = torch.empty(programs, hidden, dtype=torch.float32, device=summed.device)
        if rows:
            _rms_norm_backward_kernel[(programs,)](
                summed,
                g_out,
                g_sum if g_sum is not None else g_out,
                weight,
                dx,
                d_residual,
                partial,
                rows,
                hidden,
                per_program,
                summed.stride(0),
                g_out.stride(0),
                (g_sum if g_sum is not None else g_out).stride(0),
                dx.stride(0),
                d_residual.stride(0),
                float(ctx.eps),
                HAS_SUM_GRAD=g_sum is not None,
                HAS_RESIDUAL=ctx.has_residual,
                BLOCK_R=block_r,
                BLOCK_H=block_h,
                num_warps=_norm_warps(hidden),
            )
        d_weight = partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, (d_residual if ctx.has_residual else None), d_weight, None


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, scale, weight, bias, eps):
        rows, hidden = x.shape
        out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
        summed = torch.empty_like(out) if residual is not None else x
        stats = torch.empty(2, rows, dtype=torch.float32, device=x.device)  # mean, rstd
        if rows:
            _layer_norm_kernel[(rows,)](
                x,
                residual if residual is not None else x,
                scale if scale is not None else x,
                weight if weight is not None else x,
                bias if bias is not None else x,
                summed,
                out,
                stats[0],
                stats[1],
                hidden,
                x.stride(0),
                (residual if residual is not None else x).stride(0),
                summed.stride(0),
                out.stride(0),
                float(eps),
                HAS_RESIDUAL=residual is not None,
                HAS_SCALE=scale is not None,
                HAS_WEIGHT=weight is not None,
                HAS_BIAS=bias is not None,
                BLOCK_H=triton.next_power_of_2(hidden),
                num_warps=_norm_warps(hidden),
            )
        # x is kept only for the scale's gradient (sum over rows of x * ds)
        keep_x = scale is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(summed, stats, x if keep_x else None, scale, weight)
        ctx.has_residual, ctx.has_bias = residual is not None, bias is not None
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read
        if residual is None:
            return out
        return out, summed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_sum=None):
        summed, stats, x, scale, weight = ctx.saved_tensors
        need_x, need_residual, need_scale, need_weight, need_bias = ctx.needs_input_grad[:5]
        rows, hidden = summed.shape
        if g_out is None:  # only the sum was used: its gradient passes to both addends, no norm backward
            if g_sum is None or not ctx.has_residual:
                return None, None, None, None, None, None
            if scale is None:
                return g_sum, (g_sum.clone() if need_residual else None), None, None, None, None
            d_scale = (g_sum * x).sum(0) if need_scale else None  # autograd's rounding: per element, then summed
            return (g_sum * scale if need_x else None), g_sum, d_scale, None, None, None
        g_out = _last_dim_contiguous(g_out)
        g_sum = None if g_sum is None else _last_dim_contiguous(g_sum)
        has_scale = scale is not None
        store_dr = ctx.has_residual and need_residual
        dx = torch.empty_like(summed) if need_x else None
        d_residual = torch.empty_like(summed) if store_dr else None
        block_h = triton.next_power_of_2(hidden)
        block_r = _norm_block_rows(block_h)
        per_program = triton.cdiv(triton.cdiv(max(rows, 1), _norm_programs(summed.device)), block_r) * block_r
        programs = triton.cdiv(rows, per_program)
        dw, db, dscale = need_weight and weight is not None, need_bias and ctx.has_bias, need_scale and has_scale
        partials = torch.empty(3, programs, hidden, dtype=torch.float32, device=summed.device)
        if rows and (need_x or store_dr or dw or db or dscale):
            _layer_norm_backward_kernel[(programs,)](
                summed,
                x if x is not None else summed,
                g_out,
                g_sum if g_sum is not None else g_out,
                stats[0],
                stats[1],
                scale if has_scale else summed,
                weight if weight is not None else summed,
                dx if dx is not None else summed,
                d_residual if d_residual is not None else summed,
                partials[0],
                partials[1],
                partials[2],
                rows,
                hidden,
                per_program,
                summed.stride(0),
                x.stride(0) if x is not None else 0,
                g_out.stride(0),
                (g_sum if g_sum is not None else g_out).stride(0),
                dx.stride(0) if dx is not None else 0,
                d_residual.stride(0) if d_residual is not None else 0,
                HAS_SUM_GRAD=g_sum is not None,
                HAS_SCALE=has_scale,
                HAS_WEIGHT=weight is not None,
                STORE_DX=need_x,
                STORE_DR=store_dr,
                DW=dw,
                DB=db,
                DSCALE=dscale,
                BLOCK_R=block_r,
                BLOCK_H=block_h,
                num_warps=_norm_warps(hidden),
            )
        dtype = summed.dtype  # the parameters' dtype (checked at the entry point)
        # one reduction for every partial sum (three separate column sums took ~30 us each on an H200)
        sums = partials.sum(1).to(dtype) if (dw or db or dscale) else None
        d_weight = sums[0] if dw else None
        d_bias = sums[1] if db else None
        d_scale = sums[2] if dscale else None
        return dx, d_residual, d_scale, d_weight, d_bias, None


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotary_qk(q, k, cos, sin)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_q, g_k):
        cos, sin = ctx.saved_tensors  # an unused output's gradient arrives as zeros (materialized)
        d_q, d_k = _launch_per_token(_rotary_qk_backward_kernel, g_q, g_k, cos, sin)
        return d_q, d_k, None, None


class _SiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return silu_mul(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        g = _last_dim_contiguous(g)
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        rows, width = gate.shape
        block = min(1024, triton.next_power_of_2(max(width, 1)))
        if rows and width:
            _silu_mul_backward_kernel[(rows, triton.cdiv(width, block))](
                gate, up, g, d_gate, d_up, width, gate.stride(0), up.stride(0), g.stride(0), d_gate.stride(0),
                d_up.stride(0), BLOCK=block,
            )  # fmt: skip
        return d_gate, d_up


# ------------------------------------------------------------------------------------------------ entry points


def rms_norm_grad(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`decode_fusions.rms_norm` over (*rows, H) with gradients for ``x``, ``residual`` and ``weight`` (the
    weight must have the input's dtype, as the fused kernels round in it)."""
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match the input's {x.dtype}")
    weight = weight if weight.is_contiguous() else weight.contiguous()  # both kernels read it by position
    shape = x.shape
    rows = _rows_view(x)
    if residual is None:
        return _RMSNormFunction.apply(rows, None, weight, eps).view(shape)
    if residual.shape != shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(shape)}")
    out, summed = _RMSNormFunction.apply(rows, _rows_view(residual), weight, eps)
    return out.view(shape), summed.view(shape)


def layer_norm_grad(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.layer_norm(x, (H,), weight, bias, eps)`` over (*rows, H); with ``residual``, of the layer-scaled sum
    ``s = residual + scale * x`` (``residual + x`` without ``scale``), returning ``(norm(s), s)``. Gradients for
    ``x``, ``residual``, ``scale``, ``weight`` and ``bias`` (``weight``/``bias`` may be None: no affine term); the
    parameters must have the input's dtype, as the kernels round in it."""
    if x.dim() < 1:
        raise ValueError(f"x must have a feature dimension, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    params = {"scale": scale, "weight": weight, "bias": bias}
    for name, p in params.items():
        if p is None:
            continue
        if p.shape != (hidden,):
            raise ValueError(f"{name} must be ({hidden},), the last dimension of x {tuple(x.shape)}, got {tuple(p.shape)}")
        if p.dtype != x.dtype:
            raise ValueError(f"{name} dtype {p.dtype} must match the input's {x.dtype}")
    scale, weight, bias = (None if p is None else _last_dim_contiguous(p) for p in params.values())
    shape = x.shape
    rows = _rows_view(x)
    if residual is None:
        if scale is not None:
            raise ValueError("scale multiplies x before the residual add: it needs a residual")
        return _LayerNormFunction.apply(rows, None, None, weight, bias, eps).view(shape)
    if residual.shape != shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(shape)}")
    if residual.dtype != x.dtype:
        raise ValueError(f"residual dtype {residual.dtype} must match the input's {x.dtype}")
    out, summed = _LayerNormFunction.apply(rows, _rows_view(residual), scale, weight, bias, eps)
    return out.view(shape), summed.view(shape)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`layer_norm_grad` in PyTorch: InternVLVisionLayer's ``lambda_1 * attention + hidden_states`` (each
    rounded to the input dtype) and `nn.LayerNorm` of it."""
    if residual is None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    summed = residual + (x if scale is None else scale * x)
    return F.layer_norm(summed, (x.shape[-1],), weight, bias, eps), summed


def rotary_qk_grad(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_fusions.rotary_qk` of q (*tokens, q_heads, D) and k (*tokens, kv_heads, D) with cos/sin
    (*tokens, D), with gradients for q and k."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rotary_qk_grad takes no gradient for cos and sin (they come from positions)")
    if q.shape[:-2] != k.shape[:-2] or cos.shape[:-1] != q.shape[:-2]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and cos {tuple(cos.shape)} must share the token dimensions"
        )
    q3, k3 = q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:])
    q_rot, k_rot = _RotaryFunction.apply(q3, k3, cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1]))
    return q_rot.view(q.shape), k_rot.view(k.shape)


def silu_mul_grad(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` over (*rows, I) with gradients for both."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must match")
    return _SiluMulFunction.apply(_rows_view(gate), _rows_view(up)).view(gate.shape)


def layer_grads_self_check(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Each op forward and backward once on small inputs on ``device`` against autograd through its reference:
    None when all agree, else why not. Callers that switch these on by default check first (also from inside
    no_grad or inference mode, e.g. an evaluation forward: the check turns gradients on for itself)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _self_check(device, dtype)


def _self_check(device, dtype) -> str | None:
    from kernels.decode_fusions import rms_norm_reference, rotary_qk_reference, silu_mul_reference
    from kernels.one_query_attention import one_query_attention, one_query_attention_reference

    g = torch.Generator().manual_seed(0)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=3e-2)
    angle = torch.randn(2, 3, 4, generator=g)
    cos, sin = (t.to(dtype).to(device) for t in (torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()))

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device).requires_grad_(True)

    cases = {
        "rms_norm_grad": (rms_norm_grad, rms_norm_reference, (leaf(2, 3, 48), leaf(48), 1e-6), {"residual": leaf(2, 3, 48)}),
        "rotary_qk_grad": (rotary_qk_grad, lambda q, k, c, s: rotary_qk_reference(q.reshape(6, 3, 8), k.reshape(6, 1, 8), c.reshape(6, 8), s.reshape(6, 8)),
                           (leaf(2, 3, 3, 8), leaf(2, 3, 1, 8), cos, sin), {}),
        "silu_mul_grad": (silu_mul_grad, silu_mul_reference, (leaf(2, 3, 40), leaf(2, 3, 40)), {}),
        "layer_norm_grad": (layer_norm_grad, layer_norm_reference, (leaf(2, 3, 48), leaf(48), leaf(48), 1e-6),
                            {"residual": leaf(2, 3, 48), "scale": leaf(48)}),
        "layer_norm_grad (no residual)": (layer_norm_grad, layer_norm_reference, (leaf(5, 40), leaf(40), leaf(40), 1e-6), {}),
        "one_query_attention": (one_query_attention, one_query_attention_reference,
                                (leaf(2, 2, 3, 16), leaf(2, 2, 70, 16), leaf(2, 2, 70, 16), leaf(2, 2, 2, 16), leaf(2, 2, 2, 16),
                                 (torch.arange(72, device=device) % 5 == 1).expand(2, 72), 0.25), {}),
    }  # fmt: skip
    for name, (fused, reference, args, kwargs) in cases.items():
        try:
            inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
            results = []
            for fn in (fused, reference):
                outs = fn(*args, **kwargs)
                outs = outs if isinstance(outs, tuple) else (outs,)
                weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o) for i, o in enumerate(outs)]
                loss = sum((o.float() * w.float()).sum() for o, w in zip(outs, weights))
                grads = torch.autograd.grad(loss, inputs)
                results.append([o.reshape(-1) for o in outs] + list(grads))
            for a, b in zip(*results):
                torch.testing.assert_close(a.reshape(-1), b.reshape(-1), **tol)
        except Exception as e:  # noqa: BLE001 - any failure means: do not use these ops here
            return f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None
