#!/usr/bin/env bash
# Creates .venv with everything InterestFormer needs; safe to run again (it only adds what is missing).
# Torch: when there is no nvidia-smi and .venv has no torch yet, it first runs `pip install torch==2.13.0`,
# which takes a CPU wheel on a machine without a GPU (should that fail, the CPU build from PyTorch's CPU
# index). On a GPU machine it installs no torch itself: a torch already in .venv is left alone (the
# dependency is unpinned), and in a .venv without one pip installs its default torch with the package.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
pip=".venv/bin/python -m pip"
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ]; then
    exit 0
fi
if ! command -v nvidia-smi >/dev/null 2>&1 && ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: no GPU found, installing the CPU build of torch"
    $pip install -q "torch==2.13.0" || $pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
echo "setup: installing dependencies into .venv (a few minutes the first time)"
$pip install -q -e ".[test,pretrained]"
rm -f .venv/.installed-*
touch "$stamp"
