#!/usr/bin/env bash
# One multi-GPU machine: data parallelism over every local GPU (SyncBN under jit).
#   bash launch/gpu.sh configs/cifar10.py:resnet18,pgd_at runs/c10 [--config.overrides ...]
# Installs the CUDA build of the pinned jax into .venv first. The attack loop runs
# in-graph on GPUs (attack.driver=loop); the global batch must divide by the GPU count.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PYTHON" -m pip install -q "jax[cuda12]==0.12.0.1"
CONFIG="$1"; WORKDIR="$2"; shift 2
"$PYTHON" -m launch.train --config="$CONFIG" --workdir="$WORKDIR" --config.attack.driver=loop "$@"
"$PYTHON" -m launch.evaluate --workdir="$WORKDIR" --step=best --preset=full
