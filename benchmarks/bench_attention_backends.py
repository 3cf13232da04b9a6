"""torch SDPA's backends at the training step's attention shapes, forward and forward + backward.

Shapes (batch, heads, queries, keys, head_dim): the InternViT tower's bidirectional attention (64 tiles of 1,025
positions at the InternVL3-1B geometry, 16 heads of 64) and the language model's causal pass with and without a
padding mask (64 rows of ~320 tokens, 14 heads). Each backend is timed where it accepts the shape; its output is
compared with the first backend's. TFLOP/s counts 4·B·H·Sq·Sk·D forward (halved when causal), 3.5× that for
forward + backward.

    python -m benchmarks.bench_attention_backends --device cuda --out bench_results/attention_backends
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import command_line, environment_info, markdown_table, output_dir, positive_int, resolve_device, time_fn, write_results

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH, "default": None}  # fmt: skip
# name: (batch, heads, sequence, head_dim, causal, padded rows)
SHAPES = {
    "vision tower (1B)": (64, 16, 1025, 64, False, False),
    "language model, causal": (64, 14, 320, 64, True, False),
    "language model, causal + padding mask": (64, 14, 320, 64, True, True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--backends", default="cudnn,flash,efficient,default", help=f"comma-separated: {', '.join(BACKENDS)}")
    p.add_argument("--scale", type=float, default=1.0, help="multiply batch and sequence by this (CPU checks: 0.05)")
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--out", type=output_dir, default="bench_results/attention_backends")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not args.backends or any(b not in BACKENDS for b in args.backends):
        p.error(f"--backends must be taken from {', '.join(BACKENDS)}")
    return args


def _inputs(batch, heads, seq, dim, causal, padded, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, grad = (torch.randn(batch, heads, seq, dim, generator=g).to(device, dtype) for _ in range(4))
    mask = None
    if padded:  # causal, and the first half of the rows left-padded by 1/16 of the sequence
        mask = torch.ones(batch, 1, seq, seq, dtype=torch.bool, device=device).tril()
        pad = max(1, seq // 16)
        mask[: batch // 2, :, :, :pad] = False
        mask[: batch // 2, :, :pad, :pad] = torch.eye(pad, dtype=torch.bool, device=device)  # padded queries see themselves
    return q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), grad, mask


def run(args) -> dict:
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, (batch, heads, seq, dim, causal, padded) in SHAPES.items():
        batch, seq = max(2, round(batch * args.scale)), max(16, round(seq * args.scale))
        q, k, v, grad, mask = _inputs(batch, heads, seq, dim, causal, padded, device, dtype)
        is_causal = causal and mask is None
        flops = 4 * batch * heads * seq * seq * dim * (0.5 if causal else 1.0)
        first = None
        for backend in args.backends:
            row = dict(shape=name, dims=f"{batch}×{heads}×{seq}×{dim}", backend=backend)
            chosen = BACKENDS[backend]
            try:
                with sdpa_kernel([chosen]) if chosen is not None else torch.enable_grad():

                    def forward():
                        with torch.no_grad():
                            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)

                    def forward_backward():
                        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal).backward(grad)

                    out = forward().float()
                    fwd = time_fn(forward, device, warmup=2, repeats=args.repeats)
                    both = time_fn(forward_backward, device, warmup=2, repeats=args.repeats)
                row.update(fwd_ms=fwd.median_ms, fwd_bwd_ms=both.median_ms,
                           fwd_tflops=flops / fwd.median_ms / 1e9, fwd_bwd_tflops=3.5 * flops / both.median_ms / 1e9)  # fmt: skip
                first = out if first is None else first
                row["max_diff_vs_first"] = float((out - first).abs().max())
            except RuntimeError as e:  # a backend that does not take this shape, mask or device
                row["error"] = str(e).splitlines()[0][:120]
            rows.append(row)
            print(row, flush=True)
    return dict(command=command_line(), environment=environment_info(device), dtype=str(dtype), rows=rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = run(args)
    columns = [("shape", "attention"), ("dims", "B×H×S×D"), ("backend", "backend"), ("fwd_ms", "fwd ms"),
               ("fwd_bwd_ms", "fwd+bwd ms"), ("fwd_tflops", "fwd TFLOP/s"), ("fwd_bwd_tflops", "fwd+bwd TFLOP/s"),
               ("max_diff_vs_first", "max |diff| vs first"), ("error", "not run")]  # fmt: skip
    table = markdown_table(payload["rows"], columns)
    write_results(args.out, "attention_backends", payload, table, header="SDPA backends at the training step's shapes")
    print(table)
    return 0


if __name__ == "__main__":
    from benchmarks.common import run_harness
    sys.exit(run_harness(main))
