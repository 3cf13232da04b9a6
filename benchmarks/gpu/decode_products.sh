#!/usr/bin/env bash
# The decode step's products and fused kernels on one GPU (about 7 minutes): the GPU tests of the split-K kernel and
# of the decode fusions (the rotary embedding inside the attention among them, also under memcheck), the split-K
# kernel's settings swept against cuBLAS at the InternVL3-1B geometry (`benchmarks.bench_decode_linear`), its default
# settings at the 2B and 8B geometries, then the whole decode step at 1B and 2B (`bench_paged_kv --sections step`:
# the default, without the split-K products and with the rotary embedding outside the attention, alternating in
# one runner, then runner against runner). The GPU's clocks are
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
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_decode_linear.py tests/test_decode_fusions.py -k gpu \
  > "$RAW/tests.log" 2>&1
echo "exit $? for tests"; tail -n 3 "$RAW/tests.log"
echo "=== memcheck of the rotary embedding inside the attention ($(date +%T))"
PATH=$PATH:/usr/local/cuda/bin timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 python -m pytest -q \
  -p no:cacheprovider tests/test_decode_fusions.py -k "gpu_rotary_paged" > "$RAW/memcheck.log" 2>&1
echo "exit $? for memcheck"; grep -E "ERROR SUMMARY|passed|failed" "$RAW/memcheck.log" | tail -n 3
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
cp "$RAW/tests.log" "$RAW/memcheck.log" "$OUT/" 2>/dev/null
