#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# `docker compose config` is part of the suite: Debian's docker-compose where no compose tool exists
if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose) >/dev/null 2>&1 \
    || echo "warning: could not install docker-compose; the compose config test will fail" >&2
fi
exec .venv/bin/python -m pytest -q "$@"
