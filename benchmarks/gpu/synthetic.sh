#!/usr/bin/env bash
# The synthetic task on one GPU: CoCoNuT's curriculum against multimodal CoT and no-CoT on the same data, then one
# table of validation accuracy and generated tokens per answer per epoch. The CoCoNuT run's stage-0 epochs are its
# CoT model; RUNS picks runs (default "coconut nocot cot"). Usage: benchmarks/gpu/synthetic.sh OUT [RUNS...]
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
CFG=recipes/configs/synthetic_gpu.yaml
RUNS=${*:2}
RUNS=${RUNS:-coconut nocot cot}
run() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T))"; timeout "$limit" python recipes/train_coconut.py --config $CFG --set save_path="$OUT" --set name=$name "$@" > "$OUT/$name.log" 2>&1; echo "exit $? for $name"; grep "validation:" "$OUT/$name.log" | tail -n 8; }
# Each run generates the synthetic data into its own folder from the same seed: the same samples for all three.
for r in $RUNS; do
  case $r in
    coconut) run synthetic-gpu 480 ;;
    nocot) run synthetic-gpu-nocot 300 --set no_cot=true ;;
    cot) run synthetic-gpu-cot 420 --set cot=true ;;
    *) echo "unknown run $r (coconut, nocot, cot)"; exit 2 ;;
  esac
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | epoch | stage | val accuracy % | tokens/answer | answers/s | train samples/s |")
print("|---|---|---|---|---|---|---|")
for name in ("synthetic-gpu", "synthetic-gpu-cot", "synthetic-gpu-nocot"):
    path = out / name / "history.json"
    if not path.exists():
        print(f"| {name} | — | — | (no history) | | | |"); continue
    for h in json.loads(path.read_text()):
        print(f"| {name} | {h['epoch']} | {h['stage']} | {h['val_accuracy']} | {h['tokens_per_answer']:.1f} | "
              f"{h['answers_per_second']:.0f} | {h['train_samples_per_second']:.0f} |")
PY
