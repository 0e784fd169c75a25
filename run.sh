#!/usr/bin/env bash
# omniphi in one command, offline, on a CPU:
#   bash run.sh            venv + data + pretrain + clip, align, instruct + report, then the chat on 127.0.0.1:8000
#   bash run.sh --check    steps 1-4 only; exits non-zero if the LM loss drop < 3.0 or easy-vqa accuracy < 90%
#   bash run.sh test       venv + test requirements, then the test suite
# A second run reuses everything already built (and resumes an interrupted stage).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${OMNIPHI_VENV:-.venv}
PY="$VENV/bin/python"

install() {  # $@: requirement files; reinstalls only when they change
    [ -x "$PY" ] || python3 -m venv "$VENV"
    local stamp="$VENV/.omniphi-$(cat "$@" | sha1sum | cut -c1-12)"
    if [ ! -f "$stamp" ]; then
        "$PY" -m pip install -q --upgrade pip
        "$PY" -m pip install -q $(printf -- '-r %s ' "$@")
        touch "$stamp"
    fi
}

if [ "${1:-}" = "test" ]; then
    shift
    install requirements.txt requirements-dev.txt
    exec "$PY" -m pytest -q tests "$@"
fi

CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1
install requirements.txt
mkdir -p out/demo
export PYTHONUNBUFFERED=1

stage() {  # stage NAME DONE_FILE RUN_DIR COMMAND...: run (or resume) unless DONE_FILE exists; time it
    local name=$1 done=$2 dir=$3; shift 3
    if [ -f "$done" ]; then echo "== $name: done already ($done)"; return; fi
    local resume=""
    if [ -n "$(find "$dir" -name train_state.pt 2>/dev/null)" ]; then
        resume="--resume"
        echo "== $name: resuming the interrupted run in $dir"
    fi
    echo "== $name: $*"
    local t0=$(date +%s)
    "$@" $resume
    echo "$name $(( $(date +%s) - t0 ))" >> out/demo/times.txt
}

stage pretrain out/lm-demo/report.md out/lm-demo "$PY" train_lm.py --preset=demo
stage multimodal out/mm-demo/eval.json out/mm-demo "$PY" train_mm.py --preset=demo

"$PY" - "$CHECK" <<'PYEOF'
"""Summary of the demo: LM loss drop, easy-vqa accuracy, wall time per stage -> out/demo/REPORT.md."""
import json, re, shutil, sys
from pathlib import Path

import torch

lm = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", Path("out/lm-demo/report.md").read_text(), re.M))
ev = json.loads(Path("out/mm-demo/eval.json").read_text())
times = {}
for line in Path("out/demo/times.txt").read_text().split("\n") if Path("out/demo/times.txt").exists() else []:
    if line.strip():
        name, seconds = line.split()
        times[name] = int(seconds)  # the latest run of a stage wins
initial, final = float(lm["initial val loss"]), float(lm["final val loss"])
accuracy = ev["accuracy"]
rows = [("LM initial val loss", f"{initial:.3f}"), ("LM final val loss", f"{final:.3f}"),
        ("LM loss drop (target >= 3.0)", f"{initial - final:.3f}"),
        ("easy-vqa test accuracy (target >= 90%)", f"{100 * accuracy:.1f}% of {ev['n']:,} questions")]
rows += [(f"easy-vqa accuracy, {k} questions", f"{100 * v:.1f}%") for k, v in ev.get("by_type", {}).items()]
for name in ("clip", "align", "instruct"):  # the parts of the multimodal stage, as its checkpoints recorded them
    state = Path(f"out/mm-demo/{name}/ckpt/train_state.pt")
    if state.is_file():
        times[f"multimodal: {name}"] = round(torch.load(state, map_location="cpu", weights_only=False)["train_time_s"])
times["multimodal: easy-vqa evaluation"] = round(ev["seconds"])
rows += [(f"wall time: {k}", f"{v // 60}m {v % 60:02d}s") for k, v in times.items()]
table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
shutil.copy("out/lm-demo/loss.png", "out/demo/lm_loss.png")
shutil.copy("out/mm-demo/instruct/loss.png", "out/demo/mm_loss.png")
Path("out/demo/REPORT.md").write_text("# omniphi offline demo\n\n" + table +
                                      "\n\n![LM loss](lm_loss.png)\n\n![instruct loss](mm_loss.png)\n")
print("\n" + table + "\n\nwritten to out/demo/REPORT.md")
ok = initial - final >= 3.0 and accuracy >= 0.90
if sys.argv[1] == "1":
    print("check:", "PASSED" if ok else "FAILED")
    sys.exit(0 if ok else 1)
PYEOF
[ $CHECK = 1 ] && exit 0
exec "$PY" serve.py
