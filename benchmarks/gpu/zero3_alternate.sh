#!/usr/bin/env bash
# ZeRO-3's process-wide host replacements, each against DeepSpeed's own inside one engine (nvidia-h200-x2, about
# 6 minutes): engines built one after another on one instance differ by more than each of these saves (batch 16:
# the same setting at 367-485 ms in four engines, benchmarks/RESULTS.md), so `bench_train_step --alternate`
# times the same engine in rounds, each round the row's replacements as built and each one switched off in turn,
# the order reversed every other round. 1B geometry, 6 latents, batch 16 and 64 per rank.
# Usage: benchmarks/gpu/zero3_alternate.sh OUT
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
STEP_TAIL=16
source "$(dirname "$0")/lib.sh"

step zero3_alternate 540 $RUN2 -m benchmarks.bench_train_step $B1 --batch-size 16,64 --optimizers adamw_fused \
  --matmul-size 0 --stages 3 --zero-stages 3 --warmup 3 --steps 4 --alternate all --alternate-rounds 6 \
  --alternate-steps 5 --out "$OUT/zero3_alternate"
