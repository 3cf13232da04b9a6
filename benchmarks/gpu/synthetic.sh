#!/usr/bin/env bash
# The synthetic task on one GPU: CoCoNuT's curriculum against multimodal CoT and no-CoT on the same data, then one
# table of final validation accuracy and generated tokens per answer. Usage: benchmarks/gpu/synthetic.sh OUT
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT"
CFG=recipes/configs/synthetic_gpu.yaml
run() { local name=$1; shift; echo "=== $name ($(date +%T))"; timeout 280 python recipes/train_coconut.py --config $CFG --set save_path="$OUT" --set name=$name "$@" > "$OUT/$name.log" 2>&1; echo "exit $? for $name"; grep "validation:" "$OUT/$name.log" | tail -n 8; }
run synthetic-gpu
DATA="$OUT/synthetic-gpu/data"  # the baselines train on the very same samples
run synthetic-gpu-cot --set cot=true --set num_epochs=4 --set train_path=$DATA/train.jsonl --set val_path=$DATA/val.jsonl
run synthetic-gpu-nocot --set no_cot=true --set num_epochs=4 --set train_path=$DATA/train.jsonl --set val_path=$DATA/val.jsonl
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
