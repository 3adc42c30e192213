#!/usr/bin/env bash
# Set up .venv with the test tools, lint, and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
VENV=${VENV:-.venv}  # /opt/venv in the Docker image
"$VENV/bin/python" -m ruff check .
"$VENV/bin/hadolint" --failure-threshold style Dockerfile
# pytest-xdist: TEST_WORKERS workers (default 2: the cores of the machine CI runs on); a test file stays on one
# worker (--dist loadfile), so its module and session fixtures are built once per worker and run in file order
"$VENV/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
