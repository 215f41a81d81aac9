#!/usr/bin/env bash
# Create .venv-ts: TorchServe 0.12 (the reference server the benchmarks compare against), with the same
# torch build as .venv so both servers run the same kernels. Needs Java 17 on PATH. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! command -v java >/dev/null; then
    echo "setup_torchserve: java not found; TorchServe needs Java 17 (apt-get install -y openjdk-17-jre-headless)" >&2
    exit 1
fi
if [ ! -x .venv-ts/bin/python ]; then
    "$PYTHON" -m venv .venv-ts
fi
if [ ! -x .venv-ts/bin/torchserve ]; then
    # torch is pinned: an unpinned install would pull another (much larger) build.
    .venv-ts/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 \
        torchserve==0.12.0 torch-model-archiver==0.12.0 pyyaml captum 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv-ts/bin/python -c "import torch, ts; print('torchserve', ts.__version__, 'torch', torch.__version__)"
