#!/usr/bin/env bash
# Runs the whole test suite from the project's virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
# The sandbox of every evaluation (and of the tests that run one) needs bubblewrap.
bash scripts/bwrap.sh >/dev/null
"$VENV/bin/python" -m pytest "$@"
