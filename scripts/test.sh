#!/usr/bin/env bash
# Set everything up and run the whole test suite, lint and format checks. Fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests need every extra: Ray Serve and KServe run for real, never skipped.
EXTRAS=${EXTRAS:-dev,examples,ray,kserve,signing} scripts/setup.sh
# The browser tests drive Debian's chromium (playwright's own browser download is never used).
if ! command -v chromium >/dev/null; then
    echo "==> installing chromium (Debian package) for the browser tests"
    sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
    $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq chromium >/dev/null \
        || { echo "test setup failed: could not install chromium with apt-get" >&2; exit 1; }
fi
echo "==> ruff check"
.venv/bin/ruff check .
echo "==> ruff format --check"
.venv/bin/ruff format --check .
echo "==> pytest"
# pytest exits 5 when it collects no tests; set -e turns that into a failure too.
.venv/bin/python -m pytest "$@"
