"""The differentiable layer fusions (kernels/layer_grads.py) against autograd through their PyTorch references,
forward and backward, on awkward shapes (interpreted on CPU)."""

from __future__ import annotations

import pytest
import torch

from kernels.decode_fusions import rms_norm_reference, rotary_qk_reference, silu_mul_reference
from kernels.layer_grads import (
    layer_grads_self_check,
    layer_norm_grad,
    layer_norm_reference,
    rms_norm_grad,
    rotary_qk_grad,
    silu_mul_grad,
)

# fp32: the same math up to summation order. bf16: the interpreter truncates fp32 -> bf16 casts where the GPU
# rounds, so a value may differ by a bf16 ulp or two of its magnitude (gradients pass through several roundings).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=4e-2, rtol=3e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _leaf(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_(True)


def _outputs_and_grads(fn, args, kwargs, inputs, seed=7):
    """Outputs of fn and the gradients of a random projection of them with respect to `inputs`."""
    outs = fn(*args, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, inputs)


def _compare(fused, reference, args, kwargs, inputs, dtype):
    got, got_grads = _outputs_and_grads(fused, args, kwargs, inputs)
    want, want_grads = _outputs_and_grads(reference, args, kwargs, inputs)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOL[dtype])
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert a.dtype == b.dtype, f"gradient {i}"
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"gradient {i}: {m}")


NORM_CASES = [(dtype, shape) for dtype in (torch.float32, torch.bfloat16) for shape in ((1, 1), (3, 33), (2, 5, 64), (2, 3, 97))]
# many rows: fp32 only, as the interpreter's truncating bf16 casts bias a long weight-gradient sum by far more than
# the GPU's rounding does. 300 rows: one row per backward program; 5,001: each program loops over several blocks of
# rows, the last program's last block partly past the end
NORM_CASES.append((torch.float32, (300, 24)))
NORM_CASES.append((torch.float32, (5001, 24)))


@pytest.mark.parametrize("dtype,shape", NORM_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_grad_matches_reference(dtype, shape, with_residual):
    x, weight = _leaf(*shape, dtype=dtype, seed=0), _leaf(shape[-1], dtype=dtype, seed=1)
    kwargs = {"residual": _leaf(*shape, dtype=dtype, seed=2)} if with_residual else {}
    _compare(rms_norm_grad, rms_norm_reference, (x, weight, 1e-6), kwargs, [x, weight, *kwargs.values()], dtype)


def test_rms_norm_grad_when_only_one_output_is_used():
    """The final norm discards the sum; a residual stream may use the sum and not the norm."""
    x, r, w = (_leaf(4, 10, dtype=torch.float32, seed=s) for s in (0, 1, 2))
    w = w[0].detach().requires_grad_(True)
    for pick in (0, 1):
        got = torch.autograd.grad(rms_norm_grad(x, w, 1e-6, residual=r)[pick].sum(), [x, r], allow_unused=True)
        want = torch.autograd.grad(rms_norm_reference(x, w, 1e-6, residual=r)[pick].sum(), [x, r], allow_unused=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rms_norm_grad_takes_strided_gradients():
    x, w = _leaf(6, 16, dtype=torch.float32, seed=0), _leaf(16, dtype=torch.float32, seed=1)
    g = torch.randn(16, 6).t()  # a transposed (non-contiguous) incoming gradient
    got = torch.autograd.grad(rms_norm_grad(x, w, 1e-5), [x, w], g)
    want = torch.autograd.grad(rms_norm_reference(x, w, 1e-5), [x, w], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@DTYPES
@pytest.mark.parametrize("tokens,q_heads,k_heads,head_dim", [((1,), 1, 1, 2), ((2, 3), 14, 2, 64), ((5,), 3, 3, 6), ((2, 1), 7, 1, 34)])
def test_rotary_qk_grad_matches_reference(dtype, tokens, q_heads, k_heads, head_dim):
    q, k = _leaf(*tokens, q_heads, head_dim, dtype=dtype, seed=0), _leaf(*tokens, k_heads, head_dim, dtype=dtype, seed=1)
    angle = torch.randn(*tokens, head_dim // 2, generator=torch.Generator().manual_seed(2))
    # halves that differ, unlike a rotary table's: a swapped sin index in the backward would show
    cos, sin = torch.cat([angle, 2 * angle], -1).cos().to(dtype), torch.cat([angle, 3 * angle], -1).sin().to(dtype)

    def reference(q, k, cos, sin):
        n = cos.reshape(-1, head_dim).shape[0]
        q_rot, k_rot = rotary_qk_reference(q.reshape(n, q_heads, head_dim), k.reshape(n, k_heads, head_dim),
                                           cos.reshape(n, head_dim), sin.reshape(n, head_dim))  # fmt: skip
        return q_rot.view(q.shape), k_rot.view(k.shape)

    _compare(rotary_qk_grad, reference, (q, k, cos, sin), {}, [q, k], dtype)


def test_rotary_qk_grad_with_one_output_used_and_strided_inputs():
    base = _leaf(4, 6, 8, dtype=torch.float32, seed=0)
    q, k = base[:, :4], base[:, 4:]  # views of one projection, as the block's q/k are
    angle = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    got = torch.autograd.grad(rotary_qk_grad(q, k, cos, sin)[1].sum(), base)[0]
    want = torch.autograd.grad(rotary_qk_reference(q, k, cos, sin)[1].sum(), base)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert got[:, :4].abs().max() == 0  # q's rows got no gradient from k's output


@DTYPES
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 4, 1100)])
def test_silu_mul_grad_matches_reference(dtype, shape):
    """(2, 4, 1100): rows wider than one program's block."""
    gate, up = _leaf(*shape, dtype=dtype, seed=0), _leaf(*shape, dtype=dtype, seed=1)
    _compare(silu_mul_grad, silu_mul_reference, (gate, up), {}, [gate, up], dtype)


def test_bad_inputs_name_the_problem():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight dtype"):
        rms_norm_grad(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_grad(x, torch.ones(8), 1e-6, residual=torch.randn(3, 7))
    q, k, cos = torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="no gradient for cos and sin"):
        rotary_qk_grad(q, k, cos.requires_grad_(True), cos)
    with pytest.raises(ValueError, match="token dimensions"):
        rotary_qk_grad(q, torch.randn(4, 1, 8), cos.detach(), cos.detach())
    with pytest.raises(ValueError, match="must match"):
        silu_mul_grad(torch.randn(2, 3), torch.randn(2, 4))


@DTYPES
def test_self_check_passes_here(dtype):
    assert layer_grads_self_check("cpu", dtype) is None


def test_rms_norm_grad_gives_x_and_residual_their_own_gradients():
    """Two leaves must not share one gradient tensor: zeroing one would zero the other, and a second backward
    would accumulate into both through the shared storage."""
    x, r = _leaf(3, 8, dtype=torch.float32, seed=0), _leaf(3, 8, dtype=torch.float32, seed=1)
    w = torch.ones(8, requires_grad=True)
    for _ in range(2):
        out, summed = rms_norm_grad(x, w, 1e-6, residual=r)
        (out.sum() + summed.pow(2).sum()).backward()
    assert x.grad.data_ptr() != r.grad.data_ptr()
    xr, rr = x.detach().clone().requires_grad_(True), r.detach().clone().requires_grad_(True)
    for _ in range(2):
        out, summed = rms_norm_reference(xr, w.detach(), 1e-6, residual=rr)
        (out.sum() + summed.pow(2).sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.grad, rr.grad, atol=1e-5, rtol=1e-5)
    x.grad.zero_()
    assert r.grad.abs().max() > 0


def test_self_check_runs_inside_no_grad_and_inference_mode():
    """The fast-path decision can come from an evaluation forward: the check must still differentiate."""
    with torch.no_grad():
        assert layer_grads_self_check("cpu", torch.float32) is None
    with torch.inference_mode():
        assert layer_grads_self_check("cpu", torch.float32) is None


def test_grad_fused_ops_fall_back_where_dtypes_differ(tiny_model):
    """A sublayer output or a norm weight in another dtype than the residual stream: the modules' promotion."""
    from engine.model.fused_ops import GradFusedOps
    from engine.model.layers import ReferenceOps

    lm = tiny_model.language_model
    norm = lm.layers[0].input_layernorm
    x = torch.randn(2, 3, norm.weight.shape[0], dtype=torch.float64)
    pending = torch.randn(2, 3, norm.weight.shape[0])
    got, want = GradFusedOps(lm).add_norm(norm, x, pending), ReferenceOps(lm).add_norm(norm, x, pending)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------- layer_norm_grad

# bf16 only on a few rows: torch's CPU bf16 layer-norm backward sums its weight and bias gradients far less
# precisely than fp32 (off by ~1.4 from the exact sum over 300 rows, where the kernel's fp32 sums are off by ~0.1:
# see test_layer_norm_grad_sums_parameter_gradients_in_fp32), and the interpreter's truncating casts bias long sums
LN_CASES = [(dtype, shape) for dtype in (torch.float32, torch.bfloat16) for shape in ((1, 48), (7, 200), (2, 3, 48))]
LN_CASES.append((torch.float32, (2, 150, 48)))  # 300 rows: several rows per backward program, the last one short
LN_VARIANTS = {  # name: (residual, scale, bias)
    "plain": (False, False, True),
    "plain-nobias": (False, False, False),
    "residual": (True, False, True),
    "scaled": (True, True, True),
    "scaled-nobias": (True, True, False),
}


def _layer_norm_inputs(shape, dtype, variant):
    with_residual, with_scale, with_bias = LN_VARIANTS[variant]
    hidden = shape[-1]
    x, weight = _leaf(*shape, dtype=dtype, seed=0), _leaf(hidden, dtype=dtype, seed=1)
    bias = _leaf(hidden, dtype=dtype, seed=2) if with_bias else None
    kwargs = {}
    if with_residual:
        kwargs["residual"] = _leaf(*shape, dtype=dtype, seed=3)
    if with_scale:
        kwargs["scale"] = _leaf(hidden, dtype=dtype, seed=4)
    return (x, weight, bias, 1e-6), kwargs


@pytest.mark.parametrize("dtype,shape", LN_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("variant", list(LN_VARIANTS))
def test_layer_norm_grad_matches_reference(dtype, shape, variant):
    args, kwargs = _layer_norm_inputs(shape, dtype, variant)
    inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    _compare(layer_norm_grad, layer_norm_reference, args, kwargs, inputs, dtype)


def test_layer_norm_grad_sums_parameter_gradients_in_fp32():
    """bf16 over 300 rows: the weight and bias gradients within a bf16 rounding of the exact sums. (The scale's
    gradient sums products rounded per element, as autograd's does: the fp32 cases cover it.)"""
    (x, weight, bias, eps), kwargs = _layer_norm_inputs((300, 48), torch.bfloat16, "scaled")
    g = torch.randn(300, 48, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    out, summed = layer_norm_grad(x, weight, bias, eps, **kwargs)
    d_weight, d_bias = torch.autograd.grad(out, [weight, bias], g)
    s = summed.detach().double()
    normed = (s - s.mean(-1, keepdim=True)) / (s.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    exact = {"weight": (g.double() * normed).sum(0), "bias": g.double().sum(0)}
    for name, got in (("weight", d_weight), ("bias", d_bias)):
        assert got.dtype == torch.bfloat16
        # one bf16 rounding of the result (truncation in the interpreter: up to one ulp)
        torch.testing.assert_close(got.double(), exact[name], atol=1e-2, rtol=2**-7, msg=lambda m: f"{name}: {m}")


def test_layer_norm_grad_when_only_one_output_is_used(monkeypatch):
    """Only the norm (a final norm), or only the sum (a residual stream): the other output's gradient is None, and
    the sum alone passes its gradient through without the norm's backward."""
    from kernels import layer_grads

    backward_kernel = layer_grads._layer_norm_backward_kernel
    for variant in ("residual", "scaled"):
        args, kwargs = _layer_norm_inputs((4, 10), torch.float32, variant)
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        for pick in (0, 1):
            # the sum alone must not launch the norm's backward
            monkeypatch.setattr(layer_grads, "_layer_norm_backward_kernel", None if pick else backward_kernel)
            got = torch.autograd.grad(layer_norm_grad(*args, **kwargs)[pick].sum(), inputs, allow_unused=True)
            want = torch.autograd.grad(layer_norm_reference(*args, **kwargs)[pick].sum(), inputs, allow_unused=True)
            for i, (a, b) in enumerate(zip(got, want)):
                assert (a is None) == (b is None or not b.any()), f"{variant}, output {pick}, input {i}"
                if a is not None:
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layer_norm_grad_takes_strided_inputs_and_gradients():
    base = _leaf(6, 40, dtype=torch.float32, seed=0)
    x, residual = base[:, :16], base[:, 20:36]  # views with a row stride of 40
    weight, bias, scale = (_leaf(16, dtype=torch.float32, seed=s) for s in (1, 2, 3))
    g_out, g_sum = torch.randn(16, 6).t(), torch.randn(6, 32)[:, ::2]  # transposed and strided incoming gradients
    inputs = [base, weight, bias, scale]
    outs = layer_norm_grad(x, weight, bias, 1e-5, residual=residual, scale=scale)
    got = torch.autograd.grad(outs, inputs, [g_out, g_sum])
    want = torch.autograd.grad(layer_norm_reference(x, weight, bias, 1e-5, residual=residual, scale=scale), inputs,
                               [g_out, g_sum])  # fmt: skip
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layer_norm_grad_gives_x_and_residual_their_own_gradients():
    x, r = _leaf(3, 8, dtype=torch.float32, seed=0), _leaf(3, 8, dtype=torch.float32, seed=1)
    w = torch.ones(8, requires_grad=True)
    out, summed = layer_norm_grad(x, w, None, 1e-6, residual=r)
    (out.sum() + summed.pow(2).sum()).backward()
    assert x.grad.data_ptr() != r.grad.data_ptr()
    torch.testing.assert_close(x.grad, r.grad)


def test_layer_norm_grad_computes_only_the_gradients_asked_for():
    args, kwargs = _layer_norm_inputs((5, 24), torch.float32, "scaled")
    x, weight, bias, eps = args
    for only in (x, kwargs["residual"], kwargs["scale"], weight, bias):
        got = torch.autograd.grad(sum(o.sum() for o in layer_norm_grad(*args, **kwargs)), only)[0]
        want = torch.autograd.grad(sum(o.sum() for o in layer_norm_reference(*args, **kwargs)), only)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    frozen = [a.detach() for a in args[:3]]  # only the residual and scale need gradients
    outs = layer_norm_grad(*frozen, eps, residual=kwargs["residual"], scale=kwargs["scale"])
    assert all(o.requires_grad for o in outs)


def test_layer_norm_grad_bad_inputs_name_the_problem():
    x, w = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="weight dtype"):
        layer_norm_grad(x, w.bfloat16(), None, 1e-6)
    with pytest.raises(ValueError, match="bias dtype"):
        layer_norm_grad(x, w, w.double(), 1e-6)
    with pytest.raises(ValueError, match="scale dtype"):
        layer_norm_grad(x, w, None, 1e-6, residual=x, scale=w.bfloat16())
    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        layer_norm_grad(x, w, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match=r"scale must be \(8,\)"):
        layer_norm_grad(x, w, None, 1e-6, residual=x, scale=torch.ones(3, 8))
    with pytest.raises(ValueError, match="residual"):
        layer_norm_grad(x, w, None, 1e-6, residual=torch.randn(3, 7))
    with pytest.raises(ValueError, match="residual dtype"):
        layer_norm_grad(x, w, None, 1e-6, residual=x.double())
    with pytest.raises(ValueError, match="needs a residual"):
        layer_norm_grad(x, w, None, 1e-6, scale=w)


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor, tiny: float = 1e-6) -> torch.Tensor:
    """How many bf16 steps apart two bf16 tensors are, element by element (as ordered integers); values within
    ``tiny`` of each other count as equal (two near-zero results of opposite signs are many steps apart)."""
    def ordered(t):
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    steps = (ordered(a) - ordered(b)).abs()
    return torch.where((a.float() - b.float()).abs() <= tiny, 0, steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("q_heads,k_heads,head_dim", [(14, 2, 64), (12, 2, 128)])  # InternVL3-1B, -2B
def test_gpu_rotary_qk_grad_rounds_as_autograd(q_heads, k_heads, head_dim):
    """On the GPU in bf16 the rotary backward is elementwise products and one add, each rounded where autograd
    rounds: bit for bit autograd's gradients. A rounding the compiler folded away (triton 3.6 did so to a
    ``.to(bf16).to(fp32)`` round trip in the decode kernels) shows up here as thousands of differing values."""
    g = torch.Generator(device="cuda").manual_seed(5)
    tokens = 257
    base = torch.randn(tokens, q_heads + k_heads, head_dim, device="cuda", generator=g).bfloat16()
    angle = torch.rand(tokens, head_dim // 2, device="cuda", generator=g) * 6
    cos, sin = torch.cat([angle, angle], -1).cos().bfloat16(), torch.cat([angle, angle], -1).sin().bfloat16()
    gq = torch.randn(tokens, q_heads, head_dim, device="cuda", generator=g).bfloat16()
    gk = torch.randn(tokens, k_heads, head_dim, device="cuda", generator=g).bfloat16()
    grads = []
    for fn in (rotary_qk_grad, rotary_qk_reference):
        q = base[:, :q_heads].clone().requires_grad_(True)
        k = base[:, q_heads:].clone().requires_grad_(True)
        out_q, out_k = fn(q, k, cos, sin)
        grads.append(torch.autograd.grad((out_q, out_k), (q, k), (gq, gk)))
    for name, got, want in zip(("q", "k"), *grads):
        differing = int((got != want).sum())
        assert differing == 0, f"d{name}: {differing} of {got.numel()} values differ from autograd's"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_silu_mul_grad_rounds_as_autograd():
    """On the GPU in bf16: the gradient of ``up`` is one rounded product of the rounded activation, bit for bit
    autograd's; the gate's goes through the sigmoid, whose fp32 exp and division may differ from torch's by an fp32
    ulp: at most one bf16 step, and rarely (a folded rounding of ``g * up`` moves a large share of values)."""
    g = torch.Generator(device="cuda").manual_seed(6)
    shape = (64, 4864)  # the latent block's SwiGLU at the InternVL3-1B geometry
    gate_base, up_base, grad = (torch.randn(*shape, device="cuda", generator=g).bfloat16() for _ in range(3))
    grads = []
    for fn in (silu_mul_grad, silu_mul_reference):
        gate, up = gate_base.clone().requires_grad_(True), up_base.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(fn(gate, up), (gate, up), grad))
    (d_gate, d_up), (want_gate, want_up) = grads
    differing = int((d_up != want_up).sum())
    assert differing == 0, f"d_up: {differing} of {d_up.numel()} values differ from autograd's"
    ulps = _bf16_ulps(d_gate, want_gate)
    assert int(ulps.max()) <= 1 and float((ulps > 0).float().mean()) < 1e-2, (
        f"d_gate: {int((ulps > 0).sum())} values differ, by up to {int(ulps.max())} bf16 steps"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_layer_norm_grad_rounds_the_layer_scale_as_autograd():
    """On the GPU in bf16, the vision layers' ``residual + scale * x``: the product rounded before the add, as the
    modules round it, so the sum (an output of its own) is autograd's bit for bit. Triton 3.6 folded the
    ``.to(bf16).to(fp32)`` round trip that rounded it before: 310,782 of these 4,198,400 sums differed (an H200).
    The norm and the gradients go through reductions in another order: within bf16 rounding."""
    g = torch.Generator(device="cuda").manual_seed(7)
    rows, hidden = 4100, 1024  # InternViT-300M's width
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=g).bfloat16()  # noqa: E731
    x0, res0, scale0 = r(rows, hidden), r(rows, hidden), (0.1 * r(hidden).float()).bfloat16()
    w0, b0, g_out, g_sum = (1 + 0.1 * r(hidden).float()).bfloat16(), r(hidden), r(rows, hidden), r(rows, hidden)
    results = []
    for fn in (layer_norm_grad, layer_norm_reference):
        leaves = [t.clone().requires_grad_(True) for t in (x0, res0, scale0, w0, b0)]
        x, res, scale, w, b = leaves
        out, summed = fn(x, w, b, 1e-6, residual=res, scale=scale)
        results.append((out.detach(), summed.detach(), *torch.autograd.grad((out, summed), leaves, (g_out, g_sum))))
    (out, summed, *grads), (want_out, want_sum, *want_grads) = results
    differing = int((summed != want_sum).sum())
    assert differing == 0, f"residual + scale * x: {differing} of {summed.numel()} values differ from autograd's"
    torch.testing.assert_close(out.float(), want_out.float(), atol=3e-2, rtol=2e-2)
    for name, got, want in zip(("x", "residual", "scale", "weight", "bias"), grads, want_grads):
        torch.testing.assert_close(got.float(), want.float(), atol=6e-2, rtol=2e-2, msg=lambda m: f"d{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hidden", [896, 1536])  # InternVL3-1B's and -2B's language models
def test_gpu_rms_norm_grad_rounds_as_autograd(hidden):
    """On the GPU in bf16, the latent block's RMSNorm with its residual add: the sum bit for bit autograd's; the
    output and the input gradients (row sums in another order before one rounding) rarely differ (a folded
    rounding of ``g * weight`` or of the normed value moves a large share of them), and by few bf16 steps: the
    input gradient adds the sum's gradient after its own rounding, so one step there can be two or three steps
    of a smaller total (on the H200 at 896: 2 of 57,344 values, by 2 steps)."""
    g = torch.Generator(device="cuda").manual_seed(8)
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=g).bfloat16()  # noqa: E731
    x0, res0, g_out, g_sum = r(64, hidden), r(64, hidden), r(64, hidden), r(64, hidden)
    w0 = (1 + 0.1 * r(hidden).float()).bfloat16()
    results = []
    for fn in (rms_norm_grad, rms_norm_reference):
        leaves = [t.clone().requires_grad_(True) for t in (x0, res0, w0)]
        x, res, w = leaves
        out, summed = fn(x, w, 1e-6, residual=res)
        results.append((out.detach(), summed.detach(), *torch.autograd.grad((out, summed), leaves, (g_out, g_sum))))
    (out, summed, dx, d_res, dw), (want_out, want_sum, want_dx, want_res, want_dw) = results
    assert torch.equal(summed, want_sum), "residual + x differs from autograd's"
    for name, got, want in (("out", out, want_out), ("dx", dx, want_dx), ("d_residual", d_res, want_res)):
        ulps = _bf16_ulps(got, want)
        assert int(ulps.max()) <= 4 and float((ulps > 0).float().mean()) < 1e-3, (
            f"{name}: {int((ulps > 0).sum())} of {got.numel()} values differ, by up to {int(ulps.max())} bf16 steps")
    torch.testing.assert_close(dw.float(), want_dw.float(), atol=1e-2, rtol=2e-2)
