#!/usr/bin/env bash
# From a fresh clone: set up .venv (launch/setup.sh), then run the quick-start on the offline
# `digits` dataset: a resnet20 teacher, a resnet8 student alone, and the resnet8 student distilled
# with AFD; prints their top-1 and where the logs, checkpoints and attention plot are.
#   bash launch/quickstart.sh [WORKDIR]      (default: workdirs/quickstart; ~5 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m afd_jax.quickstart --workdir="${1:-workdirs/quickstart}"
