#!/usr/bin/env bash
# Model-level reports on one GPU at the InternVL3-1B geometry (random weights, bf16): the latent forward against
# its baselines at the target configuration, and generation. Usage: benchmarks/gpu/model.sh OUT
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
STEP_TAIL=4
source "$(dirname "$0")/lib.sh"
step latent_inject_bw 90 python -m benchmarks.bench_latent_inject --out "$OUT/latent_inject" --sections bandwidth,schedule
step latent_forward 270 python -m benchmarks.bench_latent_forward --model internvl3-1b-geometry --device cuda --dtype bfloat16 \
  --stages 0,1,2,3 --c-thought 2 --batch-sizes 32 --text-len 64 --time-budget-s 210 --out "$OUT/latent_forward"
step generate 200 python -m benchmarks.bench_generate --model internvl3-1b-geometry --device cuda --dtype bfloat16 \
  --batch-sizes 1,8,64 --kv-cache dynamic,paged --time-budget-s 150 --out "$OUT/generate"
