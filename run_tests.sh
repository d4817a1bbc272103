#!/usr/bin/env bash
# Every check, the same way locally and in CI: a local virtualenv with the pinned requirements, then
# ruff, mypy and pytest. Exits non-zero on any failure. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
export VENV
scripts/ensure_venv.sh requirements-dev.txt  # creates the venv / installs only when the requirements changed

echo "== ruff"
"$VENV/bin/python" -m ruff check .
"$VENV/bin/python" -m ruff format --check .
echo "== mypy"
"$VENV/bin/python" -m mypy
echo "== pytest"
"$VENV/bin/python" -m pytest "$@"
