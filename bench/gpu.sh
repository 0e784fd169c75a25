#!/usr/bin/env bash
# The prepared GPU check (one call on a lent H100/H200, under 8 minutes): GPU tests, then the Phi-2-size
# benchmark. Results land in $OUT (default out/bench-gpu): gpu_tests.txt, gpu_bench.md, gpu_bench.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/bench-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch, transformers, bitsandbytes" 2>/dev/null || "$PY" -m pip install -q -r requirements.txt -r requirements-dev.txt
timeout 150 "$PY" -m pytest -q tests/test_gpu.py 2>&1 | tail -30 > "$OUT/gpu_tests.txt"
timeout 330 "$PY" bench/bench_gpu.py --out "$OUT" 2>&1 | tail -40 | tee "$OUT/gpu_bench.log"
cat "$OUT/gpu_tests.txt"
