"""Paged KV cache benchmarks: a pytest-benchmark suite and a GPU report.

Suite (marked ``benchmark``): paged decode attention against its PyTorch reference, and the K/V write kernel.
Tiny CPU cases run under the Triton interpreter; GPU cases (Qwen2.5-0.5B geometry) are skipped without CUDA.

    pytest benchmarks -m benchmark -k bench_paged_kv                          # timed
    pytest benchmarks -m benchmark -k bench_paged_kv --benchmark-disable -q   # once each, untimed (CI)

GPU report (one shot, every section guarded: a failure is recorded and the next section runs):

    python -m benchmarks.bench_paged_kv --out DIR
    python -m benchmarks.bench_paged_kv --smoke --out DIR   # every path at tiny sizes on the CPU (a dry run)

1. numerics: bf16 (and fp32) paged decode attention, chunk attention and the write kernel against their
   references at the model's geometry; split-K against no split;
2. paged decode attention for 24 layers, 14/2 heads, head_dim 64, batch 64, 1,300-token contexts (256 visual),
   eager and in one CUDA graph, over a sweep of splits / tile sizes and cache page sizes, against the HBM floor
   (K/V bytes read over the measured copy bandwidth; target >= 70 % of the floor), with dense SDPA on
   contiguous caches beside it;
3. a whole decode step of the InternVL3-1B language model (random weights, real sizes) at batch 64: the paged
   runner's step in a CUDA graph against transformers' eager DynamicCache step, against the floor (weights +
   lm_head + K/V bytes over the copy bandwidth; target within 1.5x), where the step's device time goes (per
   kernel and per kind, from torch.profiler over eager steps), plus per-step times of whole generate()
   calls, paged-vs-dynamic token agreement, and prefix-sharing savings on a batch of 8 images x 8 questions.

Writes ``DIR/bench_paged_kv.json`` and ``DIR/bench_paged_kv.md``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from benchmarks.common import choice_list, output_dir, positive_int, use_triton_interpreter_without_cuda

use_triton_interpreter_without_cuda()  # before any kernel module is imported

import pytest  # noqa: E402

from benchmarks.common import (  # noqa: E402
    command_line,
    copy_bandwidth_gbs,
    environment_info,
    free_memory,
    is_oom,
    markdown_table,
    module_bytes,
    time_fn,
    write_results,
)
from kernels.paged_chunk_attention import paged_chunk_attention, paged_chunk_attention_reference  # noqa: E402
from kernels.paged_kv import (  # noqa: E402
    choose_num_splits,
    default_block_n,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_kv_write,
    paged_kv_write_reference,
    programmatic_launch_supported,
)

RESULT_NAME = "bench_paged_kv"
# Qwen2.5-0.5B (InternVL3-1B's language model)
LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 24, 14, 2, 64
# the language models of InternVL3-1B/2B/8B (Qwen2.5-0.5B/1.5B/7B): layers, query heads, KV heads, head_dim
GEOMETRIES = {
    "1b": dict(layers=LAYERS, q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
               model_spec="internvl3-1b-geometry"),
    "2b": dict(layers=28, q_heads=12, kv_heads=2, head_dim=128, model_spec="internvl3-2b-geometry"),
    "8b": dict(layers=28, q_heads=28, kv_heads=4, head_dim=128, model_spec="internvl3-8b-geometry"),
}
BATCH, CONTEXT, VISUAL = 64, 1300, 256
# max |kernel - reference| allowed in the numerics section: fp32 summation order; 16-bit output rounding of O(1) values
NUMERICS_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
BLOCK_SIZE = 16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------------------- cases


class DecodeCase:
    """A pool, shuffled block tables, per-row context lengths and one query per row for each of `layers`."""

    def __init__(self, *, batch, context, layers=1, q_heads=Q_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                 block_size=BLOCK_SIZE, dtype=torch.bfloat16, device="cuda", seed=0, contexts=None):
        g = torch.Generator().manual_seed(seed)
        lens = list(contexts) if contexts is not None else [context] * batch
        self.blocks_per_row = max(1, math.ceil(max(lens) / block_size))
        num_blocks = batch * self.blocks_per_row
        shape = (layers, num_blocks, block_size, kv_heads, head_dim)
        self.key = torch.empty(shape, dtype=dtype, device=device).normal_(generator=None)
        self.value = torch.empty(shape, dtype=dtype, device=device).normal_(generator=None)
        perm = torch.randperm(num_blocks, generator=g)  # fragmented: a row's blocks are scattered over the pool
        self.tables = perm.view(batch, self.blocks_per_row).to(device=device, dtype=torch.int32)
        self.context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.q = torch.randn(layers, batch, q_heads, head_dim, generator=g).to(device=device, dtype=dtype)
        self.layers, self.batch, self.lens = layers, batch, lens
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype

    def kv_bytes(self) -> int:
        """K and V bytes every layer must read: the floor of decode attention."""
        element = torch.tensor([], dtype=self.dtype).element_size()
        return self.layers * sum(self.lens) * self.kv_heads * self.head_dim * 2 * element

    def run(self, layer=0, **kwargs):
        return paged_decode_attention(
            self.q[layer], self.key[layer], self.value[layer], self.tables, self.context_lens, **kwargs
        )

    def reference(self, layer=0):
        return paged_decode_attention_reference(
            self.q[layer], self.key[layer], self.value[layer], self.tables, self.context_lens
        )


def write_case(tokens, *, kv_heads=KV_HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE, dtype=torch.bfloat16,
               device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = max(2, math.ceil(2 * tokens / block_size))
    cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
    key = torch.randn(tokens, kv_heads, head_dim, generator=g).to(device=device, dtype=dtype)
    value = torch.randn(tokens, kv_heads, head_dim, generator=g).to(device=device, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[::5] = -1
    return key, value, cache, cache.clone(), slots.to(device)


def _sync_after(fn):
    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return run


# ------------------------------------------------------------------------------------------------- pytest suite


@pytest.mark.benchmark
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_decode_attention_cpu_tiny(benchmark, impl):
    case = DecodeCase(batch=2, context=0, contexts=[5, 19], q_heads=4, kv_heads=2, head_dim=16, block_size=4,
                      dtype=torch.float32, device="cpu")
    fn = (lambda: case.run(num_splits=2, block_n=16)) if impl == "triton" else case.reference
    assert torch.allclose(fn(), case.reference(), atol=1e-5)
    benchmark(fn)


@pytest.mark.benchmark
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_write_cpu_tiny(benchmark, impl):
    key, value, key_cache, value_cache, slots = write_case(9, kv_heads=2, head_dim=16, block_size=4,
                                                           dtype=torch.float32, device="cpu")
    write = paged_kv_write if impl == "triton" else paged_kv_write_reference
    k_ref, v_ref = key_cache.clone(), value_cache.clone()
    paged_kv_write_reference(key, value, k_ref, v_ref, slots)
    write(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, k_ref) and torch.equal(value_cache, v_ref)
    benchmark(lambda: write(key, value, key_cache, value_cache, slots))


@pytest.mark.benchmark
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_decode_attention_gpu_geometry(benchmark, impl):
    batch = BATCH if impl == "triton" else 8  # the reference loops over rows in Python
    case = DecodeCase(batch=batch, context=CONTEXT)
    fn = _sync_after(case.run if impl == "triton" else case.reference)
    if impl == "triton":
        err = (case.run().float() - case.reference().float()).abs().max().item()
        assert err < 2e-2, f"bf16 paged decode attention differs from the reference by {err}"
    benchmark(fn)


@pytest.mark.benchmark
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_write_gpu(benchmark, impl):
    key, value, key_cache, value_cache, slots = write_case(BATCH)
    write = paged_kv_write if impl == "triton" else paged_kv_write_reference
    k_ref, v_ref = key_cache.clone(), value_cache.clone()
    paged_kv_write_reference(key, value, k_ref, v_ref, slots)
    write(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, k_ref) and torch.equal(value_cache, v_ref)
    benchmark(_sync_after(lambda: write(key, value, key_cache, value_cache, slots)))


def rotary_step_case(case: "DecodeCase", seed: int = 0):
    """The inputs of `rotary_paged_decode_attention` on a `DecodeCase` (layer 0): each row's last context position
    is its new token, q/k/v views of one projection output, its slot from the row's table: its positional
    arguments."""
    g = torch.Generator().manual_seed(seed)
    q_heads, head_dim, kv_heads = case.q.shape[2], case.head_dim, case.kv_heads
    device, dtype = case.q.device, case.dtype
    qkv = torch.randn(case.batch, q_heads + 2 * kv_heads, head_dim, generator=g).to(device=device, dtype=dtype)
    q, k, v = qkv[:, :q_heads], qkv[:, q_heads : q_heads + kv_heads], qkv[:, q_heads + kv_heads :]
    angle = torch.rand(case.batch, head_dim // 2, generator=g) * 6
    cos, sin = (t.to(device=device, dtype=dtype) for t in (torch.cat([angle, angle], -1).cos(),
                                                           torch.cat([angle, angle], -1).sin()))  # fmt: skip
    block_size = case.key.shape[2]
    last = (case.context_lens.long() - 1).clamp(min=0)
    rows = torch.arange(case.batch, device=device)
    slots = case.tables[rows, last // block_size].long() * block_size + last % block_size
    slots = torch.where(case.context_lens > 0, slots, -1)
    return q, k, v, cos, sin, case.key[0], case.value[0], slots, case.tables, case.context_lens


@pytest.mark.benchmark
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_rotary_paged_decode_attention_cpu_tiny(benchmark, impl):
    """`rotary_paged_decode_attention` (the rotary embedding and the cache write inside the attention) against
    `rotary_kv_write_reference` + `paged_decode_attention_reference`, on copies of the caches."""
    from kernels.decode_fusions import rotary_paged_decode_attention, rotary_paged_decode_attention_reference

    case = DecodeCase(batch=3, context=0, contexts=[5, 19, 1], q_heads=4, kv_heads=2, head_dim=16, block_size=4,
                      dtype=torch.float32, device="cpu")  # fmt: skip
    args = rotary_step_case(case)
    fns = {"fused": lambda *a: rotary_paged_decode_attention(*a, num_splits=2, block_n=16),
           "reference": rotary_paged_decode_attention_reference}  # fmt: skip

    def run(fn):
        caches = args[5].clone(), args[6].clone()
        return fn(*args[:5], *caches, *args[7:]), *caches

    for got, want in zip(run(fns[impl]), run(rotary_paged_decode_attention_reference)):
        assert torch.allclose(got, want, atol=1e-5)
    benchmark(lambda: run(fns[impl]))


@pytest.mark.benchmark
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["fused", "two_kernels"])
def test_rotary_paged_decode_attention_gpu_geometry(benchmark, impl):
    """The 1B geometry's step attention at batch 64: one kernel against `rotary_kv_write` + `paged_decode_attention`
    (what the runner launches without the fusion); the caches are written in place, the same slots every call."""
    from kernels.decode_fusions import rotary_kv_write, rotary_paged_decode_attention

    case = DecodeCase(batch=BATCH, context=CONTEXT)
    args = rotary_step_case(case)
    q, k, v, cos, sin, key_cache, value_cache, slots, tables, lens = args

    def two_kernels():
        return paged_decode_attention(rotary_kv_write(q, k, v, cos, sin, key_cache, value_cache, slots), key_cache,
                                      value_cache, tables, lens)  # fmt: skip

    fns = {"fused": lambda: rotary_paged_decode_attention(*args), "two_kernels": two_kernels}
    err = (fns["fused"]().float() - two_kernels().float()).abs().max().item()
    assert err < 2e-2, f"the fused kernel differs from the two by {err}"
    benchmark(_sync_after(fns[impl]))


# ------------------------------------------------------------------------------------------------- GPU report


@dataclass
class Geometry:
    """Sizes and device of a report run. The default is the target; `smoke()` is a CPU dry run of every path."""

    device: str = "cuda"
    layers: int = LAYERS
    q_heads: int = Q_HEADS
    kv_heads: int = KV_HEADS
    head_dim: int = HEAD_DIM
    batch: int = BATCH
    context: int = CONTEXT
    visual: int = VISUAL
    block_size: int = BLOCK_SIZE
    model_spec: str = "internvl3-1b-geometry"
    dtype: torch.dtype = torch.bfloat16
    numerics_lens: tuple = (1, 16, 17, 255, 256, 1300, 1301, 977)
    chunk_cached: tuple = (0, 300, 1280, 17)
    chunk_lens: tuple = (257, 33, 0, 64)
    sweep_splits: tuple = (1, 2, 4, 8)
    sweep_block_n: tuple = (64, 128)
    sweep_stages: tuple = (3, 5)  # software pipelining depth (the default: pipeline_stages)
    # other cache page sizes (PagedRunner(block_size=...)): fewer block-table lookups per token read
    sweep_page_sizes: tuple = (32, 64)
    sweep_contexts: tuple = (325, 650, 1300, 2600)  # the default at these lengths: fixed vs streaming time
    # the default launch checked at these (beyond the geometry's own heads): dtypes, head widths, (batch, KV heads)
    default_dtypes: tuple = (torch.bfloat16, torch.float16, torch.float32)
    default_head_dims: tuple = (64, 128, 256)
    default_batches: tuple = ((1, 2), (64, 2), (64, 4), (128, 4))
    small_batch: int = 8
    small_context: int = 400
    images: int = 8  # prefix-sharing case: batch = images x questions
    sharing_context: int = 600
    warmup: int = 3  # calls before timing (compilation and graph capture are excluded anyway)
    step_batches: tuple = (1, 8)  # the default step is also reported at these batch sizes

    @classmethod
    def smoke(cls) -> "Geometry":
        return cls(
            device="cpu", layers=2, q_heads=4, kv_heads=2, head_dim=16, batch=2, context=40, visual=16, block_size=4,
            model_spec="tiny", dtype=torch.float32, numerics_lens=(1, 4, 5, 23), chunk_cached=(0, 7),
            chunk_lens=(5, 0), sweep_splits=(1, 2), sweep_block_n=(16,), sweep_stages=(2,), sweep_page_sizes=(8,),
            sweep_contexts=(20, 40), default_dtypes=(torch.float32,), default_head_dims=(16, 24),
            default_batches=((1, 2), (3, 1)), small_batch=2,
            small_context=30, images=1, sharing_context=30, warmup=0, step_batches=(1,),
        )

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def case(self, **kwargs) -> DecodeCase:
        base = dict(
            batch=self.batch, context=self.context, q_heads=self.q_heads, kv_heads=self.kv_heads,
            head_dim=self.head_dim, block_size=self.block_size, dtype=self.dtype, device=self.device,
        )
        return DecodeCase(**{**base, **kwargs})


def say(message: str) -> None:
    print(f"[bench_paged_kv] {message}", flush=True)


class _Eager:
    """Stands in for a CUDA graph on the CPU dry run: replay() runs the function."""

    def __init__(self, fn):
        self.replay = fn


def capture_graph(fn, geo: Geometry, warmup: int = 2):
    """Warm `fn` up on a side stream (Triton compiles, cuBLAS plans), then capture it in a CUDA graph."""
    if not geo.cuda:
        return _Eager(fn)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def error_row(name: str, e: BaseException, **extra) -> dict:
    say(f"  {name}: FAILED {type(e).__name__}: {e}")
    return dict(name=name, error=f"{'out of memory: ' if is_oom(e) else ''}{type(e).__name__}: {e}",
                trace=traceback.format_exc(), **extra)


def section_numerics(report: dict, geo: Geometry) -> None:
    """Kernels against their references at the model's geometry, in the run's dtype and in fp32."""
    rows = []
    for dtype in dict.fromkeys((geo.dtype, torch.float32)):
        tol = NUMERICS_TOLERANCE[dtype]
        name = str(dtype).replace("torch.", "")
        case = geo.case(batch=len(geo.numerics_lens), context=0, contexts=geo.numerics_lens, dtype=dtype)
        ref = case.reference().float()
        for splits, options in itertools.product((1, 4, None), ({}, {"dot_in_cache_dtype": False},
                                                                  {"programmatic_launch": False})):
            err = (case.run(num_splits=splits, **options).float() - ref).abs().max().item()
            shown = " ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
            rows.append(dict(check=f"decode {name} splits={splits or 'auto'} {shown}", max_abs_err=err, tol=tol,
                             ok=err <= tol))
        # chunk attention: sequences continuing from cached positions (an empty chunk among them)
        cached, chunk = geo.chunk_cached, geo.chunk_lens
        pool = geo.case(batch=len(chunk), context=0, contexts=[c + n for c, n in zip(cached, chunk)], dtype=dtype)
        starts = [0]
        for n in chunk:
            starts.append(starts[-1] + n)
        visible = [c + i + 1 for c, n in zip(cached, chunk) for i in range(n)]
        visible = torch.tensor(visible, dtype=torch.int32, device=geo.device)
        q = torch.randn(starts[-1], geo.q_heads, geo.head_dim, device=geo.device).to(dtype)
        query_start = torch.tensor(starts, dtype=torch.int32, device=geo.device)
        args = (q, pool.key[0], pool.value[0], pool.tables, query_start, visible)
        err = (paged_chunk_attention(*args, max_query_len=max(chunk)).float()
               - paged_chunk_attention_reference(*args).float()).abs().max().item()
        rows.append(dict(check=f"chunk {name}", max_abs_err=err, tol=tol, ok=err <= tol))
        key, value, key_cache, value_cache, slots = write_case(
            777, kv_heads=geo.kv_heads, head_dim=geo.head_dim, block_size=geo.block_size, dtype=dtype, device=geo.device
        )
        k_ref, v_ref = key_cache.clone(), value_cache.clone()
        paged_kv_write_reference(key, value, k_ref, v_ref, slots)
        paged_kv_write(key, value, key_cache, value_cache, slots)
        exact = bool(torch.equal(key_cache, k_ref) and torch.equal(value_cache, v_ref))
        rows.append(dict(check=f"write {name}", max_abs_err=0.0 if exact else float("nan"), tol=0.0, ok=exact))
    # the default launch (tile, depth and splits from the device's SMs and shared memory) at other head widths and
    # dtypes, with fewer and more (row, KV head) programs than SMs: it must compile and be right everywhere
    for dtype, head_dim, (batch, kv_heads) in itertools.product(geo.default_dtypes, geo.default_head_dims,
                                                                 geo.default_batches):
        name = str(dtype).replace("torch.", "")
        tol = NUMERICS_TOLERANCE[dtype]
        lens = [1 + (i * 389) % (2 * geo.context) for i in range(batch)]
        check = f"default launch {name} head_dim={head_dim} batch={batch} kv_heads={kv_heads}"
        try:
            c = geo.case(batch=batch, context=0, contexts=lens, q_heads=kv_heads * 7, kv_heads=kv_heads,
                         head_dim=head_dim, dtype=dtype)
            err = (c.run().float() - c.reference().float()).abs().max().item()
            rows.append(dict(check=check, max_abs_err=err, tol=tol, ok=err <= tol))
        except Exception as e:  # noqa: BLE001  (a launch that does not compile is a failed check, not a crash)
            rows.append(dict(check=check, max_abs_err=float("nan"), tol=tol, ok=False, error=repr(e)[:300]))
    report["numerics"] = rows
    say("numerics: " + ", ".join(f"{r['check']}: {r['max_abs_err']:.2e} ({'ok' if r['ok'] else 'FAIL'})" for r in rows))
    if not all(r["ok"] for r in rows):
        report["numerics_failed"] = [r["check"] for r in rows if not r["ok"]]


def fit_fixed_and_streaming(points: list[tuple[float, float]], bytes_per_token: float) -> dict:
    """Least-squares line through (context tokens, us) points: the intercept is what every launch costs whatever
    it reads (launch, the first loads' latency, the merge), the slope the streaming rate of the rest."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")
    intercept = my - slope * mx
    return dict(fixed_us=intercept, us_per_token=slope, streaming_gbs=bytes_per_token / (slope * 1e-6) / 1e9
                if slope > 0 else float("nan"))


def section_decode_attention(report: dict, geo: Geometry, bandwidth: float, repeats: int) -> None:
    """All layers of paged decode attention in a CUDA graph: the runner's defaults, a sweep of launch settings and
    page sizes, ablations of the defaults, a context sweep that splits the time into a fixed part per launch and a
    streaming part, eager, and dense SDPA beside it."""
    case = geo.case(layers=geo.layers)
    floor_ms = case.kv_bytes() / (bandwidth * 1e9) * 1e3
    element = torch.tensor([], dtype=geo.dtype).element_size()
    block_n = default_block_n(geo.head_dim, element, geo.batch * geo.kv_heads, geo.device)
    auto = choose_num_splits(geo.batch, geo.kv_heads, geo.context, geo.device, block_n=block_n)
    out = dict(batch=geo.batch, context=geo.context, visual_tokens=geo.visual, layers=geo.layers, q_heads=geo.q_heads,
               kv_heads=geo.kv_heads, head_dim=geo.head_dim, block_size=geo.block_size, kv_bytes=case.kv_bytes(),
               floor_us=floor_ms * 1e3, auto_splits=auto, target_pct_of_floor=80, rows=[])
    report["decode_attention"] = out
    rows = out["rows"]
    say(f"decode attention: K/V {case.kv_bytes() / 1e9:.3f} GB, floor {floor_ms * 1e3:.0f} us, auto splits {auto}")

    def timed(fn):
        return time_fn(fn, geo.device, warmup=geo.warmup, repeats=repeats)

    from engine.model.paged.runner import STEP_ATTENTION_DEFAULTS

    def layers_of(c, **kwargs):
        # as the runner's step launches it, unless a row says otherwise (each layer here follows the previous layer's
        # attention, which writes no lengths)
        kwargs = {**STEP_ATTENTION_DEFAULTS, **kwargs}

        def fn():
            for layer in range(geo.layers):
                c.run(layer, **kwargs)

        return fn

    def record(name, timing, floor=floor_ms, **extra):
        row = dict(name=name, median_us=timing.median_ms * 1e3, p10_us=timing.p10_ms * 1e3, p90_us=timing.p90_ms * 1e3,
                   floor_us=floor * 1e3, pct_of_floor=100 * floor / timing.median_ms, **extra)
        if row["pct_of_floor"] > 100:
            row["error"] = f"{row['pct_of_floor']:.0f}% of its floor: faster than the copy bandwidth, so wrong"
        rows.append(row)
        say(f"  {name}: {timing} -> {row['pct_of_floor']:.0f}% of the floor")
        return row

    def graph_row(name, c=case, floor=floor_ms, **cfg):
        """Time ``cfg`` over every layer of ``c`` in one CUDA graph; a config that fails is recorded, not fatal."""
        try:
            graph = capture_graph(layers_of(c, **cfg), geo)
            row = record(name, timed(graph.replay), floor, mode="graph", **cfg)
            del graph
            return row
        except Exception as e:  # noqa: BLE001
            rows.append(error_row(name, e, mode="graph", **cfg))
            return None

    def label(cfg):
        return "graph " + " ".join(f"{k}={v}" for k, v in cfg.items())

    default = graph_row("graph, runner's default config")  # what the runner launches: every setting chosen
    out["default"] = default
    out["meets_target_default"] = None if default is None else default["pct_of_floor"] >= out["target_pct_of_floor"]
    best = default
    for splits, block_n, stages in itertools.product(sorted(set(geo.sweep_splits) | {auto}), geo.sweep_block_n,
                                                     geo.sweep_stages):
        cfg = dict(num_splits=splits, block_n=block_n, num_stages=stages)
        row = graph_row(label(cfg), **cfg)
        if row and (best is None or row["median_us"] < best["median_us"]):
            best = row
    # the defaults one at a time: fp32 dot operands, no programmatic launch, the lengths read after the wait, more warps
    for cfg in (dict(dot_in_cache_dtype=False), dict(programmatic_launch=False), dict(lengths_before_wait=False),
                dict(num_warps=8)):
        row = graph_row(label(cfg), **cfg)
        if row and (best is None or row["median_us"] < best["median_us"]):
            best = row
    out["best"] = best
    out["meets_target_best"] = None if best is None else best["pct_of_floor"] >= out["target_pct_of_floor"]
    # The same K/V in larger pages: a tile of block_n tokens then spans fewer pages (fewer table lookups).
    out["best_by_page_size"] = {}
    out["best_any_page_size"] = best
    for page in geo.sweep_page_sizes:
        if page == geo.block_size:
            continue
        try:
            page_case = geo.case(layers=geo.layers, block_size=page)
        except Exception as e:  # noqa: BLE001
            rows.append(error_row(f"block_size={page}", e, block_size=page))
            continue
        page_best = None
        for cfg in (dict(), dict(dot_in_cache_dtype=False)):
            row = graph_row(label(dict(block_size=page, **cfg)), page_case, **cfg)
            if row:
                row["block_size"] = page
                if page_best is None or row["median_us"] < page_best["median_us"]:
                    page_best = row
        out["best_by_page_size"][page] = page_best
        overall = out["best_any_page_size"]
        if page_best is not None and (overall is None or page_best["median_us"] < overall["median_us"]):
            out["best_any_page_size"] = page_best
        del page_case
        free_memory(geo.device)
    # Where the time goes: the default over several context lengths; a line through them separates what each
    # launch costs whatever it reads from the rate at which it streams the rest.
    points = []
    for context in geo.sweep_contexts:
        c = case if context == geo.context else geo.case(layers=geo.layers, context=context)
        row = graph_row(f"graph, runner's default config, {context} tokens", c, c.kv_bytes() / (bandwidth * 1e9) * 1e3)
        if row:
            row["context"] = context
            points.append((context, row["median_us"]))
        if c is not case:
            del c
            free_memory(geo.device)
    if len(points) >= 2:
        per_token = case.kv_bytes() / geo.context  # K/V bytes of one more position in every row and layer
        fit = fit_fixed_and_streaming(points, per_token)
        fit["contexts"] = [context for context, _ in points]
        fit["fixed_us_per_layer"] = fit["fixed_us"] / geo.layers
        fit["streaming_pct_of_copy"] = 100 * fit["streaming_gbs"] / bandwidth
        out["context_fit"] = fit
        say(f"  fit over contexts {fit['contexts']}: {fit['fixed_us_per_layer']:.2f} us fixed per layer, "
            f"streaming at {fit['streaming_gbs']:.0f} GB/s ({fit['streaming_pct_of_copy']:.0f}% of the copy rate)")
    try:
        record("eager, runner's default config", timed(layers_of(case)), mode="eager")
    except Exception as e:  # noqa: BLE001
        rows.append(error_row("eager", e))
    try:  # dense baseline: SDPA over contiguous (B, Hkv, T, D) caches, as a DynamicCache holds them
        shape = (geo.layers, geo.batch, geo.kv_heads, geo.context, geo.head_dim)
        dense_k = torch.randn(shape, device=geo.device, dtype=geo.dtype)
        dense_v = torch.randn_like(dense_k)
        q4 = case.q[:, :, :, None, :]  # (L, B, Hq, 1, D)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def dense():
            for layer in range(geo.layers):
                sdpa(q4[layer], dense_k[layer], dense_v[layer], enable_gqa=True)

        record("dense SDPA on a contiguous cache, eager", timed(dense), mode="eager")
        graph = capture_graph(dense, geo)
        out["dense_graph"] = record("dense SDPA on a contiguous cache, graph", timed(graph.replay), mode="graph")
        del graph, dense_k, dense_v
    except Exception as e:
        rows.append(error_row("dense SDPA", e))
    del case
    free_memory(geo.device)


def geometry_prompts(model, tok, geo: Geometry, *, batch, context, n_latents, images=None, questions=None, seed=0):
    """Prompts of exactly `context` tokens: <img> ctx*visual </img> text <start> latent*n <end>, one image each.

    With `images` and `questions`: row b shows image b // questions and asks question b % questions (several
    questions per image; rows with the same image and question are n samples of one prompt).
    """
    from engine.vocab import IMAGE_END_TOKEN, IMAGE_START_TOKEN

    g = torch.Generator().manual_seed(seed)
    img = [tok.convert_tokens_to_ids(IMAGE_START_TOKEN), *[model.image_token_id] * model.tokens_per_tile,
           tok.convert_tokens_to_ids(IMAGE_END_TOKEN)]
    tail = [model.start_latent_id, *[model.latent_id] * n_latents, model.end_latent_id]
    text_len = max(1, context - len(img) - len(tail))
    texts = [torch.randint(10, 400, (text_len,), generator=g).tolist() for _ in range(questions or batch)]
    rows = [img + texts[b % (questions or batch)] + tail for b in range(batch)]
    ids = torch.tensor(rows, device=geo.device)
    size = model.config.vision_config.image_size[0]
    pictures = torch.randn(images or batch, 3, size, size, generator=g)
    order = [(b // questions) % images for b in range(batch)] if images else list(range(batch))
    return ids, torch.ones_like(ids), pictures[order].to(geo.device, geo.dtype)


_DEFAULT_STEP_LOGITS: dict = {}  # (model, batch, context, page size) -> the default variant's eager step logits


def _step_functions(runner, geo: "Geometry", batch: int, context: int):
    """(graph step, eager step, bucket) of ``runner``'s one-position step for ``batch`` rows of ``context`` cached
    positions of random K/V (seeded: every runner of a run holds the same K/V and tokens)."""
    per_row = math.ceil((context + 1) / runner.block_size)
    runner.ensure_cache(batch * per_row + batch)
    cache = runner.cache
    for b in range(batch):
        cache.add_sequence(b)
        cache.reserve(b, context + 1)
    torch.manual_seed(0)
    cache.key.normal_()
    cache.value.normal_()
    buf = runner.graphs.bucket(batch, runner.dtype, runner.device)
    buf.block_tables.zero_()
    buf.block_tables[:batch].copy_(cache.block_table(range(batch), runner.table_width))
    tables = buf.block_tables[:batch]
    positions = torch.full((batch,), context, dtype=torch.long, device=geo.device)
    active = torch.ones(batch, dtype=torch.bool, device=geo.device)
    tokens = torch.randint(10, 400, (batch,), device=geo.device)

    def graph_step():  # static buffers filled, then the captured step replayed (eager on the CPU dry run)
        return runner.one_position(buf, tables, positions, active, tokens=tokens)

    def eager_step():
        return runner.one_position(None, tables, positions, active, tokens=tokens)

    return graph_step, eager_step, buf


def measure_step_settings(model, geo: "Geometry", batch: int, context: int, timed, out: dict, rounds: int = 5) -> None:
    """The default step against itself with one setting changed (the split-K products off; the rotary embedding
    and cache write in their own kernel, not in the attention's; the q/k/v product whole, not as partial sums that
    the attention adds up; the attention's context lengths read after its programmatic-launch wait), in ONE runner (the same
    buffers and weight copies) and in alternating rounds: runners built in turn in one process measured the same
    setting up to 25% apart on an H200 (benchmarks/RESULTS.md, 2026-11-30), more than settings change. Each
    setting's graph is captured anew when it is switched to. On the CPU dry run the fused ops are forced on."""
    from engine.model.paged.runner import PagedRunner

    forced = {} if geo.cuda else {"fused_ops": True}
    runner = PagedRunner(model, block_size=geo.block_size, max_model_len=max(4096, 2 * context), **forced)
    try:
        runner.refresh_merged_projections()
        graph_step, eager_step, buf = _step_functions(runner, geo, batch, context)

        def use(split: bool, rotary_inside: bool, split_qkv: bool, lengths_before_wait: bool):
            runner.split_k_products = split
            runner.rotary_in_attention = rotary_inside
            runner.split_k_qkv = split_qkv
            runner.attention_options["lengths_before_wait"] = lengths_before_wait
            runner.refresh_merged_projections()  # drops the runner's buckets if the products changed
            buf.graphs.clear()  # the step's kernels changed: the next call captures them (the same static buffers)
            runner.graphs.drop_graphs()  # with a new memory pool

        settings = {"default": (True, True, True, True), "without split products": (False, True, False, True),
                    "rotary outside the attention": (True, False, False, True),
                    "q/k/v product whole": (True, True, False, True),
                    "attention's lengths read after its wait": (True, True, True, False)}  # fmt: skip
        say(f"decode step settings in one runner, alternating ({rounds} rounds)")
        times: dict = {name: [] for name in settings}
        taken: dict = {}  # what each setting's step really ran: the split products, the rotary inside the attention
        logits: dict = {}
        # the length before the wait takes effect with programmatic launch only
        pdl = (programmatic_launch_supported(runner.device)
               and runner.attention_options.get("programmatic_launch") is not False)  # fmt: skip
        for _ in range(rounds):
            for name, setting in settings.items():
                use(*setting)
                taken[name] = dict(split_products=runner.ops().split_k is not None,
                                   rotary_in_attention=runner.rotary_in_attention_taken,
                                   split_qkv=runner.split_k_qkv_taken,
                                   lengths_before_wait=pdl and runner.attention_options["lengths_before_wait"])  # fmt: skip
                if name not in logits:  # the same K/V and tokens: the settings' logits against the default's
                    logits[name] = eager_step().float()
                graph_step()  # captures
                times[name].append(timed(graph_step) * 1e3)
        median = {name: statistics.median(t) for name, t in times.items()}
        diff = {name: float((v - logits["default"]).abs().max()) for name, v in logits.items()}
        out["settings_ab"] = dict(batch=batch, context=context, rounds=rounds, us=times, median_us=median,
                                  taken=taken, max_abs_logit_diff_vs_default=diff,
                                  x_default={name: median[name] / median["default"] for name in median})  # fmt: skip
        for name, t in times.items():
            say(f"  one runner, alternating rounds: {name}: median {median[name]:.0f} us "
                f"({median[name] / median['default']:.3f}x the default; rounds {', '.join(f'{v:.0f}' for v in t)}; "
                f"logits max |diff| {diff[name]:.3g} against the default's)")
    finally:
        runner.close()
        free_memory(geo.device)


def measure_runner_step(model, geo: "Geometry", batch, context, record, timed, out, options: dict,
                        floor_ms: float | None = None) -> None:
    """The paged runner's one-position step at `context` cached positions per row: graph and eager rows.
    `options`: PagedRunner arguments of this variant ({}: the runner's defaults, which the target is about);
    `floor_ms`: the floor of this batch (None: the section's batch)."""
    from engine.model.paged.runner import PagedRunner

    default = not options and batch == geo.batch
    default_variant = not options  # the runner's defaults, at any batch: the other variants' logits are against it
    runner = PagedRunner(model, **{"block_size": geo.block_size, "max_model_len": max(4096, 2 * context), **options})
    runner.refresh_merged_projections()  # what generate does first: decides the ops table and merges
    fused = runner.ops().name == "fused"
    merged = runner.merged is not None
    label = "paged runner step" + (
        ", decode fusions" + (" + merged projections" if merged else "") + (" + padded lm_head" if runner.head else "")
        + (" + split-K o/down" if runner.ops().split_k is not None else "")
        + (" + split-K q/k/v summed in the attention" if runner.split_k_qkv_taken else "")
        if fused
        else ", transformers modules"
    )
    if "attention_options" in options:
        label += f", block_size={runner.block_size} attention {options['attention_options']}"
    if batch != geo.batch:
        label += f", batch {batch}"
    try:
        graph_step, eager_step, buf = _step_functions(runner, geo, batch, context)

        runner.refresh_merged_projections()  # as generate does (the pool was rebuilt since)
        graph_step()  # captures
        row = record(f"{label}, CUDA graph (copy inputs + replay)", timed(graph_step), floor_ms, mode="graph",
                     fused=fused, merged=merged, batch=batch)
        if default:  # the runner's default is what the target is about
            out["paged_within_target"] = row["x_floor"] <= 1.5
        if True in buf.graphs:
            graph, _ = buf.graphs[True]
            record(f"{label}, graph replay only", timed(graph.replay), floor_ms, mode="graph", fused=fused,
                   merged=merged, batch=batch)

        record(f"{label}, eager", timed(eager_step), floor_ms, mode="eager", fused=fused, merged=merged, batch=batch)
        # the captured step computes what the eager step does; every variant what the default computes (up to
        # the rounding of another summation order), the step's logits compared against the default's
        logits = eager_step().float()
        row["max_abs_diff_vs_eager"] = float((graph_step().float() - logits).abs().max())
        key = (geo.model_spec, batch, context, runner.block_size)  # another page size places the K/V elsewhere
        if default_variant:
            _DEFAULT_STEP_LOGITS[key] = logits
        elif key in _DEFAULT_STEP_LOGITS and _DEFAULT_STEP_LOGITS[key].shape == logits.shape:
            reference = _DEFAULT_STEP_LOGITS[key]
            row["max_abs_diff_vs_default"] = float((logits - reference).abs().max())
            row["logits_scale"] = float(reference.abs().max())
            say(f"  logits against the default variant: max |diff| {row['max_abs_diff_vs_default']:.3g} "
                f"(largest |logit| {row['logits_scale']:.3g})")
        if default:
            out["kernel_breakdown"] = kernel_breakdown(eager_step, geo)
    except Exception as e:
        out["rows"].append(error_row(label, e))
    finally:
        runner.close()
        free_memory(geo.device)


def measure_lm_head(model, geo: "Geometry", record, timed, out, bandwidth: float) -> None:
    """The vocabulary projection alone at each step batch: the module, and the runner's copy padded to an aligned
    vocabulary (`fused_ops.PaddedVocabProjection`, when the vocabulary needs it), against its weight's floor."""
    from engine.model.fused_ops import PaddedVocabProjection, padded_head_unsupported

    head = model.base.lm_head
    weight_bytes = head.weight.numel() * head.weight.element_size()
    # a weight that fits in cache has no memory floor (the CPU dry run, a tiny model on a GPU): nothing to compare
    if not geo.cuda or weight_bytes < 4 * torch.cuda.get_device_properties(geo.device).L2_cache_size:
        return
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    padded = PaddedVocabProjection(head) if padded_head_unsupported(head) is None else None
    try:
        for batch in sorted({*geo.step_batches, geo.batch}):
            hidden = torch.randn(batch, head.weight.shape[1], device=geo.device, dtype=geo.dtype)
            with torch.no_grad():
                want = head(hidden)
                record(f"lm_head alone ({head.weight.shape[0]} rows), batch {batch}", timed(lambda: head(hidden)),
                       floor_ms, mode="lm_head", batch=batch)
                if padded is not None:
                    row = record(f"lm_head alone, padded to {padded.weight.shape[0]} rows, batch {batch}",
                                 timed(lambda: padded(hidden)), floor_ms, mode="lm_head", batch=batch)
                    row["max_abs_diff_vs_module"] = float((padded(hidden).float() - want.float()).abs().max())
    except Exception as e:
        out["rows"].append(error_row("lm_head alone", e))
    finally:
        del padded
        free_memory(geo.device)


KERNEL_KINDS = (  # (kind, substrings of kernel names), first match wins
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "addmm", "matmul", "::mm", "bmm")),
    ("paged attention", ("_paged_decode",)),
    ("paged K/V write", ("_paged_kv_write",)),
    ("norm", ("rms", "norm", "rsqrt", "pow_")),
    ("rotary", ("rotary",)),
    ("SwiGLU product", ("silu",)),
    ("elementwise and copies", ("elementwise", "copy", "cat", "mul", "add", "neg", "silu", "index", "gather")),
)


def kernel_breakdown(step, geo: "Geometry", steps: int = 3) -> dict:
    """Where a step's device time goes: torch.profiler over `steps` eager steps, device time per kernel name and
    per kind (matmul, paged attention, ...), per step. In a CUDA graph the same kernels run without the launch
    gaps, so the sum is what the graph replay cannot go below."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if geo.cuda else [])
    step()
    if geo.cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if geo.cuda:
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0.0) if geo.cuda else event.self_cpu_time_total
        if us <= 0 or (not geo.cuda and not event.key.startswith("aten::")):
            continue
        rows.append(dict(name=event.key[:90], us_per_step=us / steps, calls_per_step=event.count / steps))
    total = sum(r["us_per_step"] for r in rows) or 1.0
    kinds: dict[str, float] = {}
    for r in rows:
        r["pct"] = 100 * r["us_per_step"] / total
        low = r["name"].lower()
        kind = next((k for k, needles in KERNEL_KINDS if any(n in low for n in needles)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + r["us_per_step"]
    rows.sort(key=lambda r: -r["us_per_step"])
    return dict(device=geo.cuda, total_us_per_step=total, launches_per_step=sum(r["calls_per_step"] for r in rows),
                by_kind=[dict(kind=k, us_per_step=v, pct=100 * v / total) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])],
                top=rows[:15])


@torch.no_grad()
def section_decode_step(report: dict, geo: Geometry, bandwidth: float, repeats: int, new_tokens: int) -> None:
    """A whole decode step of the language model: the paged runner (CUDA graph) vs transformers' DynamicCache."""
    from transformers import DynamicCache

    from engine import load_model
    from engine.model.compat import cache_kwargs
    from engine.model.paged.runner import PagedRunner

    say(f"loading {geo.model_spec} ({geo.dtype}) on {geo.device}")
    model, tok, _ = load_model(geo.model_spec, dtype=geo.dtype, device=geo.device)
    model.eval()
    lm = model.language_model
    embed = model.base.get_input_embeddings()
    cfg = lm.config
    layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    batch, context = geo.batch, geo.context
    element = torch.tensor([], dtype=geo.dtype).element_size()
    kv_bytes = layers * batch * context * kv_heads * head_dim * 2 * element
    weight_bytes = module_bytes(lm, skip=(embed,)) + model.base.lm_head.weight.numel() * element
    floor_ms = (weight_bytes + kv_bytes) / (bandwidth * 1e9) * 1e3
    out = dict(batch=batch, context=context, weight_bytes=weight_bytes, kv_bytes=kv_bytes, floor_us=floor_ms * 1e3,
               target_x_floor=1.5, rows=[])
    report["decode_step"] = out
    say(f"decode step floor: weights {weight_bytes / 1e9:.3f} GB + K/V {kv_bytes / 1e9:.3f} GB "
        f"= {floor_ms * 1e3:.0f} us")

    def timed(fn) -> float:
        return time_fn(fn, geo.device, warmup=geo.warmup, repeats=repeats).median_ms

    def record(name, timing_ms, workload_floor_ms=None, **extra):
        """One row; ``workload_floor_ms``: the floor of the workload this row timed (default: `batch` rows of
        `context` positions). A time below its floor is physically impossible: the row becomes an error."""
        floor = floor_ms if workload_floor_ms is None else workload_floor_ms
        row = dict(name=name, median_us=timing_ms * 1e3, floor_us=floor * 1e3, x_floor=timing_ms / floor, **extra)
        out["rows"].append(row)
        say(f"  {name}: {timing_ms * 1e3:.0f} us/step = {row['x_floor']:.2f}x the floor")
        if row["x_floor"] < 1.0:
            row["error"] = (f"{row['x_floor']:.2f}x its floor ({floor * 1e3:.0f} us): below the physical floor, so the "
                            "timing or the floor's workload is wrong")
            report["errors"][name] = row["error"]
        return row

    def workload_floor_ms(lengths: list[int], steps: int) -> float:
        """Floor of one decode step averaged over `steps` steps of rows that start at `lengths` positions: the
        weights once per step, and each row's K/V up to its position at that step."""
        per_token = layers * kv_heads * head_dim * 2 * element
        mean_positions = sum(n + 1 + s for n in lengths for s in range(steps)) / max(1, steps)
        return (weight_bytes + per_token * mean_positions) / (bandwidth * 1e9) * 1e3

    # -- the paged runner's one-position step, every row holding `context` positions (random K/V): the default
    #    (on CUDA: decode fusions, merged projections, split-K o/down products), the default without the split-K
    #    products, the fusions with separate projections, and the transformers modules, for the difference each
    #    makes (on the CPU dry run the default is the modules); `measure_step_settings` compares settings in one
    #    runner, which is what to trust for differences of a few percent
    variants = [{}, {"split_k_products": False}, {"merged_projections": False}, {"fused_ops": False}] if geo.cuda else [{}]
    attention = report.get("decode_attention") or {}
    best = attention.get("best_any_page_size")
    if best and best is not attention.get("default"):  # the step with the attention sweep's fastest settings
        keys = ("block_n", "num_warps", "num_stages", "dot_in_cache_dtype", "programmatic_launch",
                "lengths_before_wait")
        variants.append(dict(block_size=best.get("block_size", geo.block_size), num_splits=best.get("num_splits"),
                             attention_options={k: best[k] for k in keys if best.get(k) is not None}))
    try:  # first, while nothing else has run long on the device
        measure_step_settings(model, geo, batch, context, timed, out, rounds=5 if geo.cuda else 2)
    except Exception as e:  # noqa: BLE001
        out["rows"].append(error_row("one runner, alternating settings", e))
    for options in variants:
        measure_runner_step(model, geo, batch, context, record, timed, out, options)
    measure_lm_head(model, geo, record, timed, out, bandwidth)
    for small in geo.step_batches:  # the default step at smaller batches, each against its own floor
        if small != batch:
            measure_runner_step(model, geo, small, context, record, timed, out, {}, workload_floor_ms([context] * small, 1))

    # -- transformers' eager DynamicCache step at the same context (it grows by one position per call)
    try:
        dyn = DynamicCache(config=cfg)
        for layer in range(layers):
            k = torch.randn(batch, kv_heads, context, head_dim, device=geo.device, dtype=geo.dtype)
            dyn.update(k, torch.randn_like(k), layer)
        tokens = torch.randint(10, 400, (batch, 1), device=geo.device)

        def dynamic_step():
            length = dyn.get_seq_length()  # a host int: no sync
            mask = torch.ones(batch, length + 1, dtype=torch.long, device=geo.device)
            pos = torch.full((batch, 1), length, dtype=torch.long, device=geo.device)
            hidden = lm(inputs_embeds=embed(tokens), attention_mask=mask, position_ids=pos, use_cache=True,
                        **cache_kwargs(lm, dyn)).last_hidden_state
            return model.base.lm_head(hidden[:, -1])

        record("transformers DynamicCache step, eager", timed(dynamic_step), mode="eager")
        del dyn
    except Exception as e:
        out["rows"].append(error_row("DynamicCache step", e))
    free_memory(geo.device)

    # -- whole generate() calls: per-step time = (t(1 + N new tokens) - t(1)) / N, host work included
    ids, mask, pixels = geometry_prompts(model, tok, geo, batch=batch, context=context - new_tokens // 2, n_latents=6)
    lengths = mask.sum(1).tolist()
    for kv_cache in ("paged", "dynamic"):
        # a paged runner held across calls, as evaluation holds one: its pool and graphs are built once
        runner = PagedRunner(model, block_size=geo.block_size, max_model_len=4096) if kv_cache == "paged" else None
        try:
            def call(n, runner=runner):
                if runner is not None:
                    return lambda: runner.generate(ids, mask, pixels, max_new_tokens=n, eos_token_id=-1)
                return lambda: model.generate(ids, mask, pixels, max_new_tokens=n, eos_token_id=-1)

            call(3)()  # compiles and captures
            name = f"generate(kv_cache={kv_cache!r}): per decode step"
            if runner is not None:  # the decoding steps timed inside generate (device events), the prompt excluded
                runner.time_decode = True
                per_step = []
                for _ in range(min(3, repeats)):
                    tokens = call(1 + new_tokens)()
                    if tokens.shape[1] != 1 + new_tokens:
                        raise RuntimeError(f"generate stopped after {tokens.shape[1]} of {1 + new_tokens} tokens")
                    per_step.append(runner.stats["decode_ms"] / runner.stats["decode_steps"])
                record(name, sorted(per_step)[len(per_step) // 2], workload_floor_ms(lengths, new_tokens),
                       mode="generate", decode_steps=runner.stats["decode_steps"])
            else:  # (t(1 + N new tokens) - t(1)) / N, host work included: the median over back-to-back pairs (a
                # difference of two separately timed medians went negative under a loaded CPU), N at least 8
                steps = max(new_tokens, 8)
                call(1 + steps)()
                pairs = []
                for _ in range(max(3, min(5, repeats))):
                    one = time_fn(call(1), geo.device, warmup=0, repeats=1).median_ms
                    many = time_fn(call(1 + steps), geo.device, warmup=0, repeats=1).median_ms
                    pairs.append((one, (many - one) / steps))
                pairs.sort(key=lambda pair: pair[1])
                one, per_step = pairs[len(pairs) // 2]
                record(name, per_step, workload_floor_ms(lengths, steps), mode="generate",
                       prompt_and_first_token_ms=one, per_step_pairs_ms=[p for _, p in pairs])
        except Exception as e:
            out["rows"].append(error_row(f"generate(kv_cache={kv_cache!r})", e))
        if runner is not None:
            runner.close()
        free_memory(geo.device)

    # -- agreement of the two caches (random weights give near-flat logits: in bf16 a few flips are expected)
    try:
        small = geometry_prompts(model, tok, geo, batch=geo.small_batch, context=geo.small_context, n_latents=4, seed=3)
        a = model.generate(*small, max_new_tokens=16, eos_token_id=-1, kv_cache="paged")
        b = model.generate(*small, max_new_tokens=16, eos_token_id=-1, kv_cache="dynamic")
        out["agreement"] = dict(
            first_token=(a[:, 0] == b[:, 0]).float().mean().item(),
            all_tokens=(a == b).float().mean().item(),
            rows=geo.small_batch,
            new_tokens=16,
        )
        say(f"  paged vs dynamic greedy tokens: {out['agreement']}")
    except Exception as e:
        out["agreement"] = error_row("agreement", e)

    # -- prefix sharing: `images` images x `batch // images` questions each
    try:
        questions = max(1, batch // geo.images)
        shared = geometry_prompts(model, tok, geo, batch=batch, context=geo.sharing_context, n_latents=4,
                                  images=geo.images, questions=questions, seed=4)
        # both runners alive, timed in alternating rounds (one call each per round, the order reversed every other
        # round): one call after the other per setting measured 0.52x and 0.79x for the same code on an H200
        runners = {name: PagedRunner(model, block_size=geo.block_size, enable_prefix_sharing=name == "on",
                                     max_model_len=4096) for name in ("off", "on")}  # fmt: skip
        calls = {name: (lambda r=r: r.generate(*shared, max_new_tokens=1, eos_token_id=-1)) for name, r in runners.items()}
        for fn in calls.values():
            fn()
        rounds = {name: [] for name in calls}
        for index in range(max(5, min(repeats, 9))):
            for name in (("off", "on") if index % 2 == 0 else ("on", "off")):
                rounds[name].append(time_fn(calls[name], geo.device, warmup=0, repeats=1).median_ms)
        stats = {name: dict(runners[name].stats, prompt_ms=statistics.median(rounds[name]), rounds_ms=rounds[name])
                 for name in runners}  # fmt: skip
        for r in runners.values():
            r.close()
        free_memory(geo.device)
        out["sharing"] = dict(rows=batch, images=geo.images, questions_per_image=questions, **stats,
                              x_unshared=stats["on"]["prompt_ms"] / stats["off"]["prompt_ms"])  # fmt: skip
        off, on = stats["off"], stats["on"]
        say(f"  sharing off -> on: blocks {off['blocks_after_prompt']} -> {on['blocks_after_prompt']}, "
            f"prompt {off['prompt_ms']:.1f} -> {on['prompt_ms']:.1f} ms ({out['sharing']['x_unshared']:.2f}x; "
            f"medians of {len(rounds['on'])} alternating rounds: off {', '.join(f'{v:.0f}' for v in rounds['off'])}; "
            f"on {', '.join(f'{v:.0f}' for v in rounds['on'])})")
    except Exception as e:
        out["sharing"] = error_row("sharing", e)
    del model
    free_memory(geo.device)


def render(report: dict) -> str:
    parts = []
    if "numerics" in report:
        parts.append("## 1. Numerics (kernels vs PyTorch references)\n\n" + markdown_table(
            report["numerics"], [("check", "check"), ("max_abs_err", "max abs err"), ("tol", "tol"), ("ok", "ok")]))
    da = report.get("decode_attention")
    if isinstance(da, dict):
        verdict = lambda key: {True: "met", False: "NOT met"}.get(da.get(key), "not measured")  # noqa: E731
        parts.append(
            f"## 2. Paged decode attention: {da['layers']} layers, batch {da['batch']}, {da['context']} tokens "
            f"({da['visual_tokens']} visual), {da['q_heads']}/{da['kv_heads']} heads, head_dim {da['head_dim']}, "
            f"block size {da['block_size']}\n\n"
            f"Floor: {da['kv_bytes'] / 1e9:.3f} GB of K/V / copy bandwidth = {da['floor_us']:.0f} us. Target >= "
            f"{da['target_pct_of_floor']}% of the floor in a CUDA graph: best config {verdict('meets_target_best')}, "
            f"the runner's default config {verdict('meets_target_default')}"
            + (f"; best over page sizes: {da['best_any_page_size']['name']} at "
               f"{da['best_any_page_size']['pct_of_floor']:.0f}%" if da.get("best_any_page_size") else "")
            + ".\n\n"
            + (f"Where the time goes (the default over {len(da['context_fit']['contexts'])} context lengths, a straight line): "
               f"{da['context_fit']['fixed_us_per_layer']:.2f} us per layer whatever the context (launch, the first "
               f"loads' latency, the split merge), the rest streamed at {da['context_fit']['streaming_gbs']:.0f} GB/s "
               f"= {da['context_fit']['streaming_pct_of_copy']:.0f}% of the copy rate.\n\n" if da.get("context_fit")
               else "")
            + markdown_table(da["rows"], [("name", "variant"), ("median_us", "median us"), ("p10_us", "p10"),
                                          ("p90_us", "p90"), ("pct_of_floor", "% of floor"), ("error", "error")]))
    ds = report.get("decode_step")
    if isinstance(ds, dict):
        met = {True: " (met)", False: " (NOT met)"}.get(ds.get("paged_within_target"), "")
        text = (f"## 3. Whole decode step of the language model, batch {ds['batch']}, {ds['context']} tokens\n\n"
                f"Floor: weights + lm_head {ds['weight_bytes'] / 1e9:.3f} GB + K/V {ds['kv_bytes'] / 1e9:.3f} GB / "
                f"copy bandwidth = {ds['floor_us']:.0f} us. Target: the paged step in a CUDA graph within "
                f"{ds['target_x_floor']}x of the floor{met}.\n\n"
                + markdown_table(ds["rows"], [("name", "variant"), ("median_us", "us/step"), ("x_floor", "x floor"),
                                              ("max_abs_diff_vs_eager", "max abs diff, graph vs eager"),
                                              ("error", "error")]))
        kb = ds.get("kernel_breakdown")
        if kb:
            what = "device time per kernel" if kb["device"] else "CPU time per op (no GPU: the dry run)"
            text += (f"\n\nWhere the eager step's time goes ({what}): {kb['total_us_per_step']:.0f} us per step over "
                     f"{kb['launches_per_step']:.0f} launches.\n\n"
                     + markdown_table(kb["by_kind"], [("kind", "kind"), ("us_per_step", "us/step"), ("pct", "%")])
                     + "\n\n" + markdown_table(kb["top"], [("name", "kernel"), ("us_per_step", "us/step"),
                                                             ("calls_per_step", "calls/step"), ("pct", "%")]))
        for key, title in (("agreement", "Paged vs dynamic greedy tokens"), ("sharing", "Prefix sharing")):
            if key in ds:
                shown = {k: v for k, v in ds[key].items() if k != "trace"}
                text += f"\n\n{title}: `{shown}`"
        parts.append(text)
    if report.get("errors"):
        parts.append("## Failed sections\n\n" + "\n".join(
            f"- {k}: {v.strip().splitlines()[-1]}" for k, v in report["errors"].items()))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Paged KV cache GPU report (see the module docstring).")
    parser.add_argument("--out", type=output_dir, required=True, help="directory for bench_paged_kv.json and bench_paged_kv.md")
    parser.add_argument("--sections", type=choice_list("numerics", "attention", "step"), default="numerics,attention,step",
                        help="comma list of numerics,attention,step")  # fmt: skip
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed through generate()")
    parser.add_argument("--smoke", action="store_true", help="a CPU dry run of every path at tiny sizes")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="1b",
                        help="the language model's layers and heads (InternVL3-1B, -2B or -8B; default 1b)")
    args = parser.parse_args(argv)
    if args.smoke and args.geometry != "1b":
        parser.error("--smoke runs its own tiny geometry; leave --geometry out")
    geo = Geometry.smoke() if args.smoke else Geometry(**GEOMETRIES[args.geometry])
    if geo.cuda and not torch.cuda.is_available():
        print("the GPU report needs CUDA (--smoke runs a tiny CPU dry run)", file=sys.stderr)
        return 2
    repeats, new_tokens = (1, 2) if args.smoke else (args.repeats, args.new_tokens)
    sections = set(args.sections)
    bandwidth = copy_bandwidth_gbs(geo.device)
    report = dict(environment=environment_info(geo.device), command=command_line(), copy_bandwidth_gbs=bandwidth,
                  smoke=args.smoke, errors={})
    say(f"copy bandwidth {bandwidth:.0f} GB/s on {report['environment'].get('device')}")

    def save():
        return write_results(args.out, RESULT_NAME, report, render(report), header="# Paged KV cache")

    plan = [("numerics", lambda: section_numerics(report, geo)),
            ("attention", lambda: section_decode_attention(report, geo, bandwidth, repeats)),
            ("step", lambda: section_decode_step(report, geo, bandwidth, repeats, new_tokens))]
    for name, run in plan:
        if name not in sections:
            continue
        start = time.time()
        say(f"section {name} ...")
        try:
            run()
        except Exception as e:  # recorded; the next section still runs
            report["errors"][name] = traceback.format_exc()
            say(f"section {name} FAILED{' (out of memory)' if is_oom(e) else ''}: {type(e).__name__}: {e}")
            free_memory(geo.device)
        say(f"section {name} done in {time.time() - start:.0f} s")
        save()
    paths = save()
    say(f"wrote {paths['json']} and {paths['md']}")
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    from benchmarks.common import run_harness
    raise SystemExit(run_harness(main))
