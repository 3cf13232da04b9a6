#!/usr/bin/env bash
# Training-step scaling over the GPUs of one host (torchrun, NCCL), DeepSpeed ZeRO-2 and ZeRO-3, 6 latents and none.
#   1B geometry: the one-GPU run on GPU 0 (ZeRO-2 and ZeRO-3) is the baseline of each stage; 2 (and on four GPUs, 4)
#   ranks are compared with it. ZeRO-3 against ZeRO-2 on the same GPUs: the samples/s of their rows in one table.
#   8B geometry: it does not fit one H200 (benchmarks/gpu/train_scale.sh), so 2 ranks on GPUs 0,1 are its baseline
#   and 4 ranks are compared with them (the 2->4 efficiency target); the batch sweep finds the one that fills memory.
# Usage: benchmarks/gpu/scaling.sh OUT N_GPUS PART      (each PART fits one 10-minute device command)
#   nvidia-h200-x2:  scaling.sh OUT 2 1b    # 1 -> 2 GPUs, 1B                        (at most 7 min)
#                    scaling.sh OUT 2 8b    # 8B on 2 GPUs                           (at most 9 min)
#   nvidia-h200-x4:  scaling.sh OUT 4 1b    # 1 -> 2 -> 4 GPUs, 1B                   (at most 10 min)
#                    scaling.sh OUT 4 8b    # 8B on 2 GPUs (baseline), then 4        (at most 9 min)
# Ends with the plot of samples/s against GPUs (OUT/plots, where matplotlib is; else the command to make it elsewhere)
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR N_GPUS 1b|8b}
N=${2:?usage: $0 OUT_DIR N_GPUS 1b|8b}
PART=${3:?usage: $0 OUT_DIR N_GPUS 1b|8b}
mkdir -p "$OUT"
STEP_TAIL=12
source "$(dirname "$0")/lib.sh"
TRAIN="-m benchmarks.bench_train_step"
COMMON="--device cuda --dtype bfloat16 --c-thought 2 --text-len 64 --image-tokens 256 --optimizers adamw_fused --matmul-size 0"

case "$PART" in
1b)
  M1="--model internvl3-1b-geometry $COMMON --stages 0,3 --batch-size 16,64 --warmup 3 --steps 6"
  step ts_1b_1gpu 200 env CUDA_VISIBLE_DEVICES=0 python -m benchmarks.bench_train_step $M1 --zero-stages 2,3 --time-budget-s 180 \
    --out "$OUT/ts_1b_1gpu"
  step ts_1b_2gpu 210 env CUDA_VISIBLE_DEVICES=0,1 $RUN2 $TRAIN $M1 --zero-stages 2,3 --baseline "$OUT/ts_1b_1gpu" \
    --time-budget-s 170 --out "$OUT/ts_1b_2gpu"
  if [ "$N" -ge 4 ]; then
    step ts_1b_4gpu 210 $RUN4 $TRAIN $M1 --zero-stages 2,3 --baseline "$OUT/ts_1b_1gpu" --time-budget-s 170 \
      --out "$OUT/ts_1b_4gpu"
  fi
  ;;
8b)
  M8="--model internvl3-8b-geometry $COMMON --warmup 3 --steps 4"  # ZeRO-3's latent graphs: at the third step
  if [ "$N" -ge 4 ]; then
    step ts_8b_2gpu 250 env CUDA_VISIBLE_DEVICES=0,1 $RUN2 $TRAIN $M8 --zero-stages 2,3 --stages 3 --batch-size 8 \
      --time-budget-s 200 --out "$OUT/ts_8b_2gpu"
    step ts_8b_4gpu 290 $RUN4 $TRAIN $M8 --zero-stages 3,2 --stages 3,0 --batch-size 8,16,32 \
      --baseline "$OUT/ts_8b_2gpu" --time-budget-s 230 --out "$OUT/ts_8b_4gpu"
  else
    step ts_8b_2gpu 540 $RUN2 $TRAIN $M8 --zero-stages 2,3 --stages 3,0 --batch-size 8,16 --time-budget-s 460 \
      --out "$OUT/ts_8b_2gpu"
  fi
  ;;
*)
  echo "PART must be 1b or 8b, got $PART" >&2
  exit 2
  ;;
esac

# samples/s against GPUs for every part measured so far under OUT (both parts go into one figure when both ran)
if python -c "import matplotlib" >/dev/null 2>&1; then
  python -m benchmarks.plot_results "$OUT"/ts_*/train_step.json --out "$OUT/plots" 2>&1 | tail -n 2
else
  echo "matplotlib is not installed here: plot elsewhere with python -m benchmarks.plot_results $OUT/ts_*/train_step.json --out PLOTS"
fi
