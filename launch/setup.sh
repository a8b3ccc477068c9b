#!/usr/bin/env bash
# Creates ./.venv with everything the project needs (CPU builds), idempotently.
#   bash launch/setup.sh            # core + optional torch, transformers (checkpoint import, ViT parity)
#   AFD_NO_TORCH=1 bash launch/setup.sh
# Also installs Debian's `dataset-fashion-mnist` (offline Fashion-MNIST) when run as root with
# apt-get available; otherwise it says how to.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q -r requirements.txt
if [ -z "${AFD_NO_TORCH:-}" ]; then
  # torch is optional (reading .pth checkpoints). Always pinned: an unpinned torch can pull a
  # multi-GB CUDA build. Where PyPI's torch==2.13.0 is a CUDA build (Linux x86-64 elsewhere),
  # set AFD_TORCH_INDEX=https://download.pytorch.org/whl/cpu to get the CPU one.
  .venv/bin/python -m pip install -q torch==2.13.0 ${AFD_TORCH_INDEX:+--index-url "$AFD_TORCH_INDEX"}
  # transformers: the ViT parity tests' PyTorch reference (needs no torchvision), and
  # safetensors (ViT weights in .safetensors files). --no-deps would miss its small helpers.
  .venv/bin/python -m pip install -q transformers==5.24.0 safetensors
fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "setup: could not install dataset-fashion-mnist (needed only for fashion_mnist_local)"
  else
    echo "setup: for the offline Fashion-MNIST dataset run: sudo apt-get install dataset-fashion-mnist"
  fi
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
