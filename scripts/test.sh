#!/usr/bin/env bash
# The test command: set up (idempotent) and run the whole suite on this machine.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && .venv/bin/python -c 'import apo_kernels' 2>/dev/null || bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/ "$@"
