#!/usr/bin/env bash
# The prepared GPU check (one call on a lent H100/H200, under 8 minutes): GPU tests, then the Phi-2-size
# benchmark. Results land in $OUT (default out/bench-gpu): gpu_tests.txt, gpu_bench.md, gpu_bench.json.
#
#   bash bench/gpu.sh --wheels   here, online, once: the lent machine's image has torch, transformers, tiktoken and
#                                safetensors but not bitsandbytes, and cannot download: its wheel goes to .whl/
#   bash bench/gpu.sh            there, with .whl carried along
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--wheels" ]; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 -d .whl \
        "$(grep -i '^bitsandbytes' requirements.txt)" || exit
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    ls -la .whl
    exit
fi
OUT=${OUT:-out/bench-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch, transformers, bitsandbytes, tiktoken, safetensors" || echo "a package is missing (see above)"
timeout 150 "$PY" -m pytest -q tests/test_gpu.py 2>&1 | tail -30 > "$OUT/gpu_tests.txt"
timeout 330 "$PY" bench/bench_gpu.py --out "$OUT" 2>&1 | tail -40 | tee "$OUT/gpu_bench.log"
cat "$OUT/gpu_tests.txt"
