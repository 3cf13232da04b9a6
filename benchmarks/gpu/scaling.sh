#!/usr/bin/env bash
# Training-step scaling on two GPUs of one host (nvidia-h200-x2): the one-GPU ZeRO-2 baseline on GPU 0, then two
# ranks under torchrun with ZeRO-2 and ZeRO-3 against it. Usage: benchmarks/gpu/scaling.sh OUT
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $? for $name"; tail -n 12 "$OUT/$name.log"; }
COMMON="--model internvl3-1b-geometry --device cuda --dtype bfloat16 --stages 0,3 --c-thought 2 --batch-size 8,16 --text-len 64 --image-tokens 256 --warmup 3 --steps 10"
step ts_1gpu 200 env CUDA_VISIBLE_DEVICES=0 python -m benchmarks.bench_train_step $COMMON --zero-stages 2 --out "$OUT/ts_1gpu"
step ts_2gpu 330 python -m torch.distributed.run --nproc_per_node 2 -m benchmarks.bench_train_step $COMMON --zero-stages 2,3 \
  --baseline "$OUT/ts_1gpu" --out "$OUT/ts_2gpu"
