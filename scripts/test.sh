#!/usr/bin/env bash
# The test command: set up (idempotent) and run the whole suite on this machine.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# (Re)build unless the package imports and its native module was built against the installed torch.
[ -x .venv/bin/python ] && .venv/bin/python -c 'import sys, apo_kernels._native_build as b; sys.exit(b.torch_mismatch("") is not None)' 2>/dev/null \
  || bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/ "$@"
