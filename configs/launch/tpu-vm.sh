#!/usr/bin/env bash
# The Qwen3-8B DFlash pipeline on a Cloud TPU VM slice (default v5e-16: 4 hosts x 4 chips).
# Run from your workstation with gcloud; every host runs pipeline.sh at once (--worker=all) and
# jax.distributed reads the slice from the TPU metadata server. The bucket is mounted with
# gcsfuse on every host: it holds the regenerated data, checkpoints, TensorBoard events, exports.
# After a preemption run the last two commands again: every step resumes.
set -euo pipefail
NAME=${NAME:-dflash-v5e16} ZONE=${ZONE:-us-west4-a} BUCKET=${BUCKET:?set BUCKET (a gs bucket name)}
TYPE=${TYPE:-v5litepod-16} VERSION=${VERSION:-v2-alpha-tpuv5-lite}
DATA=${DATA:?set DATA (hub dataset id or gs:// path of the conversations)}
REPO=${REPO:-https://github.com/dflash/dflash.git}
ssh_all() { gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker="$1" --command "$2"; }

gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION"
ssh_all all "set -e; [ -d dflash ] || git clone $REPO dflash; cd dflash; python3 -m venv .venv; \
  .venv/bin/pip install -q -e '.[tpu]' gcsfs; mkdir -p ~/bucket; \
  mountpoint -q ~/bucket || gcsfuse --implicit-dirs $BUCKET ~/bucket"
# regenerate + train on every host; then the export on worker 0 alone
ssh_all all "cd dflash && PATH=\$PWD/.venv/bin:\$PATH DATA=$DATA WORK=\$HOME/bucket STEPS='regenerate train' \
  bash configs/launch/pipeline.sh"
ssh_all 0 "cd dflash && PATH=\$PWD/.venv/bin:\$PATH DATA=$DATA WORK=\$HOME/bucket STEPS=export \
  bash configs/launch/pipeline.sh"
# TensorBoard from anywhere: tensorboard --logdir gs://$BUCKET/runs/qwen3_8b_dflash/tb
