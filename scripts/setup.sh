#!/usr/bin/env bash
# Create .venv (if needed) and install the project with its test tools. Idempotent.
# torch and torchvision are pinned: these exact builds install from this machine's local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS:-dev}
if [ ! -f "$stamp" ]; then
    echo "==> installing torch==2.14.1 torchvision==0.29.1 and the project (extras: ${EXTRAS:-dev})"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q -e ".[${EXTRAS:-dev}]" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import torch, torchvision, archiver, handlers" \
        || { echo "setup failed: the venv cannot import torch/torchvision/archiver" >&2; exit 1; }
    rm -f .venv/.installed-*
    touch "$stamp"
fi
