#!/usr/bin/env bash
# Kernel reports on one GPU: numerics, bandwidth against the measured copy bandwidth, the timed pytest-benchmark
# suites, and one compute-sanitizer memcheck pass over every Triton kernel. Usage: benchmarks/gpu/kernels.sh OUT
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
STEP_TAIL=5
source "$(dirname "$0")/lib.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
step latent_inject 150 python -m benchmarks.bench_latent_inject --out "$OUT/latent_inject"
step paged_kv 330 python -m benchmarks.bench_paged_kv --out "$OUT/paged_kv"
step suites 150 python -m pytest benchmarks -m benchmark -k gpu -q -p no:cacheprovider --benchmark-json "$OUT/kernels.json"
# memcheck: every kernel once (untimed) at the GPU shapes; the sanitizer reports into the log
# (the injection report's tiny geometry on the GPU: at the 151k-vocabulary shapes the shadow memory does not fit)
step memcheck_inject 150 compute-sanitizer --tool memcheck --error-exitcode 3 python -m benchmarks.bench_latent_inject --smoke --device cuda --sections numerics --out "$OUT/memcheck_inject"
step memcheck_paged 150 compute-sanitizer --tool memcheck --error-exitcode 3 python -m benchmarks.bench_paged_kv --out "$OUT/memcheck_paged" --sections numerics
step memcheck_decode_fusions 120 compute-sanitizer --tool memcheck --error-exitcode 3 python -m pytest benchmarks/bench_decode_fusions.py -m benchmark -k gpu --benchmark-disable -q -p no:cacheprovider
