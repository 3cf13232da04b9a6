"""Latent-forward benchmark: the engine's causal KV-cached forward against the schemes it replaces.

On the same batches (same model, data and stage) it times one training step (loss forward + backward; or
the forward alone with ``--mode forward``) of:

- ``engine``:   `MultimodalCoconut.compute_loss`: image once, prefix pass, one pass per latent, final pass
                (on CUDA the one-position latent passes replay CUDA graphs, forward and backward).
- ``engine_eager``: the same with every latent pass a transformers call (``set_latent_passes('transformers')``):
                what the graphs save.
- ``fullpass``: the flawed "full pass, then refine" baseline (`engine/model/fullpass_baseline.py`).
- ``naive``:    the naive correct scheme: the whole prefix recomputed without a cache for every latent.
- ``plain``:    the floor: the engine on the same sequence with every latent replaced by an ordinary token,
                i.e. one plain pass over the same number of tokens.
- ``hf``:       the stock transformers InternVL forward (with its (B, T, V) logits) on that same sequence.

Before anything is timed, each configuration is checked (recorded in the output): the max |logit
difference| of each scheme against the naive reference, and a causality-leak figure (the max movement of
logits and hidden states at and before the end of the thoughts when every token after them is changed):
exactly zero for a causal scheme, non-zero for the flawed baseline.

    python -m benchmarks.bench_latent_forward --model internvl3-1b-geometry --device cuda --out results/lf
    python -m benchmarks.bench_latent_forward --smoke --out /tmp/lf      # tiny model, CPU, seconds

Writes ``latent_forward.json`` (rows + environment + command), ``latent_forward.md`` and PNG plots into
``--out``; ``--profile torch`` also writes a Chrome trace of one engine step.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    command_line,
    copy_bandwidth_gbs,
    dtype_name,
    environment_info,
    free_memory,
    guarded_time_fn,
    int_list,
    is_oom,
    limit_map,
    markdown_table,
    natural_int_list,
    output_dir,
    peak_memory_gib,
    positive_int,
    positive_int_list,
    progress,
    reset_peak_memory,
    resolve_device,
    resolve_dtype,
    save_plots,
    str_list,
    strict_fp32,
    use_triton_interpreter_without_cuda,
    write_results,
)
from engine.data.random_batch import perturb_after, replace_latents, synthetic_batch, SyntheticBatch

use_triton_interpreter_without_cuda()  # before the engine can import a kernel

from engine.model.reference import naive_hidden_states  # noqa: E402
from engine.utils.logging import get_logger  # noqa: E402
from engine.utils.profiling import profile_range  # noqa: E402

log = get_logger("bench")

METHODS = ("engine", "engine_eager", "fullpass", "naive", "plain", "hf")
LATENT_METHODS = ("engine", "engine_eager", "fullpass", "naive")  # the schemes that run the latent batch
RESULT_NAME = "latent_forward"

# Correctness tolerance of |logit difference| vs the naive reference, per check dtype: absolute, scaled by
# max(1, max |reference logit|). fp32 differs by reduction order only (~1e-6 here); bf16 keeps 8 mantissa
# bits, so chunked and one-shot attention legitimately differ by a few ulps of the logit scale.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2**-4, torch.float16: 2**-7}


@dataclass(frozen=True)
class Config:
    n_latents: int
    stage_c: tuple[str, ...]  # every "stage x c_thought" that gives this many latents
    batch_size: int
    text_len: int

    @property
    def question_len(self) -> int:
        return max(1, self.text_len // 2)

    @property
    def answer_len(self) -> int:
        return max(1, self.text_len - self.question_len)

    def label(self) -> str:
        return f"latents={self.n_latents} ({'/'.join(self.stage_c)}) batch={self.batch_size} text={self.text_len}"


def build_configs(stages, c_thoughts, batch_sizes, text_lens) -> list[Config]:
    """One configuration per distinct latent count (stage 2 x c 1 and stage 1 x c 2 run the same batch)."""
    by_latents: dict[int, list[str]] = {}
    for c in c_thoughts:
        for s in stages:
            by_latents.setdefault(s * c, []).append(f"{s}x{c}")
    configs = []
    for bs in batch_sizes:
        for tl in text_lens:
            for n in sorted(by_latents):
                configs.append(Config(n, tuple(by_latents[n]), bs, tl))
    return configs


# ---------------------------------------------------------------------- the schemes, as loss functions
def naive_loss(model, ids, mask, pv, labels) -> torch.Tensor:
    """The naive correct scheme (`engine.model.reference.naive_forward`), ending like the engine's loss.

    For every latent column the whole prefix before it is recomputed without a cache and the hidden state of
    the previous position is written in as the thought; then one full pass. The loss runs the lm_head on the
    labelled positions only, as `compute_loss` does, so the comparison measures the schedule, not the head.
    The correctness check compares this loss with the loss of `naive_forward`'s logits.
    """
    hidden, _, _ = naive_hidden_states(model, model.prepare(ids, mask, pv))
    return model.lm_loss(hidden, labels)


@contextmanager
def latent_passes_of(model, method: str):
    """`engine_eager` runs the engine with transformers latent passes; `engine` with the CUDA-graphed block on
    CUDA even without gradients (the correctness check runs no-grad; "auto" graphs training only)."""
    if method == "engine_eager":
        mode = "transformers"
    elif method == "engine" and model.device.type == "cuda":
        mode = "cuda_graph"
    else:
        yield
        return
    model.set_latent_passes(mode)
    try:
        yield
    finally:
        model.set_latent_passes("auto")


def method_loss(method: str, model, latent: SyntheticBatch, plain: SyntheticBatch) -> torch.Tensor:
    from engine.model.fullpass_baseline import fullpass_forward
    from engine.model.schedule import position_ids_from_mask

    b = plain if method in ("plain", "hf") else latent
    ids, mask, pv, labels = b.input_ids, b.attention_mask, b.pixel_values, b.labels
    if method in ("engine", "engine_eager", "plain"):
        with latent_passes_of(model, method):
            return model.compute_loss(ids, mask, pv, labels)
    if method == "fullpass":
        return fullpass_forward(model, ids, mask, pv, labels, return_logits=False).loss
    if method == "naive":
        return naive_loss(model, ids, mask, pv, labels)
    if method == "hf":
        from engine.model.compat import safe_attention

        with safe_attention(ids.shape[1], ids.device):  # as the engine's passes: no cuDNN where its backward fails
            return model.base(
                input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=position_ids_from_mask(mask),
                labels=labels,
            ).loss
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def make_step(method: str, model, latent: SyntheticBatch, plain: SyntheticBatch, mode: str):
    """One timed step: zero the grads, loss forward, backward (``mode='train'``), or the forward alone."""

    def train_step():
        model.zero_grad(set_to_none=True)
        with profile_range("train/forward"):
            loss = method_loss(method, model, latent, plain)
        with profile_range("train/backward"):
            loss.backward()

    @torch.no_grad()
    def forward_step():
        with profile_range("train/forward"):
            method_loss(method, model, latent, plain)

    return train_step if mode == "train" else forward_step


# ---------------------------------------------------------------------- correctness, before timing
def method_outputs(method: str, model, b: SyntheticBatch):
    """(logits (B,T,V), hidden (B,T,H)) of one scheme, no grad."""
    from engine.model.fullpass_baseline import fullpass_forward
    from engine.model.reference import naive_forward
    from engine.model.schedule import position_ids_from_mask

    ids, mask, pv = b.input_ids, b.attention_mask, b.pixel_values
    with torch.no_grad():
        if method in ("engine", "engine_eager", "plain"):
            with latent_passes_of(model, method):
                out = model(ids, mask, pv)
            return out.logits, out.hidden_states
        if method == "fullpass":
            out = fullpass_forward(model, ids, mask, pv)
            return out.logits, out.hidden_states
        if method == "naive":
            out = naive_forward(model, ids, mask, pv)
            return out.logits, out.hidden_states
        if method == "hf":
            out = model.base(
                input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=position_ids_from_mask(mask),
                output_hidden_states=True,
            )
            return out.logits, out.hidden_states[-1]
    raise ValueError(method)


def _masked_max(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float:
    """max |a - b| over the (B, T) positions in `keep`."""
    if not bool(keep.any()):
        return 0.0
    return float((a[keep].float() - b[keep].float()).abs().max())


def check_config(methods, model, tok, latent: SyntheticBatch, plain: SyntheticBatch, tolerance: float) -> dict[str, dict]:
    """Per method: max |logit diff| vs its reference, |loss diff|, and the causality leak. No timing here.

    References: the naive scheme for the latent schemes, the stock HF forward for `plain` (same tokens, so the
    floor is known to be the ordinary model). The leak changes every token after the end-latent marker and
    measures how far logits and hidden states at columns <= that marker move. The loss compares the timed
    code path (loss only, no full logits) with the loss of the reference's logits. Only the two references'
    logits are kept at once: with a 151k vocabulary each (rows, T, V) fp32 tensor is hundreds of MB.
    """
    real = latent.attention_mask.bool()
    before = real.clone()
    before[:, latent.end_col + 1 :] = False
    perturbed = {"latent": perturb_after(latent, model, tok, latent.end_col),
                 "plain": perturb_after(plain, model, tok, latent.end_col)}
    batch_of = lambda m, p=False: (perturbed if p else {"latent": latent, "plain": plain})[  # noqa: E731
        "plain" if m in ("plain", "hf") else "latent"]
    refs, ref_losses = {}, {}
    with strict_fp32():
        if set(methods) & set(LATENT_METHODS):
            refs["naive"] = method_outputs("naive", model, latent)
            ref_losses["naive"] = float(model.lm_loss(refs["naive"][1], latent.labels, logits=refs["naive"][0]))
        if "plain" in methods:
            refs["hf"] = method_outputs("hf", model, plain)
            with torch.no_grad():
                ref_losses["hf"] = float(method_loss("hf", model, latent, plain))
        results = {}
        for m in methods:
            logits, hidden = refs[m] if m in refs else method_outputs(m, model, batch_of(m))
            p_logits, p_hidden = method_outputs(m, model, batch_of(m, True))
            leak = max(_masked_max(logits, p_logits, before), _masked_max(hidden, p_hidden, before))
            del p_logits, p_hidden
            row = {"leak": leak, "diff_reference": None, "max_abs_logit_diff": None, "loss_diff": None}
            reference = "naive" if m in LATENT_METHODS else ("hf" if m == "plain" else None)
            if reference is not None and reference != m:
                ref_logits = refs[reference][0]
                row["diff_reference"] = reference
                row["max_abs_logit_diff"] = _masked_max(logits, ref_logits, real)
                row["tolerance"] = tolerance * max(1.0, float(ref_logits[real].float().abs().max()))
            del logits, hidden
            if reference is not None:
                with torch.no_grad():
                    loss = float(method_loss(m, model, latent, plain))
                row["loss_diff"] = abs(loss - ref_losses[reference])
            if m == "fullpass":
                row["check_ok"] = None  # known to be wrong: its figures are the point, there is nothing to pass
            else:
                ok = leak == 0.0
                if row["max_abs_logit_diff"] is not None:
                    ok = ok and row["max_abs_logit_diff"] <= row["tolerance"]
                if row["loss_diff"] is not None:
                    ok = ok and row["loss_diff"] <= tolerance * max(1.0, abs(ref_losses[reference]))
                row["check_ok"] = ok
            results[m] = row
    return results


# ---------------------------------------------------------------------- the sweep
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_latent_forward", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="tiny | internvl3-1b-geometry | a local checkpoint dir "
                   "(default: the geometry on CUDA, tiny on CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--mode", choices=("train", "forward"), default="train",
                   help="train: loss forward + backward per step (default); forward: no-grad forward only")
    p.add_argument("--stages", type=natural_int_list, default=None, help="curriculum stages (default 0,1,2,3,4)")
    p.add_argument("--c-thought", type=positive_int_list, default=None, help="latents per stage (default 1,2)")
    p.add_argument("--batch-sizes", type=positive_int_list, default=None, help="default 1,8,32 on CUDA, 1,4 on CPU")
    p.add_argument("--text-len", type=int_list, default=None,
                   help="text tokens per row: half question, half answer (+eos) (default 32,128)")
    p.add_argument("--image-tokens", type=int, default=None, help="<IMG_CONTEXT> tokens per row: a multiple of the "
                   "model's tokens per tile (default 256: one 448 px tile of InternVL3)")
    p.add_argument("--methods", type=str_list, default=list(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--max-batch", action="append", metavar="METHOD=N",
                   help="run METHOD only for batch sizes <= N (repeatable), e.g. --max-batch naive=8")
    p.add_argument("--check-dtype", default="float32",
                   help="dtype of the correctness check, on a copy of the model when it differs (default float32)")
    p.add_argument("--check-rows", type=int, default=4, help="rows of each batch the correctness check runs on")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed steps (default 10 on CUDA, 5 on CPU)")
    p.add_argument("--attn", default="sdpa", help="attention backend: sdpa | eager | flash_attention_2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop starting new configurations after this many seconds (results so far are kept)")
    p.add_argument("--out", type=output_dir, default="bench_results/latent_forward", help="output directory")
    p.add_argument("--profile", choices=("none", "torch", "cuda-range"), default="none",
                   help="torch: Chrome trace of one engine step (last configuration); cuda-range: wrap that "
                   "step in cudaProfilerStart/Stop for `nsys --capture-range=cudaProfilerApi`")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, two stages, one repeat: a seconds-long check")
    args = p.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; valid: {list(METHODS)}")
    args.max_batch = limit_map(args.max_batch, METHODS, "--max-batch")
    return fill_defaults(args)


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    if args.smoke:
        preset = dict(model="tiny", device="cpu", stages=[0, 1], c_thought=[2], batch_sizes=[2], text_len=[12],
                      image_tokens=16, warmup=1, repeats=1)
        for k, v in preset.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        args.check_rows = min(args.check_rows, 2)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.device = device
    args.dtype = resolve_dtype(args.dtype, device)
    args.check_dtype = resolve_dtype(args.check_dtype, device)
    defaults = dict(
        model="internvl3-1b-geometry" if cuda else "tiny", stages=[0, 1, 2, 3, 4], c_thought=[1, 2],
        batch_sizes=[1, 8, 32] if cuda else [1, 4], text_len=[32, 128], image_tokens=256,
        warmup=3 if cuda else 1, repeats=10 if cuda else 5,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def load(args):
    from engine import load_model

    t0 = time.perf_counter()
    model, tok, _ = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                               attn_implementation=args.attn)
    log.info("loaded %s (%s, %s) in %.1f s: %.1fM parameters", args.model, dtype_name(args.dtype), args.device,
             time.perf_counter() - t0, sum(p.numel() for p in model.parameters()) / 1e6)
    return model, tok


def check_model_for(model, args):
    """The model the correctness check runs on: the benchmarked one, or an upcast copy of it."""
    if args.check_dtype == args.dtype:
        return model, False
    return copy.deepcopy(model).to(dtype=args.check_dtype), True


def time_method(method, model, latent, plain, args) -> dict:
    """Time one scheme; out-of-memory (or any error) is recorded in the row instead of ending the sweep."""
    step = make_step(method, model, latent, plain, args.mode)
    reset_peak_memory(args.device)
    timing, row = guarded_time_fn(step, args.device, warmup=args.warmup, repeats=args.repeats, log=log)
    if timing is not None:
        row.update(median_ms=timing.median_ms, p10_ms=timing.p10_ms, p90_ms=timing.p90_ms, repeats=timing.repeats,
                   peak_gib=peak_memory_gib(args.device))
        row["samples_per_s"] = latent.batch_size / (timing.median_ms / 1e3)
        row["tokens_per_s"] = latent.num_tokens / (timing.median_ms / 1e3)
    model.zero_grad(set_to_none=True)
    free_memory(args.device)
    return row


def run_config(cfg: Config, model, tok, check_model, args) -> list[dict]:
    latent = synthetic_batch(
        model, tok, batch_size=cfg.batch_size, n_latents=cfg.n_latents, question_len=cfg.question_len,
        answer_len=cfg.answer_len, image_tokens=args.image_tokens, seed=args.seed + cfg.batch_size,
    )
    plain = replace_latents(latent, model, tok)
    common = dict(
        model=args.model, device=str(args.device), dtype=dtype_name(args.dtype), mode=args.mode,
        n_latents=cfg.n_latents, stage_c="/".join(cfg.stage_c), batch_size=cfg.batch_size, text_len=cfg.text_len,
        image_tokens=args.image_tokens, seq_len=latent.seq_len, tokens=latent.num_tokens,
    )
    methods = [m for m in METHODS if m in args.methods]

    # 1. Correctness first, on the first rows, in the check dtype.
    rows_n = max(1, min(args.check_rows, cfg.batch_size))
    try:
        check = check_config(
            methods, check_model, tok, latent.rows(rows_n).to(args.device, args.check_dtype),
            plain.rows(rows_n).to(args.device, args.check_dtype), TOLERANCE.get(args.check_dtype, 1e-4),
        )
    except Exception as e:  # noqa: BLE001 - a check that cannot run is a failed check; the timings still come
        log.exception("%s: the correctness check raised", cfg.label())
        message = (str(e).splitlines() or [type(e).__name__])[0][:300]
        check = {m: dict(check_ok=False, check_error=message, leak=None, max_abs_logit_diff=None) for m in methods}
        free_memory(args.device)
    for m, c in check.items():
        if c["check_ok"] is False:
            log.error("%s: %s failed its correctness check: %s", cfg.label(), m, c)

    # 2. Timing, on the whole batch in the benchmark dtype.
    latent_d = latent.to(args.device, args.dtype)
    plain_d = plain.to(args.device, args.dtype)
    model.train(args.mode == "train")
    rows = []
    for m in methods:
        row = dict(common, method=m, check_dtype=dtype_name(args.check_dtype), check_rows=rows_n, **check[m])
        limit = args.max_batch.get(m)
        if limit is not None and cfg.batch_size > limit:
            row["status"] = f"skipped (--max-batch {m}={limit})"
        else:
            row.update(time_method(m, model, latent_d, plain_d, args))
        rows.append(row)
    model.eval()
    # Each configuration's shapes get their own captured graphs; keep them from piling up across the sweep.
    model.release_latent_graphs()
    if check_model is not model:
        check_model.release_latent_graphs()
    free_memory(args.device)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """x_floor = ms / plain ms; on engine rows, speedups over naive and fullpass (their ms / engine ms)."""
    ms = {r["method"]: r.get("median_ms") for r in rows}
    for r in rows:
        if r.get("median_ms") and ms.get("plain"):
            r["x_floor"] = r["median_ms"] / ms["plain"]
        if r["method"] == "engine" and r.get("median_ms"):
            for other in ("naive", "fullpass"):
                if ms.get(other):
                    r[f"speedup_vs_{other}"] = ms[other] / r["median_ms"]


COLUMNS = [
    ("n_latents", "latents"), ("stage_c", "stage×c"), ("batch_size", "batch"), ("text_len", "text"),
    ("seq_len", "T"), ("method", "method"), ("status", "status"), ("median_ms", "ms/step"), ("p10_ms", "p10"),
    ("p90_ms", "p90"), ("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"), ("peak_gib", "peak GiB"),
    ("x_floor", "× floor"), ("speedup_vs_naive", "naive/engine"), ("speedup_vs_fullpass", "fullpass/engine"),
    ("max_abs_logit_diff", "max Δlogit vs ref"), ("diff_reference", "ref"), ("leak", "causal leak"),
    ("check_ok", "check ok"),
]


# The H100 targets (InternVL3-1B geometry, bf16, stage 3 x c_thought 2, batch 32), checked when measured.
TARGET = dict(n_latents=6, batch_size=32, x_floor=1.4, speedup_vs_naive=3.0)


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (batch, text length): the engine at the most latents, and whether it beat the flawed
    baseline at every latent count where both ran."""
    out = []
    for key in sorted({(r["batch_size"], r["text_len"]) for r in rows}):
        group = [r for r in rows if (r["batch_size"], r["text_len"]) == key]
        ms = {(r["method"], r["n_latents"]): r.get("median_ms") for r in group}
        engine = [r for r in group if r["method"] == "engine"]
        if not engine:
            continue
        top = max(engine, key=lambda r: r["n_latents"])
        pairs = [(ms[("engine", n)], ms.get(("fullpass", n))) for m, n in ms if m == "engine" and n > 0]
        pairs = [(e, f) for e, f in pairs if e and f]
        fullpass_leaks = [r["leak"] for r in group
                          if r["method"] == "fullpass" and r["n_latents"] > 0 and r.get("leak") is not None]
        engine_leaks = [r["leak"] for r in engine if r.get("leak") is not None]
        out.append(dict(
            batch_size=key[0], text_len=key[1], n_latents=top["n_latents"], engine_ms=top.get("median_ms"),
            x_floor=top.get("x_floor"), speedup_vs_naive=top.get("speedup_vs_naive"),
            speedup_vs_fullpass=top.get("speedup_vs_fullpass"),
            faster_than_fullpass_everywhere=all(e < f for e, f in pairs) if pairs else None,
            engine_max_diff=max((r["max_abs_logit_diff"] for r in engine if r.get("max_abs_logit_diff") is not None),
                                default=None),
            engine_max_leak=max(engine_leaks) if engine_leaks else None,
            fullpass_min_leak=min(fullpass_leaks) if fullpass_leaks else None,
        ))
    return out


def check_targets(rows: list[dict], summary: list[dict]) -> list[dict]:
    """The three H100 targets, evaluated on whatever rows match them (none: an empty list)."""
    out = []
    for s in summary:
        if s["batch_size"] != TARGET["batch_size"]:
            continue
        engine = next((r for r in rows if r["method"] == "engine" and r["batch_size"] == s["batch_size"]
                       and r["text_len"] == s["text_len"] and r["n_latents"] == TARGET["n_latents"]), None)
        if engine is None:
            continue
        x_floor, naive = engine.get("x_floor"), engine.get("speedup_vs_naive")
        out += [
            dict(target=f"engine fwd+bwd <= {TARGET['x_floor']}x plain (batch {s['batch_size']}, text {s['text_len']}, "
                 f"{TARGET['n_latents']} latents)", value=x_floor, met=None if x_floor is None else x_floor <= TARGET["x_floor"]),
            dict(target=f"engine >= {TARGET['speedup_vs_naive']}x faster than naive (same)", value=naive,
                 met=None if naive is None else naive >= TARGET["speedup_vs_naive"]),
            dict(target=f"engine faster than fullpass at every stage (batch {s['batch_size']}, text {s['text_len']})",
                 value=s["faster_than_fullpass_everywhere"], met=s["faster_than_fullpass_everywhere"]),
        ]
    return out


SUMMARY_COLUMNS = [
    ("batch_size", "batch"), ("text_len", "text"), ("n_latents", "latents"), ("engine_ms", "engine ms"),
    ("x_floor", "engine × floor"), ("speedup_vs_naive", "naive/engine"), ("speedup_vs_fullpass", "fullpass/engine"),
    ("faster_than_fullpass_everywhere", "engine < fullpass at every stage"), ("engine_max_diff", "engine max Δlogit"),
    ("engine_max_leak", "engine leak"), ("fullpass_min_leak", "fullpass min leak"),
]


def report(payload: dict) -> str:
    """The markdown body: targets (when measured), one summary line per (batch, text), then every row."""
    rows = payload["rows"]
    summary = summarize(rows)
    targets = check_targets(rows, summary)
    payload["summary"], payload["targets"] = summary, targets
    parts = []
    if targets:
        parts.append("## Targets\n\n" + markdown_table(targets, [("target", "target"), ("value", "measured"), ("met", "met")]))
    parts.append("## Summary (engine at the most latents)\n\n" + markdown_table(summary, SUMMARY_COLUMNS))
    parts.append("## All rows\n\n" + markdown_table(rows, COLUMNS))
    if payload.get("skipped_configs"):
        parts.append("Not run (time budget): " + "; ".join(payload["skipped_configs"]))
    return "\n\n".join(parts)


def profile_engine_step(cfg: Config, model, tok, args, out_dir: Path) -> Path | None:
    latent = synthetic_batch(
        model, tok, batch_size=cfg.batch_size, n_latents=cfg.n_latents, question_len=cfg.question_len,
        answer_len=cfg.answer_len, image_tokens=args.image_tokens, seed=args.seed + cfg.batch_size,
    ).to(args.device, args.dtype)
    plain = replace_latents(latent, model, tok)
    model.train(args.mode == "train")
    step = make_step("engine", model, latent, plain, args.mode)
    step()  # warm-up, outside the trace
    if args.device.type == "cuda":
        torch.cuda.synchronize(args.device)
    path = None
    if args.profile == "torch":
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            if args.device.type == "cuda":
                torch.cuda.synchronize(args.device)
        path = out_dir / f"trace_engine_latents{cfg.n_latents}_b{cfg.batch_size}_t{cfg.text_len}.json"
        prof.export_chrome_trace(str(path))
        log.info("torch.profiler trace of one engine step: %s (open in chrome://tracing or ui.perfetto.dev)", path)
    elif args.profile == "cuda-range":
        if args.device.type != "cuda":
            log.warning("--profile cuda-range needs CUDA; nothing captured")
        else:
            torch.cuda.profiler.start()
            step()
            torch.cuda.synchronize(args.device)
            torch.cuda.profiler.stop()
            log.info("one engine step wrapped in cudaProfilerStart/Stop")
    model.zero_grad(set_to_none=True)
    model.eval()
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # steadier CPU timings; set OMP_NUM_THREADS to choose otherwise
    model, tok = load(args)
    model.eval()
    configs = build_configs(args.stages, args.c_thought, args.batch_sizes, args.text_len)
    check_model, is_copy = check_model_for(model, args)
    payload = {
        "benchmark": RESULT_NAME,
        "command": command_line(),
        "environment": environment_info(args.device),
        "settings": {k: (dtype_name(v) if isinstance(v, torch.dtype) else str(v) if isinstance(v, torch.device) else v)
                     for k, v in vars(args).items()},
        "copy_bandwidth_gbs": copy_bandwidth_gbs(str(args.device)),
        "rows": [],
        "skipped_configs": [],
    }
    start = time.perf_counter()
    for i, cfg in enumerate(progress(configs, desc="latent forward", unit="config", disable=None)):
        if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
            payload["skipped_configs"].append(cfg.label())
            continue
        log.info("[%d/%d, %.0f s] %s", i + 1, len(configs), time.perf_counter() - start, cfg.label())
        payload["rows"].extend(run_config(cfg, model, tok, check_model, args))
        write_results(out_dir, RESULT_NAME, payload, report(payload), header="# Latent forward")
    if payload["skipped_configs"]:
        log.warning("time budget reached: %d configuration(s) not run", len(payload["skipped_configs"]))
    if is_copy:
        del check_model
        free_memory(args.device)
    if args.profile != "none" and configs:
        try:  # the last configuration: the largest batch, text and latent count of the sweep
            trace = profile_engine_step(configs[-1], model, tok, args, out_dir)
            payload["trace"] = None if trace is None else str(trace)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            log.warning("profiling %s ran out of memory; no trace", configs[-1].label())
            model.zero_grad(set_to_none=True)
    paths = write_results(out_dir, RESULT_NAME, payload, report(payload), header="# Latent forward")
    if not args.no_plots and payload["rows"]:
        from benchmarks.plot_results import plot_latent_forward

        save_plots(plot_latent_forward, payload, out_dir, log)
    log.info("wrote %s and %s", paths["json"], paths["md"])
    failed = [r for r in payload["rows"] if r.get("check_ok") is False]
    if failed:
        log.error("%d row(s) failed the correctness check (see check_ok in %s)", len(failed), paths["json"])
    errors = [r for r in payload["rows"] if r.get("status") == "error"]
    if errors:
        log.error("%d measurement(s) raised an error (status 'error' in %s)", len(errors), paths["json"])
    return 1 if failed or errors else 0


if __name__ == "__main__":
    from benchmarks.common import run_harness
    logging.captureWarnings(True)
    sys.exit(run_harness(main))
