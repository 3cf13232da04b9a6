"""Matrix products of a one-position step: a few rows (decode rows, latent rows) times a large weight.

At decode sizes (M <= 64 rows) ``x @ weight.T`` reads the weight once and does little else: its time should be
the weight's bytes over the memory bandwidth. A GEMM library tiles the output, and an output of a few rows and
~900 columns (the InternVL3-1B attention's output projection, the MLP's down projection) is only 7-14 tiles of
128 columns: 7-14 of the H200's 132 SMs stream the whole weight while the rest idle. These kernels split the
reduction (K) over programs too, so that about one program per SM streams its share of the weight, and leave the
partial sums in fp32 for the kernel that consumes the product: the RMSNorm that adds it to the residual stream
(`kernels.decode_fusions.rms_norm` takes them as its ``x``) sums them there in a fixed order, so the split costs
no extra launch and stays deterministic.

Public entry points (one name across kernels, tests and benchmarks), with their PyTorch reference:

- `decode_linear_partials(x, weight, config, bias=None)`: (splits, M, N) fp32 partial products of x (M, K) and
  weight (N, K); their sum over the first dimension is ``x @ weight.T`` (+ ``bias``, which the first split adds);
- `decode_linear(x, weight, bias=None, config=None)`: ``F.linear(x, weight, bias)`` in ``x``'s dtype (the partial
  sums summed by torch when ``config.splits > 1``);
- `decode_linear_reference(x, weight, bias=None)`: the same with ``F.linear``;
- `decode_linear_config(rows, out_features, in_features, sm_count, element_size, shared_bytes)`: the launch
  settings the runner uses.

Products are accumulated in fp32 from the operands' dtype (fp32 operands in full fp32, not TF32), rounded once to
the output dtype: the same as cuBLAS up to the summation order. No autograd: inference only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.paged_kv import HOPPER_SHARED_BYTES, programmatic_launch_supported, stages_that_fit

__all__ = [
    "DecodeLinearConfig",
    "decode_linear_self_check",
    "decode_linear",
    "decode_linear_config",
    "decode_linear_partials",
    "decode_linear_reference",
]

MAX_BLOCK_M = 64  # rows per program; more rows take more programs along M


def _block_m(rows: int) -> int:
    """Rows per program: the rows rounded up to a power of two, at least 16 (`tl.dot`), at most `MAX_BLOCK_M`."""
    return min(max(triton.next_power_of_2(max(rows, 1)), 16), MAX_BLOCK_M)


@dataclass(frozen=True)
class DecodeLinearConfig:
    """Launch settings: output columns per program, reduction step, reduction splits, warps, pipeline depth."""

    block_n: int = 64
    block_k: int = 128
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"DecodeLinearConfig.{name} must be a power of two >= 16, got {value}")
        if self.splits < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"DecodeLinearConfig needs splits, num_warps and num_stages >= 1, got {self}")


def decode_linear_config(
    rows: int,
    out_features: int,
    in_features: int,
    sm_count: int,
    element_size: int = 2,
    shared_bytes: int = HOPPER_SHARED_BYTES,
) -> DecodeLinearConfig:
    """The settings for an (rows, in_features) x (out_features, in_features)^T product of ``element_size``-byte
    operands on a device of ``sm_count`` SMs and ``shared_bytes`` of shared memory per program: tiles of 64 columns
    and 128-wide reduction steps, pipelined as deep as the shared memory holds (at most 5: 16-bit operands; 3 for
    fp32), and as many reduction splits as leave about one program per SM (at most one split per step). From the
    sweeps at the InternVL3-1B, -2B and -8B geometries on an H200 (`benchmarks.bench_decode_linear`,
    benchmarks/RESULTS.md): with the norm that sums the splits, 9% under cuBLAS + norm on average over the o and down
    products at batch 1-64, at worst 7% over it (fewer splits win some shapes, no simple rule wins more)."""
    if min(rows, out_features, in_features) < 0 or sm_count < 1:
        raise ValueError(f"decode_linear_config needs sizes >= 0 and sm_count >= 1, got rows={rows}, "
                         f"out_features={out_features}, in_features={in_features}, sm_count={sm_count}")
    block_n, block_k = 64, 128
    tiles = triton.cdiv(out_features, block_n) * triton.cdiv(rows, MAX_BLOCK_M)
    steps = max(triton.cdiv(in_features, block_k), 1)  # an empty reduction still has one (zero) step
    splits = max(1, min(sm_count // max(tiles, 1), steps))
    splits = triton.cdiv(steps, triton.cdiv(steps, splits))  # whole steps per split leave no split empty
    stage_bytes = (_block_m(rows) + block_n) * block_k * element_size  # an x tile and a weight tile per stage
    return DecodeLinearConfig(block_n=block_n, block_k=block_k, splits=splits,
                              num_stages=stages_that_fit(stage_bytes, shared_bytes))  # fmt: skip


# ----------------------------------------------------------------------------------------------------- kernel


@triton.jit
def _decode_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    rows,
    out_features,
    in_features,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_os,
    stride_om,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PROGRAMMATIC_LAUNCH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: BLOCK_N output columns of BLOCK_M rows over one split of the reduction, fp32 partials out; with
    HAS_BIAS the first split's programs start from the bias, so that the splits sum to the biased product.
    PROGRAMMATIC_LAUNCH (Hopper, launched with launch_pdl): launched while the previous kernel finishes, it waits
    for that kernel's writes (its x) before any load, and lets the next kernel (the norm, or the attention that
    sums q/k/v partial sums) launch before it stores."""
    if PROGRAMMATIC_LAUNCH:
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    row_ok = rm[:, None] < rows
    col_ok = rn[:, None] < out_features
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:  # the first split's programs only (a masked load elsewhere)
        bias = tl.load(bias_ptr + rn, mask=(rn < out_features) & ((rn * 0 + split) == 0), other=0.0)
        acc += bias.to(tl.float32)[None, :]
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rk[None, :]
        k_ok = k < k_end
        x = tl.load(x_rows + k, mask=row_ok & k_ok, other=0.0)
        w = tl.load(w_rows + k, mask=col_ok & k_ok, other=0.0)
        if DOT_FP32:  # the interpreter's bf16 products are wrong (triton 3.6): products in fp32 there
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if PROGRAMMATIC_LAUNCH:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may launch; it waits for our stores
    out = out_ptr + split.to(tl.int64) * stride_os + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, acc, mask=row_ok & (rn[None, :] < out_features))


# ----------------------------------------------------------------------------------------------------- wrappers


def _interpreted() -> bool:
    """Whether the kernel was built for the Triton interpreter (TRITON_INTERPRET=1 when it was decorated)."""
    return type(_decode_linear_kernel).__name__ == "InterpretedFunction"


def _check(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"decode_linear: x must be (M, K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"decode_linear: x and weight must share a float16/bfloat16/float32 dtype, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"decode_linear: x is on {x.device}, weight on {weight.device}")
    # the kernel reads rows with unit column stride (a split view of a merged product keeps it)
    return (x if x.stride(1) == 1 else x.contiguous()), (weight if weight.stride(1) == 1 else weight.contiguous())


def decode_linear_partials(
    x: torch.Tensor,
    weight: torch.Tensor,
    config: DecodeLinearConfig,
    programmatic_launch: bool | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(splits, M, N) fp32 partial products of x (M, K) and weight (N, K): their sum over dim 0 is x @ weight.T,
    plus ``bias`` (N,) when given (the first split starts from it). Splits past the reduction's length are zeros
    (or the bias). ``programmatic_launch``: launch while the previous kernel finishes (None: where
    `kernels.paged_kv.programmatic_launch_supported`)."""
    x, weight = _check(x, weight)
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != weight.device):
        raise ValueError(f"decode_linear: bias must be ({weight.shape[0]},) on {weight.device}, got "
                         f"{tuple(bias.shape)} on {bias.device}")  # fmt: skip
    rows, in_features = x.shape
    out_features = weight.shape[0]
    steps = max(triton.cdiv(in_features, config.block_k), 1)
    splits = config.splits
    k_per_split = triton.cdiv(steps, splits) * config.block_k  # each split a whole number of reduction steps
    # every program stores its tile, a split past the reduction's end (or K == 0) its zeros: no zeroing needed
    out = torch.empty(splits, rows, out_features, device=x.device, dtype=torch.float32)
    if programmatic_launch is None:
        programmatic_launch = programmatic_launch_supported(x.device)
    if rows and out_features:
        block_m = _block_m(rows)
        grid = (triton.cdiv(out_features, config.block_n), splits, triton.cdiv(rows, block_m))
        _decode_linear_kernel[grid](
            x, weight, weight if bias is None else bias.contiguous(), out, rows, out_features, in_features,
            k_per_split, x.stride(0), weight.stride(0), out.stride(0), out.stride(1), HAS_BIAS=bias is not None,
            IEEE=x.dtype == torch.float32,
            DOT_FP32=_interpreted(), PROGRAMMATIC_LAUNCH=bool(programmatic_launch), BLOCK_M=block_m,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages,
            **({"launch_pdl": True} if programmatic_launch else {}),
        )  # fmt: skip
    return out


def decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: DecodeLinearConfig | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x (M, K) through `decode_linear_partials`, in x's dtype."""
    config = config or DecodeLinearConfig()
    partials = decode_linear_partials(x, weight, config, bias=bias)
    return (partials[0] if config.splits == 1 else partials.sum(0)).to(x.dtype)


def decode_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the module computes."""
    return F.linear(x, weight, bias)


def decode_linear_self_check(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Run the kernel once on small inputs on ``device`` (several splits, a split past the end, bias), and its
    consumer `rms_norm(..., partial_sums=True)`, against their references: None when all agree, else why not (a
    compile error on this Triton, a wrong result). Callers that switch the split products on by default check first."""
    from kernels.decode_fusions import rms_norm, rms_norm_reference

    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)  # noqa: E731
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    config = DecodeLinearConfig(block_n=16, block_k=16, splits=4, num_stages=2)
    x, w, b, residual, norm_weight = r(5, 40), r(24, 40), r(24), r(5, 24), r(24)
    try:
        torch.testing.assert_close(decode_linear(x, w, b, config).float(), decode_linear_reference(x, w, b).float(), **tol)
        partials = decode_linear_partials(x, w, config)
        got = rms_norm(partials, norm_weight, 1e-6, residual=residual, partial_sums=True)
        want = rms_norm_reference(partials, norm_weight, 1e-6, residual=residual, partial_sums=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.float(), b.float(), **tol)
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the split products here
        return f"decode_linear: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None
