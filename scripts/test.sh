#!/usr/bin/env bash
# Set up .venv with the test tools, lint, and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q "$@"
