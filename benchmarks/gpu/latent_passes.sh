#!/usr/bin/env bash
# The CUDA-graphed latent passes on one GPU: the graph tests, then the latent forward (graphed engine, the same
# engine with transformers latent passes, the baselines) at the target configuration, the naive scheme at a
# batch where it fits, the DeepSpeed ZeRO-2 training step and a torch.profiler trace of one graphed step.
# Usage: benchmarks/gpu/latent_passes.sh OUT
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
STEP_TAIL=4
source "$(dirname "$0")/lib.sh"
step graph_tests 120 python -m pytest -q -p no:cacheprovider tests/test_latent_block.py
step latent_forward 300 python -m benchmarks.bench_latent_forward --model internvl3-1b-geometry --device cuda --dtype bfloat16 \
  --stages 0,1,2,3 --c-thought 2 --batch-sizes 32 --text-len 64 --methods engine,engine_eager,fullpass,naive,plain \
  --max-batch naive=8 --time-budget-s 200 --out "$OUT/latent_forward"
step naive_b8 150 python -m benchmarks.bench_latent_forward --model internvl3-1b-geometry --device cuda --dtype bfloat16 \
  --stages 1,3 --c-thought 2 --batch-sizes 8 --text-len 64 --methods engine,naive,plain --check-rows 2 \
  --time-budget-s 100 --out "$OUT/naive_b8"
step train_step 200 python -m benchmarks.bench_train_step --model internvl3-1b-geometry --device cuda --dtype bfloat16 \
  --zero-stages 2 --stages 0,3 --c-thought 2 --batch-size 8,16 --text-len 64 --image-tokens 256 --warmup 3 --steps 10 --out "$OUT/train_step"
step profile 150 python -m benchmarks.bench_latent_forward --model internvl3-1b-geometry --device cuda --dtype bfloat16 \
  --stages 3 --c-thought 2 --batch-sizes 32 --text-len 64 --methods engine,plain --profile torch --repeats 5 --out "$OUT/profile"
