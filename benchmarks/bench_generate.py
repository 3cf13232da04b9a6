"""Generation benchmark: batched latent generation against the original CoCoNuT scheme and a textual CoT.

For the same questions (image + question tokens built in code) it measures answers/s, generated tokens per
answer and ms per decoding step of:

- ``latent``: `MultimodalCoconut.generate`: the prompt's latent thoughts through the cached iterative forward,
              then batched KV-cached decoding of what the stage leaves to write (the remaining reasoning steps
              and the answer), on each cache of ``--kv-cache dynamic,paged`` (generate's ``kv_cache`` option;
              the paged rows on one `PagedRunner` per row, whose pool and graphs the warm-up calls build).
- ``naive``:  the original CoCoNuT scheme (`engine.model.reference.naive_generate`): one prompt at a time, the
              whole sequence, thoughts included, recomputed for every new token. Batch-size independent, so it
              runs on ``--naive-rows`` prompts once per stage.
- ``cot``:    transformers' ``generate`` on the base InternVL writing a textual chain of thought for the same
              questions: ``cot_steps * step_tokens + answer_tokens`` new tokens, forced with
              ``min_new_tokens = max_new_tokens`` (the weights are random, so nothing else fixes the length).

At stage s the latent scheme writes ``max(0, cot_steps - s) * step_tokens + answer_tokens`` tokens, as the
curriculum removes one step per stage. Decode ms/step = (t(N new tokens) - t(1)) / (N - 1); its floor is the
bytes one step must read (language-model weights + lm_head + the KV cache) over the measured copy bandwidth.
Before timing, the latent scheme's tokens are checked against the naive reference (greedy, in fp32 by default).

    python -m benchmarks.bench_generate --model internvl3-1b-geometry --device cuda --out results/gen
    python -m benchmarks.bench_generate --smoke --out /tmp/gen       # tiny model, CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
import time
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
    limit_map,
    markdown_table,
    module_bytes,
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
    use_triton_interpreter_without_cuda,
    write_results,
)
from engine.data.random_batch import synthetic_batch, SyntheticBatch

use_triton_interpreter_without_cuda()  # before the engine can import a kernel

from engine.utils.logging import get_logger  # noqa: E402

log = get_logger("bench")

METHODS = ("latent", "naive", "cot")
KV_CACHES = ("dynamic", "paged")
RESULT_NAME = "generate"
NEVER = -1  # an eos id no token has: every row generates exactly max_new_tokens


@dataclass(frozen=True)
class Stage:
    stage: int
    c_thought: int

    @property
    def n_latents(self) -> int:
        return self.stage * self.c_thought


def latent_new_tokens(stage: int, args) -> int:
    return max(0, args.cot_steps - stage) * args.step_tokens + args.answer_tokens


def cot_new_tokens(args) -> int:
    return args.cot_steps * args.step_tokens + args.answer_tokens


def prompts(model, tok, args, batch_size: int, n_latents: int, *, markers: bool = True) -> SyntheticBatch:
    """Left-padded prompts ending at the end-latent marker (or after the question, for the textual CoT).
    The same seed gives the same questions and pixels for every method."""
    return synthetic_batch(
        model, tok, batch_size=batch_size, n_latents=n_latents, question_len=args.question_len, answer_len=0,
        image_tokens=args.image_tokens, seed=args.seed, markers=markers,
    )


# ---------------------------------------------------------------------- the schemes
def latent_fn(model, b: SyntheticBatch, new_tokens: int, kv_cache: str, runner=None):
    """One `generate` call; with ``runner`` (a `PagedRunner`) on its pool and graphs, as a server keeps them."""
    if runner is not None:
        return lambda: runner.generate(b.input_ids, b.attention_mask, b.pixel_values, max_new_tokens=new_tokens,
                                       eos_token_id=NEVER)
    return lambda: model.generate(
        b.input_ids, b.attention_mask, b.pixel_values, max_new_tokens=new_tokens, eos_token_id=NEVER, kv_cache=kv_cache
    )


def naive_fn(model, b: SyntheticBatch, new_tokens: int):
    from engine.model.reference import naive_generate

    return lambda: naive_generate(
        model, b.input_ids, b.attention_mask, b.pixel_values, max_new_tokens=new_tokens, eos_token_id=NEVER,
        tiles_per_row=[b.tiles_per_row] * b.batch_size,
    )


def cot_fn(model, b: SyntheticBatch, new_tokens: int, pad_id: int):
    def run():
        with torch.no_grad():
            return model.base.generate(
                input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
            )

    return run


# ---------------------------------------------------------------------- floor
def decode_floor_ms(model, batch_size: int, context: float, bandwidth_gbs: float) -> float:
    """Bytes one decode step must read: the language model's weights (not the embedding table, of which it
    gathers B rows), the lm_head, and every row's KV cache at `context` positions, over the copy bandwidth."""
    lm = model.language_model
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = model.dtype.itemsize if hasattr(model.dtype, "itemsize") else torch.finfo(model.dtype).bits // 8
    weights = module_bytes(lm, skip=(lm.get_input_embeddings(),))
    head = model.base.lm_head.weight
    weights += head.numel() * head.element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem * batch_size * context
    return (weights + kv) / (bandwidth_gbs * 1e9) * 1e3


# ---------------------------------------------------------------------- runs
def timed(fn, args, *, warmup=None, repeats=None) -> dict:
    """Median/p10/p90 of fn; out-of-memory (or any error) is recorded in the row instead of ending the sweep."""
    reset_peak_memory(args.device)
    t, out = guarded_time_fn(fn, args.device, warmup=args.warmup if warmup is None else warmup,
                             repeats=args.repeats if repeats is None else repeats, log=log)
    if t is not None:
        out.update(total_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, repeats=t.repeats,
                   peak_gib=peak_memory_gib(args.device))
    free_memory(args.device)
    return out


def run_naive(st: Stage, model, tok, args) -> dict:
    n_rows = args.naive_rows
    new = latent_new_tokens(st.stage, args)
    b = prompts(model, tok, args, n_rows, st.n_latents).to(args.device, args.dtype)
    row = dict(method="naive", kv_cache=None, stage=st.stage, c_thought=st.c_thought, n_latents=st.n_latents,
               batch_size=1, rows=n_rows, prompt_len=b.seq_len, new_tokens=new)
    row.update(timed(naive_fn(model, b, new), args, warmup=min(args.warmup, 1), repeats=args.naive_repeats))
    if row["status"] == "ok":
        row["answers_per_s"] = n_rows / (row["total_ms"] / 1e3)
        row["tokens_per_s"] = n_rows * new / (row["total_ms"] / 1e3)
        row["ms_per_answer"] = row["total_ms"] / n_rows
        row["ms_per_token"] = row["total_ms"] / (n_rows * new)
    return row


def check_latent(st: Stage, check_model, tok, args, kv_cache: str) -> bool:
    """Greedy tokens of batched latent generation == the batch-1 full-recompute reference, on a few rows."""
    from engine.model.reference import naive_generate

    rows = max(1, args.check_rows)
    new = min(latent_new_tokens(st.stage, args), args.check_tokens)
    b = prompts(check_model, tok, args, rows, st.n_latents).to(args.device, args.check_dtype)
    try:
        got = latent_fn(check_model, b, new, kv_cache)()
    except Exception:  # noqa: BLE001 - a failing cache is reported as a failed check, the others still run
        log.exception("stage %d x c %d: generate(kv_cache=%s) failed in the check", st.stage, st.c_thought, kv_cache)
        return False
    want = naive_generate(check_model, b.input_ids, b.attention_mask, b.pixel_values, max_new_tokens=new,
                          eos_token_id=NEVER, tiles_per_row=[b.tiles_per_row] * rows)
    ok = torch.equal(got.cpu(), want.cpu())
    if not ok:
        log.error("stage %d x c %d (%s cache): batched latent generation %s != reference %s", st.stage, st.c_thought,
                  kv_cache, got.tolist(), want.tolist())
    return ok


def run_decoding(model, b: SyntheticBatch, new: int, args, fn_of) -> dict:
    """Time N and 1 new tokens; derive prefill and per-step decode times."""
    row = dict(batch_size=b.batch_size, prompt_len=b.seq_len, new_tokens=new)
    row.update(timed(fn_of(new), args))
    if row["status"] != "ok":
        return row
    row["answers_per_s"] = b.batch_size / (row["total_ms"] / 1e3)
    row["tokens_per_s"] = b.batch_size * new / (row["total_ms"] / 1e3)
    row["ms_per_answer"] = row["total_ms"] / b.batch_size
    if new > 1:
        first = timed(fn_of(1), args)
        if first["status"] == "ok":
            row["prefill_ms"] = first["total_ms"]
            row["decode_ms_per_step"] = max(0.0, (row["total_ms"] - first["total_ms"]) / (new - 1))
            row["floor_ms_per_step"] = decode_floor_ms(model, b.batch_size, b.seq_len + new / 2, args.bandwidth)
            row["x_floor"] = row["decode_ms_per_step"] / row["floor_ms_per_step"]
    return row


def add_speedups(rows: list[dict]) -> None:
    naive = {(r["stage"], r["c_thought"]): r["answers_per_s"] for r in rows
             if r["method"] == "naive" and r.get("answers_per_s")}
    cot = {r["batch_size"]: r["answers_per_s"] for r in rows if r["method"] == "cot" and r.get("answers_per_s")}
    for r in rows:
        if r["method"] != "latent" or not r.get("answers_per_s"):
            continue
        if (r["stage"], r["c_thought"]) in naive:
            r["speedup_vs_naive"] = r["answers_per_s"] / naive[(r["stage"], r["c_thought"])]
        if r["batch_size"] in cot:
            r["speedup_vs_cot"] = r["answers_per_s"] / cot[r["batch_size"]]


COLUMNS = [
    ("method", "method"), ("kv_cache", "kv cache"), ("stage", "stage"), ("c_thought", "c"), ("n_latents", "latents"),
    ("batch_size", "batch"), ("rows", "rows"), ("prompt_len", "prompt T"), ("new_tokens", "new tokens/answer"),
    ("status", "status"), ("total_ms", "ms/batch"), ("p10_ms", "p10"), ("p90_ms", "p90"),
    ("answers_per_s", "answers/s"), ("tokens_per_s", "tokens/s"), ("prefill_ms", "prefill ms"),
    ("decode_ms_per_step", "ms/step"), ("ms_per_token", "ms/token (naive)"), ("floor_ms_per_step", "floor ms/step"),
    ("x_floor", "× floor"), ("speedup_vs_naive", "× naive"), ("speedup_vs_cot", "× cot"), ("peak_gib", "peak GiB"),
    ("matches_reference", "= reference"),
]


TARGET = dict(batch_size=64, speedup_vs_naive=20.0)  # H100: batched latent generation vs the batch-1 scheme


def report(payload: dict) -> str:
    """Markdown body: per stage and cache, the latent scheme at its largest batch against the batch-1 scheme
    (and the 20x target at batch 64 when measured), then every row."""
    rows = payload["rows"]
    add_speedups(rows)
    summary = []
    for r in rows:
        if r["method"] != "latent" or not r.get("answers_per_s"):
            continue
        same = [x for x in rows if x["method"] == "latent" and x.get("answers_per_s") and x["stage"] == r["stage"]
                and x["c_thought"] == r["c_thought"] and x["kv_cache"] == r["kv_cache"]]
        if r["batch_size"] != max(x["batch_size"] for x in same):
            continue
        line = dict(stage=r["stage"], c_thought=r["c_thought"], kv_cache=r["kv_cache"], batch_size=r["batch_size"],
                    answers_per_s=r["answers_per_s"], speedup_vs_naive=r.get("speedup_vs_naive"),
                    speedup_vs_cot=r.get("speedup_vs_cot"), x_floor=r.get("x_floor"))
        if r["batch_size"] == TARGET["batch_size"] and r.get("speedup_vs_naive") is not None:
            line["target_met"] = r["speedup_vs_naive"] >= TARGET["speedup_vs_naive"]
        summary.append(line)
    payload["summary"] = summary
    columns = [("stage", "stage"), ("c_thought", "c"), ("kv_cache", "kv cache"), ("batch_size", "batch"),
               ("answers_per_s", "answers/s"), ("speedup_vs_naive", "× naive (batch 1)"), ("speedup_vs_cot", "× cot"),
               ("x_floor", "decode × floor"),
               ("target_met", f">= {TARGET['speedup_vs_naive']:g}x naive at batch {TARGET['batch_size']}")]
    parts = ["## Summary (latent scheme at its largest batch)\n\n" + markdown_table(summary, columns),
             "## All rows\n\n" + markdown_table(rows, COLUMNS)]
    if payload.get("skipped"):
        parts.append("Not run (time budget): " + "; ".join(payload["skipped"]))
    return "\n\n".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_generate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="tiny | internvl3-1b-geometry | a local checkpoint dir "
                   "(default: the geometry on CUDA, tiny on CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--stages", type=natural_int_list, default=None, help="default 0,1,2,3")
    p.add_argument("--c-thought", type=positive_int_list, default=None, help="default 2")
    p.add_argument("--batch-sizes", type=positive_int_list, default=None, help="default 1,8,64 on CUDA, 1,4 on CPU")
    p.add_argument("--question-len", type=int, default=None, help="question tokens (default 24)")
    p.add_argument("--image-tokens", type=int, default=None, help="<IMG_CONTEXT> tokens per prompt (default 256)")
    p.add_argument("--cot-steps", type=int, default=None, help="reasoning steps of the textual CoT (default 3)")
    p.add_argument("--step-tokens", type=int, default=None, help="tokens per reasoning step (default 20)")
    p.add_argument("--answer-tokens", type=positive_int, default=None, help="tokens of the answer itself (default 8)")
    p.add_argument("--kv-cache", type=str_list, default=None,
                   help="caches for the latent scheme, generate's kv_cache option "
                   "(default dynamic,paged on CUDA; dynamic on CPU, where the paged kernels run interpreted)")
    p.add_argument("--methods", type=str_list, default=list(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--max-batch", action="append", metavar="METHOD=N",
                   help="run METHOD only for batch sizes <= N (repeatable), e.g. --max-batch cot=8")
    p.add_argument("--naive-rows", type=positive_int, default=None, help="prompts the batch-1 scheme runs (default 4 on "
                   "CUDA, 2 on CPU)")
    p.add_argument("--naive-repeats", type=int, default=None, help="timed repeats of the naive scheme (default 3/1)")
    p.add_argument("--check-dtype", default="float32", help="dtype of the token check (on a copy when it differs)")
    p.add_argument("--check-rows", type=int, default=2, help="prompts the token check runs on")
    p.add_argument("--check-tokens", type=positive_int, default=8, help="new tokens the token check compares")
    p.add_argument("--warmup", type=int, default=None, help="default 2 on CUDA, 1 on CPU")
    p.add_argument("--repeats", type=positive_int, default=None, help="default 5 on CUDA, 3 on CPU")
    p.add_argument("--attn", default="sdpa", help="attention backend: sdpa | eager | flash_attention_2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop starting new measurements after this many seconds (results so far are kept)")
    p.add_argument("--out", type=output_dir, default="bench_results/generate", help="output directory")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, short answers, one repeat")
    args = p.parse_args(argv)
    for flag, values, valid in (("--methods", args.methods, METHODS), ("--kv-cache", args.kv_cache or [], KV_CACHES)):
        unknown = sorted(set(values) - set(valid))
        if unknown:
            p.error(f"{flag}: unknown value(s) {unknown}; valid: {list(valid)}")
    args.max_batch = limit_map(args.max_batch, METHODS, "--max-batch")
    if args.smoke:
        preset = dict(model="tiny", device="cpu", stages=[0, 1], c_thought=[2], batch_sizes=[2], question_len=8,
                      image_tokens=16, cot_steps=1, step_tokens=3, answer_tokens=2, naive_rows=1, naive_repeats=1,
                      warmup=1, repeats=1, kv_cache=list(KV_CACHES))
        for k, v in preset.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        args.check_tokens = min(args.check_tokens, 3)
    args.device = resolve_device(args.device)
    cuda = args.device.type == "cuda"
    args.dtype = resolve_dtype(args.dtype, args.device)
    args.check_dtype = resolve_dtype(args.check_dtype, args.device)
    defaults = dict(
        model="internvl3-1b-geometry" if cuda else "tiny", stages=[0, 1, 2, 3], c_thought=[2],
        batch_sizes=[1, 8, 64] if cuda else [1, 4], question_len=24, image_tokens=256, cot_steps=3, step_tokens=20,
        answer_tokens=8, naive_rows=4 if cuda else 2, naive_repeats=3 if cuda else 1, warmup=2 if cuda else 1,
        repeats=5 if cuda else 3, kv_cache=list(KV_CACHES) if cuda else ["dynamic"],
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine import load_model
    from engine.model.paged.runner import PagedRunner

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: the paged cache's kernels run interpreted
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)  # steadier CPU timings; set OMP_NUM_THREADS to choose otherwise
    t0 = time.perf_counter()
    model, tok, _ = load_model(args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                               attn_implementation=args.attn)
    model.eval()
    log.info("loaded %s (%s, %s) in %.1f s", args.model, dtype_name(args.dtype), args.device, time.perf_counter() - t0)
    check_model = model if args.check_dtype == args.dtype else copy.deepcopy(model).to(dtype=args.check_dtype)
    args.bandwidth = copy_bandwidth_gbs(str(args.device))

    caches: list[str] = list(args.kv_cache)

    payload = {
        "benchmark": RESULT_NAME,
        "command": command_line(),
        "environment": environment_info(args.device),
        "settings": {k: (dtype_name(v) if isinstance(v, torch.dtype) else str(v) if isinstance(v, torch.device) else v)
                     for k, v in vars(args).items()},
        "copy_bandwidth_gbs": args.bandwidth,
        "rows": [],
        "skipped": [],
    }
    stages = [Stage(s, c) for c in args.c_thought for s in args.stages]
    stages = list(dict.fromkeys(Stage(0, args.c_thought[0]) if st.stage == 0 else st for st in stages))
    header = "# Generation"

    def flush():
        return write_results(out_dir, RESULT_NAME, payload, report(payload), header=header)

    # 1. Correctness before timing: batched latent generation == the batch-1 reference, per stage and cache.
    checks = {}
    if "latent" in args.methods:
        for st in stages:
            for cache in caches:
                checks[(st, cache)] = check_latent(st, check_model, tok, args, cache)
    if check_model is not model:
        del check_model
        free_memory(args.device)

    jobs = []
    if "naive" in args.methods:
        jobs += [("naive", st, 1, None) for st in stages]
    for bs in args.batch_sizes:
        if "cot" in args.methods:
            jobs.append(("cot", None, bs, None))
        if "latent" in args.methods:
            jobs += [("latent", st, bs, cache) for st in stages for cache in caches]
    start = time.perf_counter()
    for i, (method, st, bs, cache) in enumerate(progress(jobs, desc="generate", unit="run", disable=None)):
        label = f"{method} stage={None if st is None else st.stage} batch={bs} cache={cache or '-'}"
        if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
            payload["skipped"].append(label)
            continue
        log.info("[%d/%d, %.0f s] %s", i + 1, len(jobs), time.perf_counter() - start, label)
        limit = args.max_batch.get(method)
        base = dict(model=args.model, device=str(args.device), dtype=dtype_name(args.dtype))
        if limit is not None and bs > limit:
            payload["rows"].append(dict(base, method=method, batch_size=bs, status=f"skipped (--max-batch {method}={limit})",
                                        stage=None if st is None else st.stage,
                                        c_thought=None if st is None else st.c_thought))
            continue
        if method == "naive":
            row = dict(base, **run_naive(st, model, tok, args))
        elif method == "cot":
            b = prompts(model, tok, args, bs, 0, markers=False).to(args.device, args.dtype)
            new = cot_new_tokens(args)
            row = dict(base, method="cot", kv_cache=None, stage=None, c_thought=None, n_latents=0)
            row.update(run_decoding(model, b, new, args, lambda n, b=b: cot_fn(model, b, n, tok.pad_token_id)))
        else:
            b = prompts(model, tok, args, bs, st.n_latents).to(args.device, args.dtype)
            new = latent_new_tokens(st.stage, args)
            row = dict(base, method="latent", kv_cache=cache, stage=st.stage, c_thought=st.c_thought,
                       n_latents=st.n_latents, matches_reference=checks.get((st, cache)))
            # the paged cache on one runner per row: its pool and CUDA graphs are built in the warm-up calls, not in
            # every timed one (model.generate(kv_cache="paged") builds and frees a runner per call)
            with contextlib.ExitStack() as stack:
                runner = stack.enter_context(PagedRunner(model)) if cache == "paged" else None
                row.update(run_decoding(model, b, new, args,
                                        lambda n, b=b, c=cache, r=runner: latent_fn(model, b, n, c, r)))
        payload["rows"].append(row)
        flush()
    if payload["skipped"]:
        log.warning("time budget reached: %d measurement(s) not run", len(payload["skipped"]))
    paths = flush()
    if not args.no_plots and payload["rows"]:
        from benchmarks.plot_results import plot_generate

        save_plots(plot_generate, payload, out_dir, log)
    log.info("wrote %s and %s", paths["json"], paths["md"])
    if any(ok is False for ok in checks.values()):
        log.error("batched latent generation differs from the reference (matches_reference in %s)", paths["json"])
    errors = [r for r in payload["rows"] if r.get("status") == "error"]
    if errors:
        log.error("%d measurement(s) raised an error (status 'error' in %s)", len(errors), paths["json"])
    return 1 if errors or any(ok is False for ok in checks.values()) else 0


if __name__ == "__main__":
    from benchmarks.common import run_harness
    logging.captureWarnings(True)
    sys.exit(run_harness(main))
