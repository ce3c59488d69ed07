#!/usr/bin/env bash
# The main job: set up, convert a real tiny model into an LMDB store (once), and
# generate from it. Extra args go to `m2cache run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
MODEL_DIR=${M2CACHE_MODEL_DIR:-../shared/models/tinystories-656k}
STORE=${M2CACHE_STORE:-runs/stores/$(basename "$MODEL_DIR")}
if [ ! -f "$STORE/data.mdb" ]; then
  mkdir -p "$(dirname "$STORE")"
  .venv/bin/m2cache convert "$MODEL_DIR" "$STORE"
fi
exec .venv/bin/m2cache run "$STORE" --prompt "${M2CACHE_PROMPT:-Once upon a time}" --max-new-tokens "${M2CACHE_MAX_NEW_TOKENS:-64}" "$@"
