#!/usr/bin/env bash
# The paper's Table 1 on the built-in task, on one GPU: CoCoNuT, CoT, no-CoT, pause as thought, w/o curriculum and
# w/o thought, several training processes at once on the one device (benchmarks/science.py). OUT receives one
# part file per command (science_part_s<seeds>_<methods>.json), science.json/.md/.png of every part in OUT, and science.log;
# data, checkpoints and per-run logs stay in OUT_work next to it. Split the seeds over commands and merge on CPU:
#   benchmarks/gpu/science.sh OUT --seeds 0 --max-parallel 6
#   benchmarks/gpu/science.sh OUT --seeds 1,2 --max-parallel 12
#   python -m benchmarks.science aggregate --out benchmarks/results/science OUT/science_part_*.json
# Usage: benchmarks/gpu/science.sh OUT [--seeds 0,1,2] [--methods ...] [--max-parallel N] [--time-limit-s S] [--set K=V]
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR [science.py run options]}
shift
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true
python -m benchmarks.science run --out "$OUT" --work "${OUT%/}_work" "$@" 2>&1 | tee "$OUT/science.log"
exit "${PIPESTATUS[0]}"
