#!/usr/bin/env bash
# The training step at scale on one GPU (nvidia-h200, at most 9.5 minutes, ~8 expected): the InternVL3-1B geometry under DeepSpeed ZeRO-2
# at batch 64 with 6 latents and without, per phase (data / forward / backward / optimizer, synchronised), for the
# optimizer variants and the ZeRO settings (the settings before this change, the new per-stage defaults, a sweep,
# ZeRO-1 without gradient hooks), with and without each Liger-Kernel piece (loss differences against the reference);
# then the 2B and 8B geometries on one GPU where they fit. Each step has a time budget and a hard limit, in the order
# of importance; results so far are kept. Usage: benchmarks/gpu/train_scale.sh OUT
#   WITH_DS_FUSED_ADAM=1 adds DeepSpeed's FusedAdam (its CUDA extension builds with nvcc first: minutes).
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
STEP_TAIL=6
source "$(dirname "$0")/lib.sh"

# Liger's RMSNorm/SwiGLU/RoPE/loss kernels against the engine's paths, fp32 and bf16 (they cannot run on CPU)
step liger_tests 50 env TRITON_INTERPRET=0 python -m pytest -q -p no:cacheprovider tests/test_liger.py -k cuda
# before (torch AdamW foreach, DeepSpeed defaults) vs after (fused AdamW, the new ZeRO-2 defaults), 2x2, 0 and 6 latents
step optimizer 160 python -m benchmarks.bench_train_step $B1 --zero-stages 2 --stages 0,3 --batch-size 64 $FAST \
  --optimizers adamw_foreach,adamw_fused --zero-settings "$DS_DEFAULTS" --zero-settings default \
  --matmul-size 8192 --time-budget-s 125 --out "$OUT/optimizer"
# the gradient checks before the ZeRO-1/2 step: multi-tensor (default) vs DeepSpeed's per-gradient loops, with the
# optimizer phase of one more step under torch.profiler (its top operators and kernel launches go to the log)
step grad_checks 200 python -m benchmarks.bench_train_step $B1 --zero-stages 2,1 --stages 3,0 --batch-size 64 $FAST \
  --optimizers adamw_fused --zero-settings default --zero-settings grad_checks=deepspeed --profile-phase optimizer \
  --time-budget-s 160 --out "$OUT/grad_checks"
# Liger pieces one at a time, at 6 latents (Δ probe loss / Δ loss against none)
step liger 120 python -m benchmarks.bench_train_step $B1 --zero-stages 2 --stages 3 --batch-size 64 $FAST \
  --optimizers adamw_fused --liger none,fused_linear_cross_entropy,rms_norm,swiglu,rope --time-budget-s 90 \
  --out "$OUT/liger"
# the ZeRO-2 settings one at a time from the new defaults, at 6 latents
step zero_sweep 80 python -m benchmarks.bench_train_step $B1 --zero-stages 2 --stages 3 --batch-size 64 $FAST \
  --optimizers adamw_fused --zero-settings overlap_comm=false --zero-settings reduce_bucket_size=5e8,allgather_bucket_size=5e8 \
  --zero-settings contiguous_gradients=false --time-budget-s 50 --out "$OUT/zero_sweep"
# ZeRO-1 with its defaults: no per-parameter gradient hooks (one GPU: nothing to partition anyway)
step zero1 45 python -m benchmarks.bench_train_step $B1 --zero-stages 1 --stages 0,3 --batch-size 64 $FAST \
  --optimizers adamw_fused --out "$OUT/zero1"
# 2B on one GPU (~20 bytes/parameter of weights, gradients and Adam state: ~42 GB, fits)
step geometry_2b 60 python -m benchmarks.bench_train_step --model internvl3-2b-geometry --device cuda --dtype bfloat16 \
  --c-thought 2 --text-len 64 --image-tokens 256 --zero-stages 2 --stages 0,3 --batch-size 32 $FAST \
  --optimizers adamw_fused --out "$OUT/geometry_2b"
# 8B on one GPU: bf16 weights and gradients, fp32 master, Adam moments and DeepSpeed's fp32 gradient partition come to
# ~20 bytes/parameter = 159 GB > 141 GB, so this is expected to be recorded as out of memory (the multi-GPU runs of
# benchmarks/gpu/scaling.sh are where 8B trains)
step geometry_8b 50 python -m benchmarks.bench_train_step --model internvl3-8b-geometry --device cuda --dtype bfloat16 \
  --c-thought 2 --text-len 64 --image-tokens 256 --zero-stages 2 --stages 0 --batch-size 1 --warmup 1 --steps 2 \
  --matmul-size 0 --optimizers adamw_fused --out "$OUT/geometry_8b"
if [ "${WITH_DS_FUSED_ADAM:-0}" = 1 ]; then
  step ds_fused_adam 300 python -m benchmarks.bench_train_step $B1 --zero-stages 2 --stages 0,3 --batch-size 64 $FAST \
    --optimizers adamw_fused,deepspeed_fused_adam --out "$OUT/ds_fused_adam"
fi
