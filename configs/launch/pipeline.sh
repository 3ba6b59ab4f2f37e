#!/usr/bin/env bash
# Regenerate -> train -> export of one DFlash preset (default: Qwen3-8B). Run it on EVERY host
# of the job at once: a Cloud TPU VM slice (tpu-vm.sh), a GKE JobSet pod per host
# (gke-jobset.yaml), one SLURM task per node (slurm.sbatch), or locally under dflash-launch.
# jax.distributed finds the peers itself on TPU VMs, GKE and SLURM (docs/multihost.md).
# Every step resumes: after a preemption rerun the same command; finished regeneration shards,
# checkpoints and an existing export are kept.
#
#   DATA   conversations to regenerate: hub dataset id, local or gs:// jsonl/parquet (required)
#   WORK   a directory every host sees (gcsfuse mount, NFS, Lustre): data/, runs/, exports/ (required)
#   TARGET, CONFIG, NAME   the target, the training preset and the run's name (Qwen3-8B defaults)
#   LANES  data lanes (a multiple of the host count; default 8 serves 1, 2, 4 or 8 hosts)
#   STEPS  which steps to run (default "regenerate train export"); export runs on process 0 only
#   REGEN_FLAGS, TRAIN_FLAGS, EXPORT_FLAGS   extra flags for each step (word-split)
set -euo pipefail
: "${DATA:?set DATA to the conversations to regenerate (hub id, path or gs:// URL)}"
: "${WORK:?set WORK to a directory every host shares}"
TARGET=${TARGET:-Qwen/Qwen3-8B}
CONFIG=${CONFIG:-configs/qwen3_8b_dflash.yaml}
NAME=${NAME:-qwen3_8b_dflash}
LANES=${LANES:-8}
STEPS=${STEPS:-regenerate train export}
REGEN=$WORK/data/${NAME}_regenerated.jsonl
RUN=$WORK/runs/$NAME
EXPORT=$WORK/exports/$NAME
# This host's process index, where the launcher says it (a TPU VM ssh session does not: run the
# export step there with --worker=0, as tpu-vm.sh does).
RANK=${DFLASH_PROCESS_ID:-${SLURM_PROCID:-${JOB_COMPLETION_INDEX:-${TPU_WORKER_ID:-0}}}}

step() { [[ " $STEPS " == *" $1 "* ]]; }

if step regenerate; then  # the target's own responses; shards in $REGEN.shards/ (resumable)
  dflash-regenerate --target "$TARGET" --data "$DATA" --out "$REGEN" ${REGEN_FLAGS:-}
fi
if step train; then  # resumes from the newest whole checkpoint in $RUN/checkpoints
  dflash-train --config "$CONFIG" --run-dir "$RUN" --set "data.source=$REGEN" \
    --set data.format=conversations --set "data.lanes=$LANES" ${TRAIN_FLAGS:-}
fi
if step export && [[ "$RANK" == 0 ]]; then  # the best held-out step, bf16, the layout vLLM/SGLang load
  if [[ -e "$EXPORT/config.json" ]]; then
    echo "export: $EXPORT exists, kept"
  else
    dflash-export --run "$RUN" --step best --dtype bf16 --out "$EXPORT" ${EXPORT_FLAGS:-}
  fi
fi
