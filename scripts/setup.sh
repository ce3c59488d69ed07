#!/usr/bin/env bash
# Create .venv with the pinned requirements and the project installed (editable).
# Idempotent: skips pip when requirements.txt and pyproject.toml are unchanged.
# pip's output goes to .venv/setup.log and is shown only if a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.m2cache-setup
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (pinned requirements + this project; a first run takes a few minutes) ..." >&2
  log=.venv/setup.log
  n=0
  for step in "--upgrade pip" "-r requirements.txt" "--no-deps -e ."; do
    n=$((n + 1))
    t0=$SECONDS
    echo "  [$n/3] pip install $step" >&2
    # shellcheck disable=SC2086
    if ! .venv/bin/python -m pip install -q $step >"$log" 2>&1; then
      grep -v "is ignored: it is neither" "$log" >&2
      echo "setup failed at: pip install $step" >&2
      exit 1
    fi
    echo "        done in $((SECONDS - t0)) s" >&2
  done
  echo "$want" > "$stamp"
fi
