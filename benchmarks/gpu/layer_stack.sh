#!/usr/bin/env bash
# After a change to the layer stack or the training path, on one GPU (nvidia-h200, at most ~9.5 minutes): the CUDA-graph
# tests of the latent block, the latent forward against the plain pass (the graphed block's cost), and the training
# step at batch 64 (InternVL3-1B geometry): ZeRO-2 with the optimizer before/after and per-phase times, ZeRO-3 on one
# GPU with the language model gathered once per call against per-module gathers, and the 2B geometry.
# Usage: benchmarks/gpu/layer_stack.sh OUT
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
STEP_TAIL=8
source "$(dirname "$0")/lib.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
step graph_tests 80 python -m pytest -q -p no:cacheprovider tests/test_latent_block.py
step latent_forward 110 python -m benchmarks.bench_latent_forward $B1 --stages 0,3 --batch-sizes 32 \
  --methods engine,engine_eager,plain --time-budget-s 80 --out "$OUT/latent_forward"
step optimizer 170 python -m benchmarks.bench_train_step $B1 --zero-stages 2 --stages 0,3 --batch-size 64 $FAST \
  --optimizers adamw_foreach,adamw_fused --zero-settings "$DS_DEFAULTS" --zero-settings default \
  --matmul-size 8192 --time-budget-s 130 --out "$OUT/optimizer"
step zero3 100 python -m benchmarks.bench_train_step $B1 --zero-stages 3 --stages 3 --batch-size 64 $FAST \
  --optimizers adamw_fused --zero-settings default --zero-settings zero3_leaf_language_model=false \
  --time-budget-s 70 --out "$OUT/zero3"
step geometry_2b 60 python -m benchmarks.bench_train_step --model internvl3-2b-geometry --device cuda --dtype bfloat16 \
  --c-thought 2 --text-len 64 --image-tokens 256 --zero-stages 2 --stages 0,3 --batch-size 32 $FAST \
  --optimizers adamw_fused --time-budget-s 40 --out "$OUT/geometry_2b"
