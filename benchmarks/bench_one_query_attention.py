"""pytest-benchmark suite: the latent passes' one-query attention (`one_query_attention`,
kernels/one_query_attention.py) against its torch reference, forward and backward (every input's gradient).

Each case first checks the two against each other, then times one of them; ``extra_info`` holds the bytes the
kernels must at least read and write (the prefix's K/V and their gradients dominate), to set against the copy
rate. CPU cases are tiny; the GPU case is one layer of one latent pass at the InternVL3-1B geometry: 64 rows, 2 KV
heads of 7 query heads of 64, a 384-position prefix bucket and 5 passes' keys, bf16.

    pytest benchmarks/bench_one_query_attention.py -m benchmark                          # timed
    pytest benchmarks/bench_one_query_attention.py -m benchmark --benchmark-disable -q   # once each (CI)
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import check_then_benchmark
from kernels.one_query_attention import one_query_attention, one_query_attention_reference

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CPU = dict(batch=2, kv=2, groups=3, dim=16, prefix=70, new=3, dtype=torch.float32, device="cpu", tol=2e-5)
GPU = dict(batch=64, kv=2, groups=7, dim=64, prefix=384, new=5, dtype=torch.bfloat16, device="cuda", tol=6e-2)
IMPLS = {"one_query_attention": one_query_attention, "reference": one_query_attention_reference}


def _bench(benchmark, impl: str, shape: dict):
    g = torch.Generator().manual_seed(0)
    batch, kv, dim = shape["batch"], shape["kv"], shape["dim"]

    def leaf(*size):
        return torch.randn(*size, generator=g).to(shape["device"], shape["dtype"]).requires_grad_(True)

    stack = leaf(2, batch, kv, shape["prefix"], dim)  # the block's layout: K and V pieces of one stack
    q = leaf(batch, kv, shape["groups"], dim)
    new_k, new_v = leaf(batch, kv, shape["new"], dim), leaf(batch, kv, shape["new"], dim)
    blocked = torch.rand(batch, shape["prefix"] + shape["new"], generator=g) < 0.2
    blocked[:, -1] = False
    args = (q, *stack.unbind(0), new_k, new_v, blocked.to(shape["device"]), dim**-0.5)
    leaves = [q, stack, new_k, new_v]
    grad = torch.randn(q.shape, generator=g).to(q)

    def step(name):
        out = IMPLS[name](*args)
        return (out, *torch.autograd.grad(out, leaves, grad))

    element = stack.element_size()
    keys = shape["prefix"] + shape["new"]
    # forward reads K/V; backward reads them again and writes their gradients (q, o and dO are small)
    benchmark.extra_info.update(impl=impl, dtype=str(shape["dtype"]), bytes=4 * 2 * batch * kv * keys * dim * element)
    check_then_benchmark(benchmark, step, "one_query_attention", "reference", impl, shape["tol"], shape["device"])


@pytest.mark.benchmark
@pytest.mark.parametrize("impl", list(IMPLS))
def test_one_query_attention_cpu_tiny(benchmark, impl):
    _bench(benchmark, impl, CPU)


@pytest.mark.benchmark
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", list(IMPLS))
def test_one_query_attention_gpu(benchmark, impl):
    _bench(benchmark, impl, GPU)


if __name__ == "__main__":  # a pytest-benchmark suite: say how it runs instead of exiting silently
    from benchmarks.common import pytest_suite_main

    pytest_suite_main(__file__)
