#!/usr/bin/env bash
# The main job: set up, convert a real tiny model into an LMDB store (once),
# bring the whole stack up on loopback (Redis, store, DRAM tier, ranker, worker,
# OpenAI-compatible gateway), generate from it, and keep serving until Ctrl-C.
# M2CACHE_EXIT_AFTER_DEMO=1 stops the stack after the demo generation.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
MODEL_DIR=${M2CACHE_MODEL_DIR:-../shared/models/tinystories-656k}
ROOT=${M2CACHE_STORE_ROOT:-runs/stores}
NAME=$(basename "$MODEL_DIR")
if [ ! -f "$ROOT/$NAME/data.mdb" ]; then
  mkdir -p "$ROOT"
  .venv/bin/m2cache convert "$MODEL_DIR" "$ROOT/$NAME"
fi
extra=()
[ "${M2CACHE_EXIT_AFTER_DEMO:-0}" = 1 ] && extra+=(--exit-after-demo)
exec .venv/bin/m2cache up --store-root "$ROOT" --model "$NAME" \
  --demo-prompt "${M2CACHE_PROMPT:-Once upon a time}" --demo-tokens "${M2CACHE_MAX_NEW_TOKENS:-64}" \
  "${extra[@]}" "$@"
