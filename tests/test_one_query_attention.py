"""The latent passes' one-query attention kernel (kernels/one_query_attention.py) against its torch reference:
outputs and every gradient on awkward shapes (prefix lengths around the kernel's key block, no prefix, query
groups and head sizes that are not powers of two, strided inputs), fp32 and bf16, in the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from kernels.one_query_attention import BLOCK_KEYS, one_query_attention, one_query_attention_reference


def inputs(batch, kv, groups, dim, prefix, new, dtype, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return (torch.randn(*shape, generator=g) * 1.5).to(dtype).requires_grad_(True)

    if strided:  # the block's layout: the prefix's K and V are pieces of one (2, B, KV, P, D) stack
        kv_stack = leaf(2, batch, kv, prefix, dim)
        prefix_k, prefix_v = kv_stack.unbind(0)
        q = leaf(batch, 1, kv * groups, dim).view(batch, kv, groups, dim)
        leaves = [q, kv_stack]
    else:
        q, prefix_k, prefix_v = leaf(batch, kv, groups, dim), leaf(batch, kv, prefix, dim), leaf(batch, kv, prefix, dim)
        leaves = [q, prefix_k, prefix_v]
    new_k, new_v = leaf(batch, kv, new, dim), leaf(batch, kv, new, dim)
    blocked = torch.rand(batch, prefix + new, generator=g) < 0.3
    blocked[:, -1] = False  # the pass's own key is always real
    return (q, prefix_k, prefix_v, new_k, new_v, blocked), leaves + [new_k, new_v]


def compare(args, leaves, scale, tol=None):
    """The kernel's output and gradients against the reference's: within ``tol`` (fp32), or in bf16, where the
    reference rounds its scores to bf16 and the kernel does not, no further from the exact values (the reference
    in fp64 on the same inputs) than the reference is, up to bf16 rounding."""
    cotangent = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(9)).to(args[0])
    results = []
    for fn in (one_query_attention, one_query_attention_reference):
        out = fn(*args, scale)
        results.append([out, *torch.autograd.grad(out, leaves, cotangent)])
    got, want = results
    assert torch.isfinite(got[0]).all()
    if tol is not None:
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"output/gradient {i}: {m}")
        return
    exact_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    exact_args = _rebuild(args, leaves, exact_leaves)
    out = one_query_attention_reference(*exact_args, scale)
    exact = [out, *torch.autograd.grad(out, exact_leaves, cotangent.double())]
    for i, (a, b, e) in enumerate(zip(got, want, exact, strict=True)):
        error, reference_error = ((t.double() - e).norm() / e.norm() for t in (a, b))
        assert error <= 2 * reference_error + 4e-3, (i, float(error), float(reference_error))


def _rebuild(args, leaves, new_leaves):
    """``args`` with each leaf (or a view of one, as the strided prefix's K and V are) computed from new_leaves."""
    if len(leaves) == 5:  # q, prefix_k, prefix_v, new_k, new_v themselves
        return (*new_leaves, args[5])
    q, stack, new_k, new_v = new_leaves  # q as (B, 1, H, D), the prefix as a (2, B, KV, P, D) stack
    return (q.view(args[0].shape), *stack.unbind(0), new_k, new_v, args[5])


@pytest.mark.parametrize("prefix", [0, 1, BLOCK_KEYS - 1, BLOCK_KEYS, BLOCK_KEYS + 1, 2 * BLOCK_KEYS + 5])
@pytest.mark.parametrize("shape", [(3, 2, 7, 64, 3), (2, 1, 1, 24, 1), (1, 3, 5, 16, 2)])
def test_kernel_matches_reference_fp32(prefix, shape):
    batch, kv, groups, dim, new = shape
    args, leaves = inputs(batch, kv, groups, dim, prefix, new, torch.float32, seed=prefix)
    compare(args, leaves, dim**-0.5, dict(atol=2e-5, rtol=2e-5))


def test_kernel_takes_a_strided_query():
    """q as a view whose rows are not laid out (B, KV, G, D): its gradient still lands where each element is."""
    args, leaves = inputs(3, 2, 5, 16, 70, 2, torch.float32, seed=8)
    base = torch.randn(3, 5, 2, 16, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    q = base.transpose(1, 2)  # (B, KV, G, D), strided
    compare((q, *args[1:]), [base, *leaves[1:]], 0.25, dict(atol=2e-5, rtol=2e-5))


@pytest.mark.parametrize("strided", [False, True])
def test_kernel_matches_reference_bf16(strided):
    args, leaves = inputs(4, 2, 7, 64, 70, 4, torch.bfloat16, seed=3, strided=strided)
    compare(args, leaves, 64**-0.5)


def test_blocked_keys_do_not_reach_the_output():
    """Changing the blocked keys' and values' contents moves neither the output nor the other gradients, and
    their own gradients are zero."""
    args, leaves = inputs(2, 2, 3, 16, 9, 2, torch.float32, seed=5)
    q, prefix_k, prefix_v, new_k, new_v, blocked = args
    out = one_query_attention(*args, 0.25)
    prefix_blocked = blocked[:, :9]
    changed_k = prefix_k.detach().clone()
    changed_v = prefix_v.detach().clone()
    changed_k[prefix_blocked[:, None, :, None].expand_as(changed_k)] = 100.0
    changed_v[prefix_blocked[:, None, :, None].expand_as(changed_v)] = -100.0
    again = one_query_attention(q, changed_k, changed_v, new_k, new_v, blocked, 0.25)
    torch.testing.assert_close(again, out, atol=1e-6, rtol=0)
    d_prefix_k, d_prefix_v = torch.autograd.grad(out.sum(), [prefix_k, prefix_v])
    mask = prefix_blocked[:, None, :, None].expand_as(d_prefix_k)
    assert d_prefix_k[mask].abs().max() == 0 and d_prefix_v[mask].abs().max() == 0
    assert d_prefix_v[~mask].abs().max() > 0


def test_a_row_with_every_key_blocked_gets_zeros():
    args, leaves = inputs(2, 1, 2, 16, 5, 1, torch.float32, seed=6)
    args[5][1] = True
    out = one_query_attention(*args, 0.25)
    assert out[1].abs().max() == 0 and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out[0], one_query_attention_reference(*args, 0.25)[0], atol=2e-5, rtol=2e-5)


def test_bad_inputs_are_named():
    args, _ = inputs(2, 2, 3, 16, 5, 2, torch.float32)
    q, prefix_k, prefix_v, new_k, new_v, blocked = args
    with pytest.raises(ValueError, match="new_k must be"):
        one_query_attention(q, prefix_k, prefix_v, new_k[:, :1], new_v, blocked, 1.0)
    with pytest.raises(ValueError, match="blocked must be"):
        one_query_attention(q, prefix_k, prefix_v, new_k, new_v, blocked[:, 1:], 1.0)
    with pytest.raises(ValueError, match="prefix_v is torch.float64"):
        one_query_attention(q, prefix_k, prefix_v.double(), new_k, new_v, blocked, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_cuda(dtype):
    """The InternVL3-1B block's shapes on the GPU: 64 rows, 2 KV heads of 7 query heads of 64, a 384-key prefix
    bucket, 5 passes' keys."""
    args, leaves = inputs(64, 2, 7, 64, 384, 5, dtype, seed=1, strided=True)
    args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) for a in args)
    q, prefix_k, prefix_v, new_k, new_v, blocked = args
    leaves = [q, prefix_k, prefix_v, new_k, new_v]
    compare(args, leaves, 64**-0.5, dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else None)


def test_the_reference_imports_without_triton():
    """Triton's wheels are Linux-only: without it the module still gives the reference (the engine's reference
    layer ops call it), and the kernel says what is missing."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from kernels.one_query_attention import one_query_attention, one_query_attention_reference\n"
        "q, k, nk = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 1, 8)\n"
        "blocked = torch.zeros(1, 4, dtype=torch.bool)\n"
        "print(tuple(one_query_attention_reference(q, k, k, nk, nk, blocked, 0.3).shape))\n"
        "try:\n"
        "    one_query_attention(q, k, k, nk, nk, blocked, 0.3)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["(1, 1, 2, 8)", "one_query_attention needs Triton, which is not installed here (its reference needs none)"]
