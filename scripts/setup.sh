#!/usr/bin/env bash
# Create .venv with the pinned requirements and the project installed (editable).
# Idempotent: skips pip when requirements.txt and pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.m2cache-setup
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
