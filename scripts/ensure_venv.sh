#!/usr/bin/env bash
# Make sure the virtualenv ($VENV, default .venv) exists and has REQUIREMENTS_FILE installed.
# Installs only when that file, or one it includes with "-r", changed since the last install (a sha256 stamp in
# the venv). Installing a file installs what it includes, so those get stamped too: a venv that run_tests.sh
# prepared from requirements-dev.txt counts as ready for start_all.sh's requirements.txt.
# Usage: scripts/ensure_venv.sh requirements.txt
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
requirements=${1:?usage: scripts/ensure_venv.sh REQUIREMENTS_FILE}

# The files a requirements file stands for: the ones it includes with "-r" (recursively), then itself.
files_of() {
  local included
  while read -r included; do
    files_of "$(dirname "$1")/$included"
  done < <(sed -n 's/^-r[[:space:]]*//p' "$1")
  echo "$1"
}
digest() { files_of "$1" | xargs cat | sha256sum | cut -d' ' -f1; }
stamp() { local name; name=$(basename "$1"); echo "$VENV/.${name%.txt}.sha256"; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating the virtualenv $VENV (once)..."
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if [ "$(cat "$(stamp "$requirements")" 2>/dev/null)" != "$(digest "$requirements")" ]; then
  echo "Installing $requirements into $VENV (only when it changes; this can take a few minutes)..."
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$requirements"
  for file in $(files_of "$requirements"); do
    digest "$file" > "$(stamp "$file")"
  done
fi
