#!/usr/bin/env bash
# Training-step throughput (DeepSpeed ZeRO-2, InternVL3-1B geometry), generation with a bounded batch-1 baseline,
# and a torch.profiler trace of one latent training step. Usage: benchmarks/gpu/steps.sh OUT
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
STEP_TAIL=4
source "$(dirname "$0")/lib.sh"
step train_step 200 python -m benchmarks.bench_train_step --model internvl3-1b-geometry --device cuda --dtype bfloat16 \
  --zero-stages 2 --stages 0,3 --c-thought 2 --batch-size 8,16 --text-len 64 --image-tokens 256 --warmup 3 --steps 10 --out "$OUT/train_step"
step profile 120 python -m benchmarks.bench_latent_forward --model internvl3-1b-geometry --device cuda --dtype bfloat16 \
  --stages 1 --c-thought 2 --batch-sizes 32 --text-len 64 --methods engine,plain --profile torch --repeats 5 --out "$OUT/profile"
step generate 200 python -m benchmarks.bench_generate --model internvl3-1b-geometry --device cuda --dtype bfloat16 \
  --stages 0,3 --batch-sizes 1,8,64 --kv-cache dynamic,paged --naive-rows 1 --naive-repeats 1 --time-budget-s 160 --out "$OUT/generate"
