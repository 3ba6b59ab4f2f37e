#!/usr/bin/env bash
# A DFlash pipeline (pipeline.sh) on a Cloud TPU VM slice, run from your workstation with gcloud.
# The slice is a queued resource (spot with SPOT=1) whose workers run tpu-startup.sh at every
# boot: it installs Python 3.12 (uv), gcsfuse and the [tpu] extra, mounts the bucket and starts
# pipeline.sh detached, logging into the bucket. Nothing depends on your ssh session staying up.
#
#   bash configs/launch/tpu-vm.sh up        # upload the code (git archive of HEAD), request the slice
#   bash configs/launch/tpu-vm.sh status    # the queued resource's state, and whether the run is done
#   bash configs/launch/tpu-vm.sh logs      # the last lines of worker 0's log (from the bucket)
#   bash configs/launch/tpu-vm.sh resume    # preempted (SUSPENDED) or FAILED: delete and request again;
#                                           # the new VMs run the startup script and every step resumes
#   bash configs/launch/tpu-vm.sh teardown  # delete the queued resource and its VMs (the bucket stays)
#
# Settings (environment): BUCKET (required), PRESET (pipeline.sh's; default qwen3_8b), NAME (the
# queued resource, node and run name; default dflash-PRESET), ZONE, TYPE (accelerator type), VERSION
# (runtime), SPOT=1, HF_TOKEN (for gated models and data; kept in the instance metadata), PIPELINE_ENV
# ("K=V K=V": more pipeline.sh variables), DRY_RUN=1 (print every command instead of running it).
# Defaults: v5e-8 (v5litepod-8: one host, 8 chips, runtime v2-alpha-tpuv5-lite): the Qwen3-8B,
# Qwen3-4B and Llama-3.1-8B presets fit it (docs/scaling.md); PRESET=smoke fits it too.
set -euo pipefail
cmd=${1:-}
BUCKET=${BUCKET:?set BUCKET (a gs bucket name, without gs://)}
PRESET=${PRESET:-qwen3_8b}
NAME=${NAME:-dflash-${PRESET//_/-}}
ZONE=${ZONE:-us-west4-a} TYPE=${TYPE:-v5litepod-8} VERSION=${VERSION:-v2-alpha-tpuv5-lite}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
run() { if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
state() {  # the queued resource's state: ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, FAILED ... or NONE
  if [[ ${DRY_RUN:-0} == 1 ]]; then echo "${DRY_RUN_STATE:-NONE}"; return; fi
  gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" --format='value(state.state)' \
    2>/dev/null || echo NONE
}
create() {
  local spot=()
  if [[ ${SPOT:-0} == 1 ]]; then spot=(--spot); fi
  run gcloud compute tpus queued-resources create "$NAME" --zone "$ZONE" --node-id "$NAME" \
    --accelerator-type "$TYPE" --runtime-version "$VERSION" "${spot[@]}" \
    --metadata-from-file "startup-script=$ROOT/configs/launch/tpu-startup.sh" \
    --metadata "dflash-bucket=$BUCKET,dflash-preset=$PRESET,dflash-name=$NAME,dflash-env=${PIPELINE_ENV:-},dflash-hf-token=${HF_TOKEN:-}"
}

case $cmd in
  up)
    run bash -c "git -C '$ROOT' archive --format=tar.gz HEAD | gcloud storage cp - 'gs://$BUCKET/code/$NAME.tar.gz'"
    create ;;
  status)
    echo "queued resource $NAME: $(state)"
    run gcloud storage ls "gs://$BUCKET/status/$NAME.done" || echo "run $NAME: not done" ;;
  logs)
    run bash -c "gcloud storage cat 'gs://$BUCKET/logs/$NAME/worker-0.log' | tail -n ${LINES:-40}" ;;
  resume)
    s=$(state)
    case $s in
      SUSPENDED|FAILED)
        run gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet
        create ;;
      NONE) create ;;
      *) echo "queued resource $NAME is $s: nothing to do" ;;
    esac ;;
  teardown)
    run gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet ;;
  *)
    echo "usage: tpu-vm.sh up|status|logs|resume|teardown (settings: see the top of this file)" >&2
    exit 2 ;;
esac
