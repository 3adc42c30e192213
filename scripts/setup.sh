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
# The stamp records what is installed: the requirements' hash, plus "-test" once the test tools are in too.
stamp=$VENV/.requirements.sha
hash=$(cat requirements.txt requirements-test.txt | sha256sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "${1:-}" = "--test" ]; then
  [ "$have" = "$hash-test" ] && exit 0
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-test.txt
  echo "$hash-test" > "$stamp"
else
  { [ "$have" = "$hash" ] || [ "$have" = "$hash-test" ]; } && exit 0
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements.txt
  echo "$hash" > "$stamp"
fi
