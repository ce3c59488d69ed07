#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Extra args go to pytest.
# Changes nothing outside the checkout and its caches: no system packages (the
# compose files are validated offline against the Compose Specification schema;
# scripts/compose_check.sh runs them on a real engine).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # the m2cache console script, as an installed user has it
exec .venv/bin/python -m pytest -q "$@"
