"""Fused input construction (`kernels/latent_inject.py`): a pytest-benchmark suite and a GPU report.

Suite (marked ``benchmark``): the fused op against the HF-style PyTorch path (embedding lookup + masked_scatter of
the image features + torch.where of the thoughts) and against `latent_inject_reference`. Tiny CPU cases run under
the Triton interpreter; GPU cases (batch 64 x 1024 positions x hidden 896, bf16, vocab 151674, 256 image tokens
per row) are skipped without CUDA. Each case checks its result before timing and records GB/s (bytes read +
written per second) beside the measured copy bandwidth in ``benchmark.extra_info``.

    pytest benchmarks/bench_latent_inject.py -m benchmark                          # timed
    pytest benchmarks/bench_latent_inject.py -m benchmark --benchmark-disable -q   # once each, untimed (CI)

GPU report (one shot; every section guarded: a failure is recorded and the next section still runs):

    python -m benchmarks.bench_latent_inject --out DIR            # on a GPU
    python -m benchmarks.bench_latent_inject --out DIR --smoke    # a tiny CPU dry run of every path

1. numerics: bf16 and fp32, fused vs reference, bit for bit, on every kind of chunk (prefix pass, one-column
   latent pass, final pass, a full pass with all three sources, strided ids), plus the backward (gradients of
   the embedding table, the image features and the thoughts) against autograd of the reference;
2. bandwidth: the fused op on a full pass at several shapes (target: >= 85 % of the copy bandwidth at
   64 x 1024 x 896 bf16) against the HF-style path and the gather reference, then a sweep of block sizes and
   warps at the target shape (the best config is reported beside the default one);
3. schedule: building the inputs of every pass of a batch with 6 latents (prefix, 5 one-column passes, final):
   fused (one kernel per pass) against the PyTorch path of `MultimodalCoconut.run_passes` (embedding +
   masked_scatter once, torch.where + cat per latent pass), forward and forward + backward.

Times are medians of back-to-back calls (CUDA events around ``--inner`` calls, divided), so Python dispatch
overhead is hidden behind the previous kernel as it is in a training step. Writes ``DIR/bench_latent_inject.json``
and ``DIR/bench_latent_inject.md``; exits 1 when a section failed or a numerics check did not hold.
"""

from __future__ import annotations

import argparse
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
    time_fn,
    write_results,
)
from kernels.latent_inject import (  # noqa: E402
    default_config,
    image_index_from_ids,
    latent_inject,
    latent_inject_forward,
    latent_inject_reference,
)

RESULT_NAME = "bench_latent_inject"
# InternVL3-1B: Qwen2.5-0.5B hidden size and vocabulary, one 448 px tile = 256 image tokens per row.
VOCAB, HIDDEN, BATCH, SEQ, IMAGE_TOKENS, LATENTS = 151674, 896, 64, 1024, 256, 6
TARGET_PCT_OF_COPY = 85.0
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------------------- cases


class InjectCase:
    """One batch: per row ``<img> <IMG_CONTEXT>*image_tokens </img>`` then text with `latents` consecutive latent
    positions starting at column `first_latent`, random ordinary ids elsewhere; an embedding table, the image
    features (row order), one thought per row; `image_index` precomputed as the model does once per batch."""

    def __init__(self, *, batch, seq_len, hidden, vocab, image_tokens, latents, dtype, device, seed=0):
        if image_tokens + 2 + latents + 1 > seq_len:
            raise ValueError(f"seq_len {seq_len} too short for {image_tokens} image tokens and {latents} latents")
        g = torch.Generator().manual_seed(seed)
        self.image_token, img_start, img_end = vocab - 3, vocab - 2, vocab - 1
        ids = torch.randint(0, vocab - 3, (batch, seq_len), generator=g)
        ids[:, 0], ids[:, image_tokens + 1] = img_start, img_end
        ids[:, 1 : image_tokens + 1] = self.image_token
        text = seq_len - (image_tokens + 2)
        self.first_latent = image_tokens + 2 + max(0, (text - latents) // 2)
        mask = torch.zeros(batch, seq_len, dtype=torch.bool)
        mask[:, self.first_latent : self.first_latent + latents] = True
        self.input_ids = ids.to(device)
        self.latent_mask = mask.to(device)
        self.image_index = image_index_from_ids(self.input_ids, self.image_token)
        self.embed_weight = torch.randn(vocab, hidden, generator=g).to(device=device, dtype=dtype)
        self.image_features = torch.randn(batch * image_tokens, hidden, generator=g).to(device=device, dtype=dtype)
        self.latent_hidden = torch.randn(batch, hidden, generator=g).to(device=device, dtype=dtype)
        self.batch, self.seq_len, self.hidden, self.latents, self.dtype = batch, seq_len, hidden, latents, dtype
        self.device = torch.device(device)

    # --- the op and its references
    def sources(self, with_latent=True) -> dict:
        d = dict(image_index=self.image_index, image_features=self.image_features)
        if with_latent:
            d.update(latent_mask=self.latent_mask, latent_hidden=self.latent_hidden)
        return d

    def fused(self, start=0, end=None, *, with_latent=True, **config):
        end = self.seq_len if end is None else end
        if config:  # a launch with explicit block sizes (the sweep): same kernel, no autograd wrapper
            return latent_inject_forward(self.input_ids, self.embed_weight, start, end,
                                         *self.sources(with_latent).values(), **config)  # fmt: skip
        return latent_inject(self.input_ids, self.embed_weight, start, end, **self.sources(with_latent))

    def reference(self, start=0, end=None, *, with_latent=True):
        end = self.seq_len if end is None else end
        return latent_inject_reference(self.input_ids, self.embed_weight, start, end, **self.sources(with_latent))

    def hf_style(self, *, with_latent=True):
        """What transformers' InternVL does (embedding + masked_scatter), then the thoughts by torch.where."""
        embeds = torch.nn.functional.embedding(self.input_ids, self.embed_weight)
        image_mask = (self.input_ids == self.image_token).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, self.image_features)
        if with_latent:
            embeds = torch.where(self.latent_mask[..., None], self.latent_hidden[:, None, :], embeds)
        return embeds

    # --- the passes of the model's schedule
    def chunks(self) -> list[tuple[int, int]]:
        starts = [0, *range(self.first_latent, self.first_latent + self.latents)]
        return list(zip(starts, starts[1:] + [self.seq_len]))

    def schedule_fused(self, thought=None):
        thought = self.latent_hidden if thought is None else thought
        outs = []
        for i, (start, end) in enumerate(self.chunks()):
            latent = dict(latent_mask=self.latent_mask, latent_hidden=thought) if i else {}
            outs.append(latent_inject(self.input_ids, self.embed_weight, start, end, image_index=self.image_index,
                                      image_features=self.image_features, **latent))  # fmt: skip
        return outs

    def schedule_reference(self, thought=None):
        """`MultimodalCoconut.run_passes`'s PyTorch path (one thought per row stands in for each pass's)."""
        thought = self.latent_hidden if thought is None else thought
        embeds = self.hf_style(with_latent=False)
        outs = []
        for i, (start, end) in enumerate(self.chunks()):
            if i == 0:
                outs.append(embeds[:, start:end])
            else:
                first = torch.where(self.latent_mask[:, start, None], thought, embeds[:, start])
                outs.append(torch.cat([first.unsqueeze(1), embeds[:, start + 1 : end]], dim=1))
        return outs

    # --- bytes
    def bytes_moved(self, start=0, end=None, *, with_latent=True) -> int:
        """Read + written by one call: every output row read once from its source and written once, plus the
        per-position ids, image index and latent flag."""
        end = self.seq_len if end is None else end
        positions = self.batch * (end - start)
        per_position = 2 * self.hidden * self.embed_weight.element_size()
        per_position += self.input_ids.element_size() + self.image_index.element_size() + (1 if with_latent else 0)
        return positions * per_position


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(torch.equal(a.contiguous().view(bits), b.contiguous().view(bits)))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def per_call_ms(fn, device, *, inner: int, warmup: int, repeats: int):
    """Median (p10, p90) ms per call of `fn` run `inner` times back to back (launch overhead overlapped)."""

    def loop():
        for _ in range(inner):
            fn()

    timing = time_fn(loop, device, warmup=warmup, repeats=repeats)
    return timing.median_ms / inner, timing.p10_ms / inner, timing.p90_ms / inner


# ------------------------------------------------------------------------------------------------- pytest suite

CPU_CASE = dict(batch=2, seq_len=24, hidden=40, vocab=97, image_tokens=8, latents=3)
GPU_CASES = {
    f"{b}x{SEQ}x{HIDDEN}": dict(batch=b, seq_len=SEQ, hidden=HIDDEN, vocab=VOCAB, image_tokens=IMAGE_TOKENS,
                                latents=LATENTS)
    for b in (BATCH, 8)
}
IMPLS = ["fused", "hf_style", "reference"]


def _bench(benchmark, case: InjectCase, impl: str, copy_bandwidth: float, *, inner: int, repeats: int):
    fn = {"fused": case.fused, "hf_style": case.hf_style, "reference": case.reference}[impl]
    expected = case.reference()
    assert same_bits(fn(), expected), f"{impl} differs from latent_inject_reference"
    ms, _, _ = per_call_ms(fn, case.device, inner=inner, warmup=1, repeats=repeats)
    gbs = case.bytes_moved() / (ms * 1e-3) / 1e9
    benchmark.extra_info.update(impl=impl, shape=f"{case.batch}x{case.seq_len}x{case.hidden}", dtype=str(case.dtype),
                                bytes=case.bytes_moved(), ms_per_call=ms, gbs=gbs, copy_gbs=copy_bandwidth,
                                pct_of_copy=100 * gbs / copy_bandwidth)  # fmt: skip

    def run():
        out = fn()
        sync(case.device)
        return out

    benchmark(run)


@pytest.mark.benchmark
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_full_pass_cpu_tiny(benchmark, copy_bandwidth, impl, dtype):
    case = InjectCase(**CPU_CASE, dtype=dtype, device="cpu")
    _bench(benchmark, case, impl, copy_bandwidth, inner=1, repeats=2)


@pytest.mark.benchmark
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_schedule_cpu_tiny(benchmark, impl):
    case = InjectCase(**CPU_CASE, dtype=torch.bfloat16, device="cpu")
    fused, ref = case.schedule_fused(), case.schedule_reference()
    assert all(same_bits(a, b) for a, b in zip(fused, ref)) and len(fused) == len(ref) == case.latents + 1
    benchmark(case.schedule_fused if impl == "fused" else case.schedule_reference)


@pytest.mark.benchmark
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", list(GPU_CASES))
def test_full_pass_gpu(benchmark, copy_bandwidth, shape, impl):
    case = InjectCase(**GPU_CASES[shape], dtype=torch.bfloat16, device="cuda")
    _bench(benchmark, case, impl, copy_bandwidth, inner=10, repeats=20)


@pytest.mark.benchmark
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_latent_pass_gpu(benchmark, impl):
    """A one-column latent pass at batch 64: launch-bound; what each of the k latent passes costs."""
    case = InjectCase(**GPU_CASES["64x1024x896"], dtype=torch.bfloat16, device="cuda")
    col = case.first_latent
    if impl == "fused":
        fn = lambda: case.fused(col, col + 1)  # noqa: E731
    else:
        embeds = case.hf_style(with_latent=False)
        fn = lambda: torch.cat(  # noqa: E731
            [torch.where(case.latent_mask[:, col, None], case.latent_hidden, embeds[:, col]).unsqueeze(1),
             embeds[:, col + 1 : col + 1]], dim=1)  # fmt: skip
    assert same_bits(fn(), case.reference(col, col + 1))
    benchmark(lambda: (fn(), torch.cuda.synchronize()))


# ------------------------------------------------------------------------------------------------- GPU report


@dataclass
class Geometry:
    """Sizes of a report run. The default is the target geometry; `smoke()` is a CPU dry run of every path."""

    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    batch: int = BATCH
    seq_len: int = SEQ
    hidden: int = HIDDEN
    vocab: int = VOCAB
    image_tokens: int = IMAGE_TOKENS
    latents: int = LATENTS
    shapes: tuple = ((64, 1024), (16, 1024), (64, 512), (64, 2048), (8, 1024))  # (batch, seq_len) at `hidden`
    hidden_sizes: tuple = (896, 769, 4096)  # extra widths at 16 x 1024
    numerics_shapes: tuple = ((64, 1024, 896), (3, 300, 769))
    sweep_block_r: tuple = (4, 8, 16, 32, 64)
    sweep_block_h: tuple = (64, 128, 256, 512, 1024)
    sweep_warps: tuple = (2, 4, 8)
    inner: int = 10

    @classmethod
    def smoke(cls) -> "Geometry":
        return cls(device="cpu", batch=2, seq_len=24, hidden=40, vocab=101, image_tokens=8, latents=3,
                   shapes=((2, 24),), hidden_sizes=(33,), numerics_shapes=((2, 24, 40), (1, 16, 33)),
                   sweep_block_r=(8, 64), sweep_block_h=(64,), sweep_warps=(4,), inner=1)  # fmt: skip

    def case(self, **kwargs) -> InjectCase:
        base = dict(batch=self.batch, seq_len=self.seq_len, hidden=self.hidden, vocab=self.vocab,
                    image_tokens=self.image_tokens, latents=self.latents, dtype=self.dtype,
                    device=self.device)  # fmt: skip
        return InjectCase(**{**base, **kwargs})


def say(message: str) -> None:
    print(f"[bench_latent_inject] {message}", flush=True)


def error_row(name: str, e: BaseException, **extra) -> dict:
    say(f"  {name}: FAILED {type(e).__name__}: {e}")
    return dict(name=name, error=f"{'out of memory: ' if is_oom(e) else ''}{type(e).__name__}: {e}", **extra)


def _grads(fn, case: InjectCase, start: int, end: int, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    leaves = {k: getattr(case, k).detach().clone().requires_grad_()
              for k in ("embed_weight", "image_features", "latent_hidden")}  # fmt: skip
    out = fn(case.input_ids, leaves["embed_weight"], start, end, image_index=case.image_index,
             image_features=leaves["image_features"], latent_mask=case.latent_mask,
             latent_hidden=leaves["latent_hidden"])  # fmt: skip
    out.backward(grad_out)
    return {k: v.grad for k, v in leaves.items()}


def section_numerics(report: dict, geo: Geometry) -> None:
    """Fused vs reference, bit for bit (a copy must be exact in every dtype), forward and backward."""
    rows = []
    report["numerics"] = {"rows": rows}
    for dtype in dict.fromkeys((geo.dtype, torch.bfloat16, torch.float32)):
        dname = str(dtype).replace("torch.", "")
        for batch, seq_len, hidden in geo.numerics_shapes:
            image_tokens = min(geo.image_tokens, seq_len // 4)
            case = geo.case(batch=batch, seq_len=seq_len, hidden=hidden, image_tokens=image_tokens, dtype=dtype,
                            latents=min(geo.latents, 3))  # fmt: skip
            c = case.first_latent
            checks = {"full pass, all sources": (0, seq_len, True), "prefix pass": (0, c, False),
                      "latent pass": (c, c + 1, True), "final pass": (c + 1, seq_len, True)}  # fmt: skip
            for what, (start, end, lat) in checks.items():
                ok = same_bits(case.fused(start, end, with_latent=lat), case.reference(start, end, with_latent=lat))
                rows.append(dict(check=f"{what} [{start},{end})", shape=f"{batch}x{seq_len}x{hidden}", dtype=dname,
                                 max_abs_err=None, ok=ok))  # fmt: skip
            wide = torch.zeros(batch, 2 * seq_len, dtype=case.input_ids.dtype, device=case.device)
            wide[:, ::2] = case.input_ids
            strided = latent_inject(wide[:, ::2], case.embed_weight, 0, seq_len, **case.sources())
            rows.append(dict(check="strided ids", shape=f"{batch}x{seq_len}x{hidden}", dtype=dname,
                             ok=same_bits(strided, case.reference())))  # fmt: skip
            for what, (start, end) in {"backward full": (0, seq_len), "backward latent": (c, c + 1)}.items():
                g = torch.randn(batch, end - start, hidden, device=case.device).to(dtype)
                fused = _grads(latent_inject, case, start, end, g)
                ref = _grads(latent_inject_reference, case, start, end, g)
                errs = {k: (fused[k].float() - ref[k].float()).abs().max().item() if fused[k].numel() else 0.0
                        for k in ref}  # fmt: skip
                scale = max(1.0, max(ref[k].float().abs().max().item() if ref[k].numel() else 0.0 for k in ref))
                tol = (1e-2 if dtype != torch.float32 else 1e-6) * scale  # fp32 accumulation order of repeated ids
                err = max(errs.values())
                detail = " ".join(f"{k}={v:.2g}" for k, v in errs.items())
                rows.append(dict(check=f"{what} [{start},{end}) {detail}", shape=f"{batch}x{seq_len}x{hidden}",
                                 dtype=dname, max_abs_err=err, ok=err <= tol))  # fmt: skip
            del case
            free_memory(geo.device)
    report["numerics"]["all_ok"] = all(r["ok"] for r in rows)
    say(f"  numerics: {sum(r['ok'] for r in rows)}/{len(rows)} checks hold")


def section_bandwidth(report: dict, geo: Geometry, bandwidth: float, repeats: int) -> None:
    rows, sweep = [], []
    sec = report["bandwidth"] = dict(rows=rows, sweep=sweep, target_pct_of_copy=TARGET_PCT_OF_COPY,
                                     target_shape=f"{geo.batch}x{geo.seq_len}x{geo.hidden}")  # fmt: skip
    shapes = [(b, t, geo.hidden) for b, t in geo.shapes]
    shapes += [(min(16, geo.batch), geo.seq_len, h) for h in geo.hidden_sizes]

    def record(name, case, ms, extra):
        gbs = case.bytes_moved() / (ms[0] * 1e-3) / 1e9
        row = dict(name=name, shape=f"{case.batch}x{case.seq_len}x{case.hidden}", median_us=ms[0] * 1e3,
                   p10_us=ms[1] * 1e3, p90_us=ms[2] * 1e3, gbs=gbs, pct_of_copy=100 * gbs / bandwidth,
                   **extra)  # fmt: skip
        say(f"  {name} {row['shape']}: {row['median_us']:.1f} us, {gbs:.0f} GB/s ({row['pct_of_copy']:.1f}% of copy)")
        return row

    for batch, seq_len, hidden in dict.fromkeys(shapes):
        try:
            case = geo.case(batch=batch, seq_len=seq_len, hidden=hidden)
            assert same_bits(case.fused(), case.reference()), "fused differs from the reference"
            timed = {}
            for name, fn in (("fused", case.fused), ("hf_style", case.hf_style), ("reference", case.reference)):
                timed[name] = per_call_ms(fn, geo.device, inner=geo.inner, warmup=10, repeats=repeats)  # clocks settle
            for name, ms in timed.items():
                extra = dict(speedup_of_fused=ms[0] / timed["fused"][0])
                if name == "fused":
                    extra["config"] = "default %s/%s/%s" % default_config(batch * seq_len, hidden, case.device)
                rows.append(record(name, case, ms, extra))
            del case
        except Exception as e:  # noqa: BLE001 - recorded; the next shape still runs
            rows.append(error_row("shape", e, shape=f"{batch}x{seq_len}x{hidden}"))
        free_memory(geo.device)

    target = next((r for r in rows if r.get("name") == "fused" and r["shape"] == sec["target_shape"]), None)
    if target is not None:
        sec["default_pct_of_copy"] = target["pct_of_copy"]
        sec["meets_target_default"] = target["pct_of_copy"] >= TARGET_PCT_OF_COPY

    case = geo.case()
    expected = case.reference()
    for block_r in geo.sweep_block_r:
        for block_h in geo.sweep_block_h:
            if not 256 <= block_r * block_h <= 32768:
                continue
            for warps in geo.sweep_warps:
                config = dict(block_r=block_r, block_h=block_h, num_warps=warps)
                name = f"{block_r}/{block_h}/{warps}"
                try:
                    assert same_bits(case.fused(**config), expected), f"config {name} differs from the reference"
                    ms = per_call_ms(lambda: case.fused(**config), geo.device, inner=geo.inner, warmup=2,
                                     repeats=repeats)
                    sweep.append(record("fused", case, ms, dict(config=name)))
                except Exception as e:  # noqa: BLE001
                    sweep.append(error_row("fused", e, config=name))
                    free_memory(geo.device)
    good = [r for r in sweep if "gbs" in r]
    if good:
        best = max(good, key=lambda r: r["gbs"])
        sec.update(best_config=best["config"], best_pct_of_copy=best["pct_of_copy"],
                   meets_target_best=best["pct_of_copy"] >= TARGET_PCT_OF_COPY)  # fmt: skip


def section_schedule(report: dict, geo: Geometry, bandwidth: float, repeats: int) -> None:
    """Inputs of every pass of one batch (prefix, latent passes, final), forward and forward + backward."""
    case = geo.case()
    rows = []
    report["schedule"] = dict(rows=rows, passes=len(case.chunks()), shape=f"{case.batch}x{case.seq_len}x{case.hidden}",
                              latents=case.latents)  # fmt: skip
    fused, ref = case.schedule_fused(), case.schedule_reference()
    report["schedule"]["ok"] = all(same_bits(a, b) for a, b in zip(fused, ref)) and len(fused) == len(ref)
    leaves = {k: getattr(case, k).detach().clone().requires_grad_()
              for k in ("embed_weight", "image_features", "latent_hidden")}  # fmt: skip

    def train(schedule):
        def step():
            saved = (case.embed_weight, case.image_features)
            case.embed_weight, case.image_features = leaves["embed_weight"], leaves["image_features"]
            try:
                outs = schedule(leaves["latent_hidden"])
            finally:
                case.embed_weight, case.image_features = saved
            torch.autograd.backward([o for o in outs if o.numel()], [torch.ones_like(o) for o in outs if o.numel()])
            for v in leaves.values():
                v.grad = None

        return step

    plan = [("fused forward", case.schedule_fused), ("reference forward", case.schedule_reference),
            ("fused forward+backward", train(case.schedule_fused)),
            ("reference forward+backward", train(case.schedule_reference))]  # fmt: skip
    timed = {}
    for name, fn in plan:
        try:
            timed[name] = per_call_ms(fn, geo.device, inner=max(1, geo.inner // 5), warmup=2, repeats=repeats)
            rows.append(dict(name=name, median_us=timed[name][0] * 1e3, p10_us=timed[name][1] * 1e3,
                             p90_us=timed[name][2] * 1e3))  # fmt: skip
            say(f"  schedule {name}: {timed[name][0] * 1e3:.1f} us")
        except Exception as e:  # noqa: BLE001
            rows.append(error_row(name, e))
            free_memory(geo.device)
    for kind in ("forward", "forward+backward"):
        f, r = timed.get(f"fused {kind}"), timed.get(f"reference {kind}")
        if f and r:
            report["schedule"][f"speedup_{kind}"] = r[0] / f[0]


def render(report: dict) -> str:
    parts = [f"Copy bandwidth: {report['copy_bandwidth_gbs']:.0f} GB/s (read + written)."]
    nu = report.get("numerics")
    if isinstance(nu, dict):
        parts.append(f"## 1. Numerics (fused vs reference; values must be bit-equal)\n\nall hold: "
                     f"{nu.get('all_ok')}\n\n"
                     + markdown_table(nu["rows"], [("check", "check"), ("shape", "BxTxH"), ("dtype", "dtype"),
                                                   ("max_abs_err", "max abs err"), ("ok", "ok")]))  # fmt: skip
    bw = report.get("bandwidth")
    if isinstance(bw, dict):
        verdict = lambda key: {True: "met", False: "NOT met"}.get(bw.get(key), "not measured")  # noqa: E731
        cols = [("name", "impl"), ("shape", "BxTxH"), ("config", "BLOCK_R/BLOCK_H/warps"), ("median_us", "us"),
                ("p10_us", "p10"), ("p90_us", "p90"), ("gbs", "GB/s"), ("pct_of_copy", "% of copy"),
                ("speedup_of_fused", "x fused time"), ("error", "error")]  # fmt: skip
        parts.append(
            f"## 2. Bandwidth of a full pass ({report['environment'].get('device')})\n\n"
            f"Target: fused >= {bw['target_pct_of_copy']:.0f}% of copy at {bw['target_shape']}: default config "
            f"{verdict('meets_target_default')} ({bw.get('default_pct_of_copy', float('nan')):.1f}%), best config "
            f"{bw.get('best_config')} {verdict('meets_target_best')} ({bw.get('best_pct_of_copy', float('nan')):.1f}%)."
            "\n\n" + markdown_table(bw["rows"], cols) + "\n\n### Config sweep at the target shape\n\n"
            + markdown_table(bw["sweep"], cols))  # fmt: skip
    sc = report.get("schedule")
    if isinstance(sc, dict):
        speed = ", ".join(f"{k.replace('speedup_', '')} {v:.2f}x" for k, v in sc.items() if k.startswith("speedup_"))
        parts.append(f"## 3. Inputs of every pass: {sc['shape']}, {sc['latents']} latents, {sc['passes']} passes\n\n"
                     f"Outputs equal: {sc.get('ok')}. Fused speedup: {speed or 'not measured'}.\n\n"
                     + markdown_table(sc["rows"], [("name", "what"), ("median_us", "us"), ("p10_us", "p10"),
                                                   ("p90_us", "p90"), ("error", "error")]))  # fmt: skip
    if report.get("errors"):
        parts.append("## Failed sections\n\n" + "\n".join(
            f"- {k}: {v.strip().splitlines()[-1]}" for k, v in report["errors"].items()))  # fmt: skip
    return "\n\n".join(parts)


def run_gpu_report(out_dir, *, smoke: bool = False, repeats: int = 30, sections=("numerics", "bandwidth", "schedule"),
                   inner: int | None = None, device: str | None = None) -> int:  # fmt: skip
    """Run the report into `out_dir`; 0 when every section ran and every numerics check held, else 1 (2: no GPU)."""
    geo = Geometry.smoke() if smoke else Geometry()
    if device is not None:
        geo.device = device
    if inner is not None and not smoke:
        geo.inner = inner
    if torch.device(geo.device).type == "cuda" and not torch.cuda.is_available():
        print("the GPU report needs CUDA (--smoke runs a tiny CPU dry run)", file=sys.stderr)
        return 2
    repeats = 2 if smoke else repeats
    bandwidth = copy_bandwidth_gbs(geo.device)
    report = dict(environment=environment_info(geo.device), command=command_line(), copy_bandwidth_gbs=bandwidth,
                  smoke=smoke, geometry=dict(batch=geo.batch, seq_len=geo.seq_len, hidden=geo.hidden,
                                             vocab=geo.vocab, image_tokens=geo.image_tokens, latents=geo.latents,
                                             dtype=str(geo.dtype), inner=geo.inner, repeats=repeats),
                  errors={})  # fmt: skip
    say(f"copy bandwidth {bandwidth:.0f} GB/s on {report['environment'].get('device')}")

    def save():
        return write_results(out_dir, RESULT_NAME, report, render(report), header="# Fused latent injection")

    plan = [("numerics", lambda: section_numerics(report, geo)),
            ("bandwidth", lambda: section_bandwidth(report, geo, bandwidth, repeats)),
            ("schedule", lambda: section_schedule(report, geo, bandwidth, repeats))]  # fmt: skip
    for name, run in plan:
        if name not in sections:
            continue
        start = time.time()
        say(f"section {name} ...")
        try:
            run()
        except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
            report["errors"][name] = traceback.format_exc()
            say(f"section {name} FAILED{' (out of memory)' if is_oom(e) else ''}: {type(e).__name__}: {e}")
            free_memory(geo.device)
        say(f"section {name} done in {time.time() - start:.0f} s")
        save()
    paths = save()
    say(f"wrote {paths['json']} and {paths['md']}")
    numerics_ok = report.get("numerics", {}).get("all_ok", True) and report.get("schedule", {}).get("ok", True)
    return 0 if not report["errors"] and numerics_ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fused latent injection GPU report (see the module docstring).")
    parser.add_argument("--out", type=output_dir, required=True, help="directory for bench_latent_inject.json and .md")
    parser.add_argument("--sections", type=choice_list("numerics", "bandwidth", "schedule"),
                        default="numerics,bandwidth,schedule", help="comma list of the sections")  # fmt: skip
    parser.add_argument("--repeats", type=positive_int, default=30, help="timed repetitions (median, p10, p90)")
    parser.add_argument("--inner", type=positive_int, default=10, help="back-to-back calls per timed repetition")
    parser.add_argument("--smoke", action="store_true", help="a CPU dry run of every path at tiny sizes")
    parser.add_argument("--device", default=None, help="with --smoke: run the tiny sizes on this device instead "
                        "(cuda: every kernel path at sizes compute-sanitizer's shadow memory can hold)")
    args = parser.parse_args(argv)
    return run_gpu_report(args.out, smoke=args.smoke, repeats=args.repeats, inner=args.inner,
                          sections=tuple(args.sections), device=args.device)  # fmt: skip


if __name__ == "__main__":
    from benchmarks.common import run_harness
    raise SystemExit(run_harness(main))
