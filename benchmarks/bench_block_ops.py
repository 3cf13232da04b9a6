"""The passes of one training step, by how they run: the graphed latent block with transformers' modules and the
other passes as transformers calls (`layer_ops=reference`), the same block with the Triton ops and their backward
and the other passes through the layer stack with them (`fused`, `kernels/layer_grads.py`,
`engine/model/stack_pass.py`), one transformers call per pass (`transformers`), and the same batch without thoughts
(`plain`, with the default layer ops).

Per variant: the loss, the step time (forward + backward of `compute_loss`, no optimizer), the kernels one step
launches (torch.profiler, CUDA only) and the largest relative difference of any language-model gradient from the
`reference` variant's (bf16 rounding shows here: compare the `transformers` row, the other exact path). On CPU the
block runs eagerly ("static") and the fused ops in the Triton interpreter: a check that the harness works, not a
measurement.

    python -m benchmarks.bench_block_ops --model internvl3-1b-geometry --device cuda --dtype bfloat16 \\
        --batch-size 64 --latents 6 --out bench_results/block_ops
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch

from benchmarks.common import (
    command_line,
    dtype_name,
    environment_info,
    markdown_table,
    output_dir,
    positive_int,
    resolve_device,
    resolve_dtype,
    time_fn,
    use_triton_interpreter_without_cuda,
    write_results,
)

use_triton_interpreter_without_cuda()  # before the engine can import a kernel

from engine.data.random_batch import synthetic_batch  # noqa: E402
from engine.utils.logging import get_logger  # noqa: E402

log = get_logger("bench")

VARIANTS = ("reference", "fused", "transformers", "plain")
GRADIENT_KINDS = ("layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a built-in model (tiny, internvl3-1b-geometry, ...) or a local path")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--latents", type=int, default=6, help="thoughts per row")
    p.add_argument("--text-len", type=int, default=64, help="question + answer tokens per row")
    p.add_argument("--image-tokens", type=int, default=256)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=output_dir, default="bench_results/block_ops")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or "reference" not in args.variants:
        p.error(f"--variants must be taken from {', '.join(VARIANTS)} and include reference, got {args.variants}")
    if args.batch_size < 1 or args.latents < 1 or args.text_len < 2:
        p.error("--batch-size and --latents must be >= 1, --text-len >= 2")
    return args


def _set_variant(model, variant: str) -> None:
    block = "cuda_graph" if model.device.type == "cuda" else "static"
    if variant == "transformers":
        model.set_latent_passes("transformers")
        model.set_layer_ops("reference")
    elif variant in ("reference", "fused"):
        model.set_latent_passes(block)
        model.set_layer_ops(variant)
    else:
        model.set_latent_passes("auto")
        model.set_layer_ops("auto")


def _kernels_per_step(step, device: torch.device) -> tuple[int | None, Counter]:
    if device.type != "cuda":
        return None, Counter()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), Counter(e.name[:70] for e in kernels)


def run(args) -> dict:
    from engine import load_model

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tok, _ = load_model(args.model, dtype=dtype, device=device, seed=args.seed)
    model.train()
    question = max(1, args.text_len // 2)
    shape = dict(batch_size=args.batch_size, question_len=question, answer_len=args.text_len - question,
                 image_tokens=args.image_tokens, seed=args.seed)  # fmt: skip
    batches = {
        "latent": synthetic_batch(model, tok, n_latents=args.latents, **shape),
        "plain": synthetic_batch(model, tok, n_latents=0, **shape),
    }
    inputs = {
        name: (b.input_ids.to(device), b.attention_mask.to(device), b.pixel_values.to(device, dtype), b.labels.to(device))
        for name, b in batches.items()
    }
    rows, gradients, kernel_names = [], {}, {}
    for variant in args.variants:
        _set_variant(model, variant)
        batch = inputs["plain" if variant == "plain" else "latent"]
        losses = []

        def step():
            model.zero_grad(set_to_none=True)
            loss = model.compute_loss(*batch)
            loss.backward()
            losses.append(loss.detach())

        step()
        if variant != "plain":
            gradients[variant] = {
                n: p.grad.detach().float().clone()
                for n, p in model.language_model.named_parameters()
                if p.grad is not None
            }
        timing = time_fn(step, device, warmup=args.warmup, repeats=args.repeats)
        count, names = _kernels_per_step(step, device)
        kernel_names[variant] = names
        rows.append(dict(variant=variant, loss=float(losses[0]), ms=timing.median_ms, ms_p10=timing.p10_ms,
                         ms_p90=timing.p90_ms, kernels=count,
                         block_captures=sum(b.captures for b in model._latent_blocks.values())))  # fmt: skip
        log.info("%s: %.1f ms, %s kernels, loss %.6f", variant, timing.median_ms, count, float(losses[0]))
    model.set_latent_passes("auto")
    model.set_layer_ops("auto")
    reference = gradients["reference"]
    base_loss = rows[[r["variant"] for r in rows].index("reference")]["loss"]
    for row in rows:
        if row["variant"] == "plain":
            continue
        row["delta_loss"] = row["loss"] - base_loss
        mine = gradients[row["variant"]]
        errors = {n: float((mine[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in reference.items()}
        row["grad_rel_diff_max"] = max(errors.values())
        row["grad_rel_diff_by_kind"] = {k: max((e for n, e in errors.items() if k in n), default=None) for k in GRADIENT_KINDS}
    extra = {v: (kernel_names[v] - kernel_names["plain"]).most_common(20) for v in kernel_names if "plain" in kernel_names and v != "plain"}
    return dict(command=command_line(), environment=environment_info(device), model=args.model,
                dtype=dtype_name(dtype), batch_size=args.batch_size, latents=args.latents, text_len=args.text_len,
                image_tokens=args.image_tokens, rows=rows, extra_kernels_over_plain=extra)  # fmt: skip


def report(payload: dict) -> str:
    columns = [("variant", "latent passes"), ("ms", "ms/step"), ("kernels", "kernels/step"), ("loss", "loss"),
               ("delta_loss", "Δ loss vs reference"), ("grad_rel_diff_max", "max rel. gradient diff vs reference")]  # fmt: skip
    return markdown_table(payload["rows"], columns)


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = run(args)
    table = report(payload)
    header = (f"Latent block ops: {payload['model']}, {payload['dtype']}, batch {payload['batch_size']}, "
              f"{payload['latents']} latents, text {payload['text_len']} + {payload['image_tokens']} image tokens")  # fmt: skip
    paths = write_results(args.out, "block_ops", payload, table, header=header)
    print(table)
    log.info("wrote %s and %s", paths["json"], paths["md"])
    return 0


if __name__ == "__main__":
    from benchmarks.common import run_harness
    sys.exit(run_harness(main))
