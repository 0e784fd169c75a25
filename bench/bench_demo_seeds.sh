#!/usr/bin/env bash
# The demo recipe's spread over seeds and thread counts: for each (seed, threads), train_mm.py --preset=demo from
# nothing on the demo's tower (train_clip.py's, made once), then the easy-vqa evaluation; one table at the end (and in
# $OUT/table.md). The seed moves every random choice of the run (LM and projector weights, batches, held-out split);
# the thread count moves the order of some additions (see the README).
#
#   bash bench/bench_demo_seeds.sh                     # seeds 1337 1 2, threads 1 and 2: six runs in sequence
#   SEEDS="1337 7" THREADS="2" bash bench/bench_demo_seeds.sh
#   JOBS=2 THREADS=1 bash bench/bench_demo_seeds.sh    # two 1-thread runs side by side on a 2-core machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-out/demo-seeds}
SEEDS=${SEEDS:-1337 1 2}
THREADS=${THREADS:-1 2}
JOBS=${JOBS:-1}
VISION=out/mm-demo/clip/ckpt/vision
mkdir -p "$OUT"
[ -f "$VISION/config.json" ] || "$PY" train_clip.py --preset=demo

one() {  # seed threads
    local dir="$OUT/s$1-t$2"
    [ -f "$dir/mm/eval.json" ] && return
    rm -rf "$dir"
    local t0=$(date +%s)
    OMP_NUM_THREADS=$2 "$PY" train_mm.py --preset=demo --seed="$1" --vision="$VISION" --out_dir="$dir/mm" > "$dir.log" 2>&1
    echo $(( $(date +%s) - t0 )) > "$dir/seconds.txt"
}

running=0
for t in $THREADS; do
    for s in $SEEDS; do
        one "$s" "$t" &
        running=$((running + 1))
        if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
    done
done
wait

"$PY" - "$OUT" <<'EOF'
"""The table of every finished run under OUT."""
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
rows, alls = [], []
for run in sorted(out.glob("s*-t*/mm/eval.json")):
    folder = run.parent.parent
    seed, threads = folder.name[1:].split("-t")
    ev = json.loads(run.read_text())
    acc = lambda name: f"{100 * ev['by_type'][name]:.1f}%" if name in ev["by_type"] else "-"
    seconds = (folder / "seconds.txt").read_text().strip() if (folder / "seconds.txt").exists() else "?"
    alls.append(100 * ev["accuracy"])
    rows.append(f"| {seed} | {threads} | {acc('colour')} | {acc('shape')} | {acc('yes/no')} | "
                f"**{100 * ev['accuracy']:.2f}%** | {int(seconds) // 60}m{int(seconds) % 60:02d}s |")
table = "\n".join(["| seed | threads | colour | shape | yes/no | all | multimodal wall time |",
                   "|---:|---:|---:|---:|---:|---:|---:|"] + rows)
if alls:
    table += (f"\n\n{len(alls)} runs: median {statistics.median(alls):.2f}%, min {min(alls):.2f}%, "
              f"max {max(alls):.2f}%")
(out / "table.md").write_text(table + "\n")
print(table)
EOF
