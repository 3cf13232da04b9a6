#!/usr/bin/env bash
# The training layer ops on one GPU (nvidia-h200, ~8 minutes): the graphed-block GPU tests with the Triton kernels
# compiled and the attention guard's (cuDNN's masked backward, engine/model/compat.py), the block with transformers' modules vs the Triton kernels with their backward (ms, kernels per
# step, gradient differences; `bench_block_ops`), the ZeRO-2 training step with each, and SDPA's backends at the
# step's attention shapes. Usage: benchmarks/gpu/block_ops.sh OUT
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
STEP_TAIL=8
source "$(dirname "$0")/lib.sh"
step block_graph_tests 120 env TRITON_INTERPRET=0 python -m pytest -q -p no:cacheprovider tests/test_latent_block.py tests/test_compat.py -k cuda
step block_ops 200 python -m benchmarks.bench_block_ops --model internvl3-1b-geometry --device cuda --dtype bfloat16 \
  --batch-size 64 --latents 6 --out "$OUT/block_ops"
step block_ops_step 150 python -m benchmarks.bench_train_step $B1 --zero-stages 2 --stages 3 --batch-size 64 $FAST \
  --optimizers adamw_fused --zero-settings layer_ops=reference --zero-settings default --out "$OUT/block_ops_step"
step attention_backends 60 python -m benchmarks.bench_attention_backends --device cuda --out "$OUT/attention_backends"
