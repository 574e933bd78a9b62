#!/usr/bin/env bash
# Cloud TPU VM pod slice: run the same command on every worker. Each host reads its own
# slice of every global batch; jax.distributed.initialize() joins the hosts (--distributed).
#   TPU=my-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh configs/cifar10.py:wrn34_10,trades gs://bucket/runs/x
# The repository must be cloned at ~/agad on every worker; the workdir should be on GCS
# (orbax writes it from all hosts) and the data prepared in a GCS data_dir.
set -euo pipefail
CONFIG="$1"; WORKDIR="$2"; shift 2
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd ~/agad && source launch/env.sh && \$PYTHON -m pip install -q 'jax[tpu]==0.12.0.1' && \
  \$PYTHON -m launch.train --distributed --config='$CONFIG' --workdir='$WORKDIR' \
    --config.attack.driver=loop $*"
