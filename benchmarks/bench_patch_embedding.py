"""pytest-benchmark suite: the vision tower's patch embedding as one matrix product (`patch_projection`,
engine/model/patch_embedding.py) against the Conv2d it replaces, forward and backward (the weight's and bias's
gradients, as in training: the pixels need none).

Each case first checks the two against each other, then times one of them; ``extra_info`` holds the product's
FLOPs. CPU cases are tiny; the GPU case is a training step's 64 tiles of 448 x 448 at InternViT's 14 x 14 patches
and 1,024 features, bf16.

    pytest benchmarks/bench_patch_embedding.py -m benchmark                          # timed
    pytest benchmarks/bench_patch_embedding.py -m benchmark --benchmark-disable -q   # once each (CI)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.common import check_then_benchmark
from engine.model.patch_embedding import conv_reference, patch_projection

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CPU = dict(tiles=2, size=56, patch=14, features=32, dtype=torch.float32, device="cpu", tol=1e-4)
GPU = dict(tiles=64, size=448, patch=14, features=1024, dtype=torch.bfloat16, device="cuda", tol=3e-2)


def _bench(benchmark, impl: str, shape: dict):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, shape["features"], shape["patch"], stride=shape["patch"]).to(shape["device"], shape["dtype"])
    pixels = torch.randn(shape["tiles"], 3, shape["size"], shape["size"], device=shape["device"], dtype=shape["dtype"])
    grad = None
    forwards = {"patch_projection": lambda: patch_projection(pixels, conv.weight, conv.bias),  # on any device
                "conv2d": lambda: conv_reference(conv, pixels)}

    def step(name):
        nonlocal grad
        out = forwards[name]()
        if grad is None:
            grad = torch.randn_like(out)
        return (out, *torch.autograd.grad(out, [conv.weight, conv.bias], grad))

    patches = shape["tiles"] * (shape["size"] // shape["patch"]) ** 2
    benchmark.extra_info.update(impl=impl, tiles=shape["tiles"], dtype=str(shape["dtype"]),
                                flops=2 * 2 * patches * 3 * shape["patch"] ** 2 * shape["features"])  # fwd + weight grad
    check_then_benchmark(benchmark, step, "patch_projection", "conv2d", impl, shape["tol"], shape["device"])


@pytest.mark.benchmark
@pytest.mark.parametrize("impl", ["patch_projection", "conv2d"])
def test_patch_embedding_cpu_tiny(benchmark, impl):
    _bench(benchmark, impl, CPU)


@pytest.mark.benchmark
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["patch_projection", "conv2d"])
def test_patch_embedding_gpu(benchmark, impl):
    _bench(benchmark, impl, GPU)


if __name__ == "__main__":  # a pytest-benchmark suite: say how it runs instead of exiting silently
    from benchmarks.common import pytest_suite_main

    pytest_suite_main(__file__)
