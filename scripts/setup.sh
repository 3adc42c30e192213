#!/usr/bin/env bash
# Create (or reuse) .venv and install the pinned requirements. Idempotent: a second run installs nothing.
# Usage: scripts/setup.sh [--test]   (--test also installs pytest, ruff, hadolint)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}  # the Docker image sets VENV=/opt/venv, so a mounted checkout's .venv is left alone
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp=$VENV/.requirements.sha
want=$(cat requirements.txt requirements-test.txt | sha256sum | cut -d' ' -f1)$([ "${1:-}" = "--test" ] && echo -test)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements.txt
  if [ "${1:-}" = "--test" ]; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements-test.txt
  fi
  echo "$want" > "$stamp"
fi
