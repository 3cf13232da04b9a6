#!/usr/bin/env bash
# The decode step's matrix products on one GPU (about 6 minutes): the split-K kernel's GPU tests, its settings swept
# against cuBLAS at the InternVL3-1B geometry (`benchmarks.bench_decode_linear`), its default settings at the 2B and
# 8B geometries, then the whole decode step at 1B and 2B with and without the split-K products (`bench_paged_kv
# --sections step`: the two settings in one runner, alternating, then runner against runner). The GPU's clocks are
# logged throughout (OUT/clocks.csv). Raw logs go to RAW (default /tmp/decode_products_raw); OUT receives the reports.
# Usage: benchmarks/gpu/decode_products.sh OUT [RAW]
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR [RAW_DIR]}
RAW=${2:-/tmp/decode_products_raw}
mkdir -p "$OUT" "$RAW"
# the GPU's clocks, temperature, power and throttle reasons every 200 ms: the step's time follows the SM clock
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active \
  --format=csv -lms 200 > "$OUT/clocks.csv" 2>/dev/null &
CLOCKS=$!
trap 'kill $CLOCKS 2>/dev/null' EXIT
echo "=== GPU tests ($(date +%T))"
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_decode_linear.py -k gpu > "$RAW/tests.log" 2>&1
echo "exit $? for tests"; tail -n 3 "$RAW/tests.log"
echo "=== sweep, 1b ($(date +%T))"
timeout 300 python -m benchmarks.bench_decode_linear --out "$RAW/1b" --geometry 1b > "$RAW/1b.log" 2>&1
echo "exit $? for the 1b sweep"; grep -E "cublas|default|best|FAILED" "$RAW/1b.log" | tail -n 60
cp "$RAW/1b/bench_decode_linear.json" "$OUT/decode_linear_1b.json" 2>/dev/null
for g in 2b 8b; do
  echo "=== default settings, $g ($(date +%T))"
  timeout 120 python -m benchmarks.bench_decode_linear --out "$RAW/$g" --geometry "$g" --no-sweep > "$RAW/$g.log" 2>&1
  echo "exit $? for $g"; grep -E "cublas|default|FAILED" "$RAW/$g.log" | tail -n 30
  cp "$RAW/$g/bench_decode_linear.json" "$OUT/decode_linear_$g.json" 2>/dev/null
done
for g in 1b 2b; do
  echo "=== decode step, $g ($(date +%T))"
  timeout 300 python -m benchmarks.bench_paged_kv --geometry "$g" --sections step --out "$RAW/step_$g" > "$RAW/step_$g.log" 2>&1
  echo "exit $? for the $g step"; grep -E "us/step|FAILED|sharing|logits against|alternating" "$RAW/step_$g.log" | grep -v "lm_head alone" | head -n 40
  cp "$RAW/step_$g/bench_paged_kv.json" "$OUT/paged_kv_step_$g.json" 2>/dev/null
done
cp "$RAW/tests.log" "$OUT/" 2>/dev/null
