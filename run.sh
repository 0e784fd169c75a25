#!/usr/bin/env bash
# omniphi in one command, offline, on a CPU:
#   bash run.sh            venv + data + pretrain + tower + instruct + report, then the chat on 127.0.0.1:8000
#   bash run.sh --check    the pipeline without the chat; exits non-zero if the LM loss drop < 3.0 or easy-vqa < 90%
#   bash run.sh test       venv + test requirements, then the test suite (extra arguments go to pytest)
#   bash run.sh --help     this text
# A second run reuses everything already built (and resumes an interrupted stage).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${OMNIPHI_VENV:-.venv}
PY="$VENV/bin/python"
T0=$(date +%s)

usage() { sed -n '2,7s/^# \{0,1\}//p' "$0"; }
say() { local s=$(( $(date +%s) - T0 )); printf '[%dm%02ds] %s\n' $((s / 60)) $((s % 60)) "$*"; }

case "${1:-}" in
    ""|--check|test) ;;
    -h|--help|help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
esac
if [ "${1:-}" != test ] && [ $# -gt 1 ]; then
    echo "run.sh: unexpected arguments after '$1': ${*:2}" >&2; usage >&2; exit 2
fi

install() {  # $@: requirement files; reinstalls only when they change
    if [ ! -x "$PY" ]; then say "creating the virtual environment $VENV"; python3 -m venv "$VENV"; fi
    local stamp="$VENV/.omniphi-$(cat "$@" | sha1sum | cut -c1-12)"
    if [ ! -f "$stamp" ]; then
        say "installing $* into $VENV (a few minutes the first time: torch, transformers, ...)"
        "$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
        "$PY" -m pip install -q $(printf -- '-r %s ' "$@") 2>&1 | grep -v "^WARNING: Location" || true
        "$PY" -c "import torch" || { echo "run.sh: the install failed (see above)" >&2; exit 1; }
        touch "$stamp"
        say "installed"
    fi
}

if [ "${1:-}" = "test" ]; then
    shift
    install requirements.txt requirements-dev.txt
    missing=""
    command -v espeak-ng > /dev/null || missing="$missing espeak-ng (speech tests)"
    [ -x /usr/bin/chromium ] || missing="$missing chromium (browser tests)"
    [ -z "$missing" ] || say "missing system packages, their tests are skipped:$missing (apt-get install espeak-ng chromium)"
    exec "$PY" -m pytest -q -rs tests "$@"
fi

CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1
install requirements.txt
mkdir -p out/demo
export PYTHONUNBUFFERED=1

stage() {  # stage NAME DONE_FILE RUN_DIR COMMAND...: run (or resume) unless DONE_FILE exists; time it
    local name=$1 done=$2 dir=$3; shift 3
    if [ -f "$done" ]; then say "$name: done already ($done)"; return; fi
    local resume=""
    if [ -n "$(find "$dir" -name train_state.pt 2>/dev/null)" ]; then
        resume="--resume"
        say "$name: resuming the interrupted run in $dir"
    fi
    say "$name: $*"
    local t0=$(date +%s)
    "$@" $resume
    echo "$name $(( $(date +%s) - t0 ))" >> out/demo/times.txt
    say "$name: finished in $(( $(date +%s) - t0 )) s"
}

stage pretrain out/lm-demo/report.md out/lm-demo "$PY" train_lm.py --preset=demo
stage tower out/mm-demo/clip/ckpt/vision/config.json out/mm-demo/clip "$PY" train_clip.py --preset=demo
stage multimodal out/mm-demo/instruct/eval.json out/mm-demo/instruct "$PY" train_mm.py --preset=demo

"$PY" - "$CHECK" <<'PYEOF'
"""Summary of the demo: LM loss drop, easy-vqa accuracy, wall time per stage -> out/demo/REPORT.md."""
import json, re, shutil, sys
from pathlib import Path

import torch

README_ACCURACY = 98.05  # easy-vqa accuracy of this recipe in the README (median of its seeds and thread counts)
lm = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", Path("out/lm-demo/report.md").read_text(), re.M))
ev = json.loads(Path("out/mm-demo/instruct/eval.json").read_text())
times = {}
for line in Path("out/demo/times.txt").read_text().split("\n") if Path("out/demo/times.txt").exists() else []:
    if line.strip():
        name, seconds = line.split()
        times[name] = int(seconds)  # the latest run of a stage wins
initial, final = float(lm["initial val loss"]), float(lm["final val loss"])
accuracy = ev["accuracy"]
rows = [("LM initial val loss", f"{initial:.3f}"), ("LM final val loss", f"{final:.3f}"),
        ("LM loss drop (target >= 3.0)", f"{initial - final:.3f}"),
        ("easy-vqa test accuracy (check: >= 90%)", f"{100 * accuracy:.1f}% of {ev['n']:,} questions "
                                                   f"(README: median {README_ACCURACY}% over seeds and thread counts)")]
rows += [(f"easy-vqa accuracy, {k} questions", f"{100 * v:.1f}%") for k, v in ev.get("by_type", {}).items()]
for name, folder in (("align", "align"), ("instruct", "instruct")):
    state = Path(f"out/mm-demo/{folder}/ckpt/train_state.pt")
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
say "starting the chat"
exec "$PY" serve.py
