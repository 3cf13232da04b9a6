# Shared by the scripts of benchmarks/gpu/ (sourced after OUT is set).
# step NAME LIMIT CMD...: runs CMD under a LIMIT-second timeout with its output in $OUT/NAME.log, then prints the
# exit status and the log's last $STEP_TAIL lines (default 6). A failed step does not stop the script.
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "exit $? for $name"
  tail -n "${STEP_TAIL:-6}" "$OUT/$name.log"
}
# NVLink multicast stays off in NCCL, PyTorch and NVSHMEM (../shared/device/README.md); torchrun's workers inherit it
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# torchrun over 2 and 4 GPUs of this host (one launch at a time: one port each)
RUN2="python -m torch.distributed.run --nproc_per_node 2 --master_port 29502"
RUN4="python -m torch.distributed.run --nproc_per_node 4 --master_port 29504"
# the training-step harness at the InternVL3-1B geometry, bf16, 6 latents at stage 3 (c_thought 2)
B1="--model internvl3-1b-geometry --device cuda --dtype bfloat16 --c-thought 2 --text-len 64 --image-tokens 256"
# few timed steps, then the synchronised phases; no matmul calibration. Three untimed steps: under ZeRO-3 the
# latent block runs its first two calls eagerly and captures its graphs at the third
FAST="--warmup 3 --steps 4 --phases --phase-steps 2 --matmul-size 0"
# DeepSpeed's own ZeRO-2 defaults, i.e. what deepspeed_config gave before the per-stage settings
DS_DEFAULTS="overlap_comm=false,contiguous_gradients=true,reduce_bucket_size=5e8,allgather_bucket_size=5e8"
