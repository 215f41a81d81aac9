#!/usr/bin/env bash
# Set everything up and run the whole test suite, lint and format checks. Fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "==> ruff check"
.venv/bin/ruff check .
echo "==> ruff format --check"
.venv/bin/ruff format --check .
echo "==> pytest"
# pytest exits 5 when it collects no tests; set -e turns that into a failure too.
.venv/bin/python -m pytest "$@"
