#!/usr/bin/env bash
# omniphi in one command, offline, on a CPU:
#   bash run.sh            venv + data + pretrain + align + instruct + report, then the chat on 127.0.0.1:8000
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
exec "$PY" demo.py $([ $CHECK = 1 ] && echo --check)
