#!/usr/bin/env bash
# ZeRO-3's host-side replacements on two GPUs (nvidia-h200-x2), each against DeepSpeed's own in one run: the GPU tests
# of the replacements (two ranks side by side with DeepSpeed's, the device step), then the training step at batch 64
# (1B geometry, 0 and 6 latents) with ZeRO-2 as the reference, per setting:
#   default                              the trainer's ZeRO-3 (gathers coalesced, releases plain, the linear, the device step,
#                                        the stream calls)
#   grad_checks=multi_tensor             the same with DeepSpeed's step
#   grad_checks=deepspeed                DeepSpeed's own throughout
#   zero3_flat_leaf_reduction=true       the default plus the leaves' gradients reduced together (off: measured slower)
# Usage: benchmarks/gpu/zero3_host.sh OUT                                      (at most 10 min)
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
STEP_TAIL=12
source "$(dirname "$0")/lib.sh"

step tests 150 python -m pytest -q -p no:cacheprovider tests/test_distributed.py tests/test_zero_step.py \
  tests/test_zero3_gathers.py tests/test_accelerator_streams.py -k "cuda or stream"
step zero3_ab 420 $RUN2 -m benchmarks.bench_train_step $B1 --batch-size 64 --optimizers adamw_fused --matmul-size 0 \
  --stages 0,3 --zero-stages 3,2 --warmup 3 --steps 6 --phases --phase-steps 2 --zero-settings default \
  --zero-settings grad_checks=multi_tensor --zero-settings grad_checks=deepspeed \
  --zero-settings zero3_flat_leaf_reduction=true --time-budget-s 360 --out "$OUT/zero3_ab"
