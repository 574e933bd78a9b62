#!/usr/bin/env bash
# The default experiment: SmallCNN + PGD-AT (eps 0.1, PGD-10) on Fashion-MNIST, then
# clean + PGD-20 on all 10,000 test images. Usage: bash launch/main_job.sh [WORKDIR]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
WORKDIR="${1:-runs/fashion_mnist_smallcnn_pgd_at}"
"$PYTHON" -m launch.train --config=configs/fashion_mnist.py:smallcnn,pgd_at --workdir="$WORKDIR"
"$PYTHON" -m launch.evaluate --workdir="$WORKDIR" --step=best
