#!/usr/bin/env bash
# Set up .venv with the test tools, lint, and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
VENV=${VENV:-.venv}  # /opt/venv in the Docker image
"$VENV/bin/python" -m ruff check .
"$VENV/bin/hadolint" --failure-threshold style Dockerfile
"$VENV/bin/python" -m pytest -q "$@"
