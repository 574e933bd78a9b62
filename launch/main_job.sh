#!/usr/bin/env bash
# The default experiment: SmallCNN + PGD-AT (eps 0.1, PGD-10) on Fashion-MNIST, then
# clean + PGD-20 on all 10,000 test images. Usage: bash launch/main_job.sh [WORKDIR]
# SMOKE=1 runs the same two commands on the smoke config (",smoke": 384 training images,
# 2 epochs, PGD-2 training; clean + PGD-3 on the first 128 test images), default WORKDIR
# runs/fashion_mnist_smallcnn_pgd_at_smoke: a check in well under a minute that the job runs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
SPEC="smallcnn,pgd_at"
WORKDIR="${1:-runs/fashion_mnist_smallcnn_pgd_at}"
if [ "${SMOKE:-0}" = 1 ]; then
  SPEC="$SPEC,smoke"
  WORKDIR="${1:-runs/fashion_mnist_smallcnn_pgd_at_smoke}"
fi
"$PYTHON" -m launch.train --config="configs/fashion_mnist.py:$SPEC" --workdir="$WORKDIR"
"$PYTHON" -m launch.evaluate --workdir="$WORKDIR" --step=best
