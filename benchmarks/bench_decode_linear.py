"""The decode step's matrix products (`kernels/decode_linear.py`) against cuBLAS, per projection and batch.

A GPU report (``python -m benchmarks.bench_decode_linear --out DIR``) and a pytest-benchmark suite. For each of a
language model's per-layer projections (merged q/k/v, o, merged gate/up, down) at each decode batch it times, in
one CUDA graph of as many calls as the model has layers (each call its own weight, so that the weights stream from
memory as in a step and not from L2):
- cuBLAS (``F.linear``), and the split-K kernel at the runner's default settings and over a sweep of settings;
- for the products whose output the next RMSNorm adds to the residual stream (o, down), each also with that norm:
  cuBLAS then `rms_norm`, against the kernel's partial products summed inside `rms_norm` (what the runner's step
  runs; the sweep's best is the fastest with the norm).
Floors are the weight's bytes at the measured copy bandwidth. Every setting's result is checked against
``F.linear`` before it is timed.

    python -m benchmarks.bench_decode_linear --out DIR [--geometry 1b] [--batches 1,8,64]   # GPU report
    python -m benchmarks.bench_decode_linear --out DIR --smoke                           # CPU dry run
    pytest benchmarks/bench_decode_linear.py -m benchmark                                # pytest-benchmark
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import (
    check_then_benchmark,
    command_line,
    copy_bandwidth_gbs,
    environment_info,
    int_list,
    markdown_table,
    output_dir,
    positive_int,
    progress,
    time_fn,
    write_results,
)

RESULT_NAME = "bench_decode_linear"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # relative to the largest output
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def say(message: str) -> None:
    print(f"[bench_decode_linear] {message}", flush=True)


def projections(geometry: str) -> dict[str, tuple[int, int, bool]]:
    """name -> (out_features, in_features, bias) of one decoder layer's products at a model geometry."""
    from engine.model.loading import GEOMETRIES

    g = GEOMETRIES[f"internvl3-{geometry}-geometry"]
    head_dim = g.hidden_size // g.num_attention_heads
    kv = g.num_key_value_heads * head_dim
    return {
        "qkv": (g.hidden_size + 2 * kv, g.hidden_size, True),
        "o": (g.hidden_size, g.hidden_size, False),
        "gate_up": (2 * g.intermediate_size, g.hidden_size, False),
        "down": (g.hidden_size, g.intermediate_size, False),
    }


def layers_of(geometry: str) -> int:
    from engine.model.loading import GEOMETRIES

    return GEOMETRIES[f"internvl3-{geometry}-geometry"].num_hidden_layers


ADD_NORM_PRODUCTS = ("o", "down")  # their output goes to the next RMSNorm's residual add


@dataclass
class Settings:
    device: str
    dtype: torch.dtype
    layers: int
    batches: list[int]
    repeats: int
    sweep: bool
    sm_count: int
    shared_bytes: int = 227 * 1024  # per program (`kernels.paged_kv.shared_memory_bytes`)


def sweep_configs(rows: int, out_features: int, in_features: int, s: "Settings", smoke: bool):
    """The default settings first, then tiles of 32-128 columns with 128-wide steps 5 deep (the earlier sweeps'
    winners: 256-wide steps do not fit 5 deep, 64-wide ones and 3-deep pipelines were never faster), and 1-4, 6
    splits or enough to fill the SMs once or twice over."""
    from kernels.decode_linear import MAX_BLOCK_M, DecodeLinearConfig, decode_linear_config

    sm_count = s.sm_count
    element_size = torch.tensor([], dtype=s.dtype).element_size()
    default = decode_linear_config(rows, out_features, in_features, sm_count, element_size, s.shared_bytes)
    configs = {default: "default"}
    if smoke:
        configs[DecodeLinearConfig(block_n=16, block_k=16, splits=2, num_stages=2)] = ""
        return configs
    for block_n in (32, 64, 128):
        tiles = -(-out_features // block_n) * -(-rows // MAX_BLOCK_M)
        steps = -(-in_features // 128)
        fill = max(1, min(sm_count // tiles, steps))
        for splits in sorted({1, 2, 3, 4, 6, fill, 2 * fill}):
            if splits <= steps:
                configs.setdefault(DecodeLinearConfig(block_n=block_n, block_k=128, splits=splits, num_stages=5), "")
    return configs


class Graph:
    """`fn` captured in a CUDA graph after a warm-up (compilation, cuBLAS plans); on CPU it just runs."""

    def __init__(self, fn, device: str):
        self.fn = fn
        self.graph = None
        if torch.device(device).type == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                fn()

    def replay(self):
        return self.graph.replay() if self.graph is not None else self.fn()


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    """Max |got - want| relative to the largest |want|; raises above the dtype's tolerance."""
    err = float((got.float() - want.float()).abs().max()) / max(1.0, float(want.float().abs().max()))
    if err > TOLERANCE[dtype]:
        raise AssertionError(f"relative error {err:.3g} above {TOLERANCE[dtype]}")
    return err


@torch.no_grad()
def measure_product(name, shape, batch, s: Settings, bandwidth: float, smoke: bool, report_rows: list) -> None:
    """One projection at one batch: cuBLAS, the kernel's settings, and (o, down) each with its RMSNorm."""
    from kernels.decode_fusions import rms_norm
    from kernels.decode_linear import decode_linear, decode_linear_partials

    out_features, in_features, has_bias = shape
    g = torch.Generator(device=s.device).manual_seed(0)
    weights = [torch.randn(out_features, in_features, device=s.device, generator=g).to(s.dtype) * in_features**-0.5
               for _ in range(s.layers)]  # fmt: skip
    biases = [torch.randn(out_features, device=s.device, generator=g).to(s.dtype) if has_bias else None for _ in weights]
    x = torch.randn(batch, in_features, device=s.device, generator=g).to(s.dtype)
    residual = torch.randn(batch, out_features, device=s.device, generator=g).to(s.dtype)
    norm_weight = torch.rand(out_features, device=s.device, generator=g).to(s.dtype) + 0.5
    element = weights[0].element_size()
    floor_us = (out_features * in_features + batch * (in_features + out_features)) * element / (bandwidth * 1e9) * 1e6

    def timed(fn) -> float:
        graph = Graph(fn, s.device)
        return time_fn(graph.replay, s.device, warmup=2, repeats=s.repeats).median_ms * 1e3 / s.layers

    def row(impl, us, config=None, label="", err=None, **extra):
        r = dict(product=name, batch=batch, out_features=out_features, in_features=in_features, impl=impl,
                 us=us, floor_us=floor_us, x_floor=us / floor_us, label=label, max_rel_err=err, **extra)
        if config is not None:
            r.update(block_n=config.block_n, block_k=config.block_k, splits=config.splits,
                     num_warps=config.num_warps, num_stages=config.num_stages)
        report_rows.append(r)
        return r

    want = F.linear(x, weights[0], biases[0])
    with_norm = name in ADD_NORM_PRODUCTS
    plain_norm = rms_norm(want, norm_weight, 1e-6, residual=residual) if with_norm else None
    cublas = row("cublas", timed(lambda: [F.linear(x, w, b) for w, b in zip(weights, biases)]))
    if with_norm:
        cublas["us_with_norm"] = timed(lambda: [rms_norm(F.linear(x, w), norm_weight, 1e-6, residual=residual)
                                                for w in weights])  # fmt: skip
    configs = sweep_configs(batch, out_features, in_features, s, smoke)
    if not s.sweep:
        configs = dict([next(iter(configs.items()))])
    best = None
    for config, label in configs.items():
        try:
            err = _close(decode_linear(x, weights[0], biases[0], config), want, s.dtype)
            us = timed(lambda config=config: [decode_linear_partials(x, w, config) for w in weights])
            extra = {}
            if with_norm:  # what the step runs: the partial sums added by the next norm
                fused = rms_norm(decode_linear_partials(x, weights[0], config), norm_weight, 1e-6, residual=residual,
                                 partial_sums=True)  # fmt: skip
                extra["norm_max_rel_err"] = max(_close(a, b, s.dtype) for a, b in zip(fused, plain_norm))
                extra["us_with_norm"] = timed(lambda config=config: [
                    rms_norm(decode_linear_partials(x, w, config), norm_weight, 1e-6, residual=residual,
                             partial_sums=True) for w in weights])  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a setting that does not compile or is wrong is reported, not fatal
            report_rows.append(dict(product=name, batch=batch, impl="split-K", label=label, error=f"{type(e).__name__}: {e}"))
            continue
        r = row("split-K partials", us, config, label, err, **extra)
        key = "us_with_norm" if with_norm else "us"
        if best is None or r[key] < best[key]:
            best = r
    if best is not None:
        best["label"] = (best["label"] + " best").strip()
    if with_norm and s.device == "cuda":  # the default again, each kernel launched only after the previous ends
        default = next(iter(configs))
        us = timed(lambda: [rms_norm(decode_linear_partials(x, w, default, programmatic_launch=False), norm_weight,
                                     1e-6, residual=residual, partial_sums=True, programmatic_launch=False)
                            for w in weights])  # fmt: skip
        for r in report_rows:
            if r.get("product") == name and r.get("batch") == batch and "default" in r.get("label", ""):
                r["us_with_norm_no_programmatic_launch"] = us


def render(report: dict) -> str:
    rows = [r for r in report["rows"] if "error" not in r and (r["impl"] != "split-K partials" or r["label"])]
    table = markdown_table(rows, [("product", "product"), ("batch", "batch"), ("impl", "impl"), ("label", "settings"),
                                  ("block_n", "block_n"), ("block_k", "block_k"), ("splits", "splits"),
                                  ("num_stages", "depth"), ("us", "us"), ("floor_us", "floor us"), ("x_floor", "x floor"),
                                  ("us_with_norm", "us with rms_norm"), ("max_rel_err", "max rel err")])  # fmt: skip
    errors = [r for r in report["rows"] if "error" in r]
    return table + ("\n\nFailed settings:\n" + "\n".join(f"- {r['product']} b{r['batch']}: {r['error']}" for r in errors)
                    if errors else "")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The decode step's products: split-K kernel vs cuBLAS (module docstring).")
    parser.add_argument("--out", type=output_dir, required=True, help="directory for bench_decode_linear.json and .md")
    parser.add_argument("--geometry", choices=("1b", "2b", "8b"), default="1b")
    parser.add_argument("--batches", type=int_list, default=[1, 8, 64])
    parser.add_argument("--products", default="qkv,o,gate_up,down", help="comma list of qkv,o,gate_up,down")
    parser.add_argument("--no-sweep", action="store_true", help="the default settings only")
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--smoke", action="store_true", help="a CPU dry run at tiny sizes (Triton interpreter)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype = "cpu", torch.float32
        shapes = {"qkv": (40, 24, True), "o": (24, 24, False), "gate_up": (64, 24, False), "down": (24, 32, False)}
        settings = Settings(device, dtype, 2, [1, 3], 1, not args.no_sweep, 4)
    else:
        if not torch.cuda.is_available():
            print("the GPU report needs CUDA (--smoke runs a tiny CPU dry run)", file=sys.stderr)
            return 2
        device, dtype = "cuda", torch.bfloat16
        shapes = projections(args.geometry)
        from kernels.paged_kv import shared_memory_bytes

        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        settings = Settings(device, dtype, layers_of(args.geometry), args.batches, args.repeats, not args.no_sweep,
                            sm_count, shared_memory_bytes(torch.device(device)))  # fmt: skip
    wanted = [p for p in args.products.split(",") if p]
    unknown = sorted(set(wanted) - set(shapes))
    if unknown:
        parser.error(f"unknown products {unknown}; choose from {sorted(shapes)}")
    bandwidth = copy_bandwidth_gbs(device)
    report = dict(environment=environment_info(device), command=command_line(), copy_bandwidth_gbs=bandwidth,
                  geometry="smoke" if args.smoke else args.geometry, layers=settings.layers, rows=[])  # fmt: skip
    say(f"copy bandwidth {bandwidth:.0f} GB/s; {settings.layers} weights per graph")
    for name in progress(wanted, desc="products"):
        for batch in settings.batches:
            measure_product(name, shapes[name], batch, settings, bandwidth, args.smoke, report["rows"])
            write_results(args.out, RESULT_NAME, report, render(report), header="# Decode products")
    for r in report["rows"]:
        if "error" in r:
            say(f"{r['product']:>8} b{r['batch']:<3} {r['impl']:<18} FAILED {r['error']}")
        elif r["impl"] == "cublas" or r["label"]:
            norm = f", with rms_norm {r['us_with_norm']:.2f} us" if "us_with_norm" in r else ""
            if "us_with_norm_no_programmatic_launch" in r:
                norm += f" ({r['us_with_norm_no_programmatic_launch']:.2f} without programmatic launch)"
            settings = f" n{r['block_n']} s{r['splits']}" if "splits" in r else ""
            say(f"{r['product']:>8} b{r['batch']:<3} {r['impl']:<18} {r['label']:<13}{settings:<8} {r['us']:7.2f} us "
                f"({r['x_floor']:.2f}x floor){norm}")
    return 0


# ------------------------------------------------------------------------------------------ pytest-benchmark
CPU_CASE = dict(rows=3, out_features=40, in_features=72, device="cpu", dtype=torch.float32)
GPU_CASE = dict(rows=64, out_features=896, in_features=4864, device="cuda", dtype=torch.bfloat16)  # 1B's down


def _product_step(case: dict):
    from kernels.decode_linear import (
        DecodeLinearConfig,
        decode_linear,
        decode_linear_config,
        decode_linear_reference,
    )

    g = torch.Generator().manual_seed(0)
    x = torch.randn(case["rows"], case["in_features"], generator=g).to(case["dtype"]).to(case["device"])
    w = torch.randn(case["out_features"], case["in_features"], generator=g).to(case["dtype"]).to(case["device"])
    on_gpu = case["device"] == "cuda"
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count if on_gpu else 4
    config = decode_linear_config(case["rows"], case["out_features"], case["in_features"], sm_count)
    if not on_gpu:
        config = DecodeLinearConfig(block_n=16, block_k=16, splits=config.splits, num_stages=2)
    impls = {"decode_linear": lambda: (decode_linear(x, w, config=config),),
             "reference": lambda: (decode_linear_reference(x, w),)}
    return lambda impl: impls[impl]()


@pytest.mark.benchmark(group="decode_linear")
@pytest.mark.parametrize("impl", ["decode_linear", "reference"])
def test_decode_linear_cpu_tiny(benchmark, impl):
    check_then_benchmark(benchmark, _product_step(CPU_CASE), "decode_linear", "reference", impl, 1e-5, "cpu")


@needs_cuda
@pytest.mark.benchmark(group="decode_linear")
@pytest.mark.parametrize("impl", ["decode_linear", "reference"])
def test_decode_linear_gpu_down_projection(benchmark, impl):
    check_then_benchmark(benchmark, _product_step(GPU_CASE), "decode_linear", "reference", impl, 2e-2, "cuda")


if __name__ == "__main__":
    from benchmarks.common import run_harness
    sys.exit(run_harness(main))
