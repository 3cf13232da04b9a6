#!/usr/bin/env bash
# Decoding near the memory floor, on one GPU (about 6 minutes): the paged-KV report (numerics of every kernel
# configuration first, the decode-attention sweep against its HBM floor, the whole decode step against its floor at
# batch 64, 8 and 1 with the variants, generate() per step, prefix sharing). Raw outputs go to RAW (default
# /tmp/decode_raw); OUT receives the report's markdown and JSON only. Usage: benchmarks/gpu/decode.sh OUT [RAW]
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR [RAW_DIR]}
RAW=${2:-/tmp/decode_raw}
mkdir -p "$OUT" "$RAW"
echo "=== paged_kv ($(date +%T))"
timeout 330 python -m benchmarks.bench_paged_kv --out "$RAW/paged_kv" > "$RAW/paged_kv.log" 2>&1
echo "exit $? for paged_kv"
tail -n 5 "$RAW/paged_kv.log"
cp "$RAW/paged_kv/bench_paged_kv.md" "$RAW/paged_kv/bench_paged_kv.json" "$OUT/" 2>/dev/null
