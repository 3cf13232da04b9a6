"""pytest-benchmark suite: the decode-step fusions (`kernels/decode_fusions.py`) against their PyTorch references.

Each case first checks the fused op against its reference, then times it; the JSON's ``extra_info`` holds the
bytes moved and GB/s against the measured copy bandwidth. CPU cases are tiny (Triton interpreter); GPU cases use
the InternVL3-1B language model's decode shapes (batch 64: hidden 896, 14/2 heads of 64, MLP width 4,864).

    pytest benchmarks/bench_decode_fusions.py -m benchmark                                  # timed
    pytest benchmarks/bench_decode_fusions.py -m benchmark --benchmark-disable -q           # once each (CI)
"""

from __future__ import annotations

import pytest
import torch

from kernels.decode_fusions import (
    _cache_outputs,
    rms_norm,
    rms_norm_reference,
    rotary_kv_write,
    rotary_kv_write_reference,
    rotary_qk,
    rotary_qk_reference,
    silu_mul,
    silu_mul_reference,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CPU = dict(rows=3, hidden=40, q_heads=4, kv_heads=2, head_dim=8, width=72, block_size=4, dtype=torch.float32,
           device="cpu")
GPU = dict(rows=64, hidden=896, q_heads=14, kv_heads=2, head_dim=64, width=4864, block_size=16, dtype=torch.bfloat16,
           device="cuda")
CACHE_WRITERS = {"rotary_kv_write"}  # ops that write into caches passed in (in place) rather than return outputs
TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}


def _inputs(op: str, shape: dict):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(shape["dtype"]).to(shape["device"])  # noqa: E731
    n = shape["rows"]
    if op == "rms_norm":
        return (r(n, shape["hidden"]), r(shape["hidden"]), 1e-6), dict(residual=r(n, shape["hidden"]))
    if op in ("rotary_qk", "rotary_kv_write"):
        angle = torch.randn(n, shape["head_dim"] // 2, generator=g)
        emb = torch.cat([angle, angle], -1)
        cos, sin = (t.to(shape["dtype"]).to(shape["device"]) for t in (emb.cos(), emb.sin()))
        q, k = r(n, shape["q_heads"], shape["head_dim"]), r(n, shape["kv_heads"], shape["head_dim"])
        if op == "rotary_qk":
            return (q, k, cos, sin), {}
        blocks = -(-n // shape["block_size"]) + 1
        caches = [r(blocks, shape["block_size"], shape["kv_heads"], shape["head_dim"]) for _ in range(2)]
        slots = torch.randperm(blocks * shape["block_size"], generator=g)[:n].to(shape["device"])
        return (q, k, r(*k.shape), cos, sin, *caches, slots), {}
    return (r(n, shape["width"]), r(n, shape["width"])), {}


OPS = {"rms_norm": (rms_norm, rms_norm_reference), "rotary_qk": (rotary_qk, rotary_qk_reference),
       "rotary_kv_write": (rotary_kv_write, rotary_kv_write_reference),
       "silu_mul": (silu_mul, silu_mul_reference)}  # fmt: skip


def _bytes(op, args, kwargs, out) -> int:
    """Bytes read and written: every input and output; for a cache writer, the rows it writes, not the caches."""
    if op in CACHE_WRITERS:
        q, k, v, cos, sin = args[:5]
        return sum(t.numel() * t.element_size() for t in (q, k, v, cos, sin, out, k, v))
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    outs = out if isinstance(out, tuple) else (out,)
    return sum(t.numel() * t.element_size() for t in (*tensors, *outs))


def _outputs(op, fn, args, kwargs) -> tuple:
    """What to compare: the outputs; for a cache writer, its output and the caches it wrote (on copies)."""
    if op in CACHE_WRITERS:
        return _cache_outputs(fn)(*args, **kwargs)
    out = fn(*args, **kwargs)
    return out if isinstance(out, tuple) else (out,)


def _bench(benchmark, op, impl, shape, copy_bandwidth):
    fused, reference = OPS[op]
    args, kwargs = _inputs(op, shape)
    got = _outputs(op, fused, args, kwargs)
    for a, b in zip(got, _outputs(op, reference, args, kwargs)):
        torch.testing.assert_close(a, b, **TOL[shape["dtype"]])
    fn = fused if impl == "fused" else reference
    cuda = shape["device"] == "cuda"

    def run():
        out = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(op=op, impl=impl, rows=shape["rows"], dtype=str(shape["dtype"]),
                                bytes=_bytes(op, args, kwargs, got[0] if op in CACHE_WRITERS else got),
                                copy_gbs=copy_bandwidth)  # fmt: skip
    benchmark(run)


@pytest.mark.benchmark
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("op", list(OPS))
def test_decode_fusions_cpu_tiny(benchmark, copy_bandwidth, op, impl):
    _bench(benchmark, op, impl, CPU, copy_bandwidth)


@pytest.mark.benchmark
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("op", list(OPS))
def test_decode_fusions_gpu(benchmark, copy_bandwidth, op, impl):
    _bench(benchmark, op, impl, GPU, copy_bandwidth)


if __name__ == "__main__":  # a pytest-benchmark suite: say how it runs instead of exiting silently
    from benchmarks.common import pytest_suite_main

    pytest_suite_main(__file__)
