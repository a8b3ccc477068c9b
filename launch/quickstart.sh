#!/usr/bin/env bash
# From a fresh clone: set up .venv (launch/setup.sh, which also installs Debian's
# dataset-fashion-mnist; torch, which only reads .pth files, is left for the tests' set-up), then
# run the quick-start offline: the shipped resnet20 teacher (launch/quickstart_teacher/) distilled
# into a resnet8 student that sees 2,000 Fashion-MNIST images, next to the same student alone and
# with KD; prints their top-1 on the 10,000 test images and where the logs, checkpoints and
# attention plot are.
#   bash launch/quickstart.sh [WORKDIR]      (default: workdirs/quickstart; <10 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
AFD_NO_TORCH=1 bash launch/setup.sh
exec .venv/bin/python -m afd_jax.quickstart --workdir="${1:-workdirs/quickstart}"
