#!/usr/bin/env bash
# Startup script of every worker of the TPU VM slice that tpu-vm.sh creates: it runs as root at each
# boot (so again on the fresh VMs of a recreated queued resource) and needs nothing on the image but
# apt, curl and tar. It installs gcsfuse and mounts the bucket, installs a managed Python 3.12 with uv
# (the v2-alpha-tpuv5-lite runtime is Ubuntu 22.04, whose python3 is 3.10; dflash needs >= 3.11),
# unpacks the code tpu-vm.sh uploaded, builds the venv with the [tpu] extra, then starts
# pipeline.sh detached, its log copied into the bucket every minute (BUCKET/logs/NAME/worker-N.log).
# Its settings come from the instance metadata tpu-vm.sh sets (dflash-* keys).
# DRY_RUN=1 prints the commands instead of running them (each metadata key read from the variable of
# its name in capitals, - as _: DFLASH_BUCKET, AGENT_WORKER_NUMBER, ...).
set -euo pipefail
meta() {  # an instance metadata attribute (empty when unset)
  if [[ ${DRY_RUN:-0} == 1 ]]; then local v=${1//-/_}; v=${v^^}; echo "${!v:-}"; return; fi
  curl -sf -H Metadata-Flavor:Google \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1" || true
}
run() { if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
detach() {  # start a command in the background, in its own session, immune to hangups
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' setsid nohup "$@"; echo; else setsid nohup "$@" & fi
}
BUCKET=$(meta dflash-bucket) PRESET=$(meta dflash-preset) NAME=$(meta dflash-name)
WORKER=$(meta agent-worker-number)  # this VM's index in the slice (0 on a single-host slice)
WORKER=${WORKER:-0}
EXTRA_ENV=$(meta dflash-env)        # more pipeline.sh variables, "K=V K=V"
HF_TOKEN=$(meta dflash-hf-token)
: "${BUCKET:?no dflash-bucket metadata}" "${NAME:?no dflash-name metadata}"
MNT=/mnt/bucket HOME_DIR=/opt/dflash LOG_DIR=/var/log/dflash
export UV_INSTALL_DIR=/usr/local/bin UV_PYTHON_INSTALL_DIR=/opt/uv-python

if ! command -v gcsfuse >/dev/null; then  # Cloud Storage FUSE from Google's apt repository
  run bash -c 'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
      | gpg --dearmor --yes -o /usr/share/keyrings/cloud.google.gpg
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" \
      > /etc/apt/sources.list.d/gcsfuse.list
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -yq gcsfuse'
fi
run mkdir -p "$MNT" "$HOME_DIR" "$LOG_DIR"
if ! mountpoint -q "$MNT"; then
  run gcsfuse --implicit-dirs -o allow_other "$BUCKET" "$MNT"
fi
if ! command -v uv >/dev/null; then
  run bash -c 'curl -LsSf https://astral.sh/uv/install.sh | sh'
fi
# The code: the tarball tpu-vm.sh uploaded (a git archive of the commit it was run from).
run tar -xzf "$MNT/code/$NAME.tar.gz" -C "$HOME_DIR"
if [[ ${DRY_RUN:-0} == 1 ]]; then echo "cd $HOME_DIR"; else cd "$HOME_DIR"; fi
if [[ ! -x $HOME_DIR/.venv/bin/python ]]; then
  run uv venv --python 3.12 .venv
fi
run uv pip install --python .venv/bin/python -q -e '.[tpu]' gcsfs
run mkdir -p "$MNT/logs/$NAME" "$MNT/status"
log=$LOG_DIR/worker-$WORKER.log out=$log quiet=/dev/null
if [[ ${DRY_RUN:-0} == 1 ]]; then out=/dev/stdout quiet=/dev/stdout; fi
# shellcheck disable=SC2086  # EXTRA_ENV is "K=V K=V" on purpose
detach env PATH="$HOME_DIR/.venv/bin:$PATH" HF_HOME=/opt/hf HF_TOKEN="$HF_TOKEN" \
  WORK="$MNT" PRESET="$PRESET" NAME="$NAME" TPU_WORKER_ID="$WORKER" $EXTRA_ENV \
  bash -c "bash configs/launch/pipeline.sh && touch '$MNT/status/$NAME.done'" >"$out" 2>&1 </dev/null
# gcsfuse uploads a file when it is closed: copy the growing log into the bucket every minute.
detach bash -c "while sleep 60; do cp '$log' '$MNT/logs/$NAME/worker-$WORKER.log'; done" \
  >"$quiet" 2>&1 </dev/null
