#!/usr/bin/env bash
# Stage -> prepare -> regenerate -> train -> export of one DFlash preset (default: Qwen3-8B). Run it
# on EVERY host of the job at once: a Cloud TPU VM slice (tpu-vm.sh starts it from tpu-startup.sh),
# a GKE JobSet pod per host (gke-jobset.yaml), one SLURM task per node (slurm.sbatch), or locally
# under dflash-launch. jax.distributed finds the peers itself on TPU VMs, GKE and SLURM
# (docs/multihost.md). Every step resumes: after a preemption run the same command again; staged
# weights, the prompts file, finished regeneration shards, checkpoints and the export are kept.
#
#   WORK    a directory every host sees (gcsfuse mount, NFS, Lustre): models/, data/, runs/, exports/
#   PRESET  smoke | qwen3_8b | qwen3_4b | llama3_1_8b | llama3_3_70b: sets TARGET, CONFIG, NAME,
#           RECIPE and TOTAL below (default qwen3_8b); each of those may also be set by hand
#   TARGET  hub id (staged once into WORK/models/ by process 0, with HF_TOKEN) or a local directory
#   DATA    conversations to regenerate (hub id, path or gs:// jsonl/parquet); default: the recipe's
#           prompts file WORK/data/RECIPE-TOTAL_prompts.jsonl, made once by process 0 (dflash-prepare-data)
#   RECIPE, TOTAL  dflash-prepare-data --recipe / --total for that default
#   REGEN_BATCH  dflash-regenerate --batch-size (default 64; the smoke preset 32)
#   REGEN_MESH  dflash-regenerate --mesh over each host's chips (default tensor=-1: the AOT plan of the
#               recipe's settings, batch 64 x 1024+2048 tokens, fits Qwen3-8B on a v5e-8 host with 28%
#               headroom that way, and not with data=2,tensor=4, the split the weights+KV estimate
#               picks; empty: no flag, dflash-regenerate picks that estimate's mesh and says which)
#   LANES   data lanes (a multiple of the host count; default 8 serves 1, 2, 4 or 8 hosts)
#   STEPS   steps to run (default "stage prepare regenerate train export"); stage, prepare and
#           export run on process 0 only, the other processes wait for what they write
#   REGEN_FLAGS, TRAIN_FLAGS, EXPORT_FLAGS   extra flags for each step (word-split)
#   DRY_RUN=1   print every command instead of running it
set -euo pipefail
: "${WORK:?set WORK to a directory every host shares}"
PRESET=${PRESET:-qwen3_8b}
case $PRESET in
  smoke)        d=(Qwen/Qwen3-0.6B configs/qwen3_0_6b_smoke.yaml qwen3_0_6b_smoke qwen3 256 32) ;;
  qwen3_8b)     d=(Qwen/Qwen3-8B configs/qwen3_8b_dflash.yaml qwen3_8b_dflash qwen3 800000 64) ;;
  qwen3_4b)     d=(Qwen/Qwen3-4B configs/qwen3_4b_dflash.yaml qwen3_4b_dflash qwen3 800000 64) ;;
  llama3_1_8b)  d=(meta-llama/Llama-3.1-8B-Instruct configs/llama3_1_8b_dflash.yaml llama3_1_8b_dflash llama3 0 64) ;;
  llama3_3_70b) d=(meta-llama/Llama-3.3-70B-Instruct configs/llama3_3_70b_dflash.yaml llama3_3_70b_dflash llama3 0 64) ;;
  *) echo "pipeline.sh: unknown PRESET=$PRESET (smoke, qwen3_8b, qwen3_4b, llama3_1_8b, llama3_3_70b)" >&2; exit 2 ;;
esac
TARGET=${TARGET:-${d[0]}} CONFIG=${CONFIG:-${d[1]}} NAME=${NAME:-${d[2]}}
RECIPE=${RECIPE:-${d[3]}} TOTAL=${TOTAL:-${d[4]}} REGEN_BATCH=${REGEN_BATCH:-${d[5]}}
DATA=${DATA:-$WORK/data/$RECIPE-${TOTAL}_prompts.jsonl}
LANES=${LANES:-8}
STEPS=${STEPS:-stage prepare regenerate train export}
REGEN_MESH=${REGEN_MESH-tensor=-1}
REGEN=$WORK/data/${NAME}_regenerated.jsonl
RUN=$WORK/runs/$NAME
EXPORT=$WORK/exports/$NAME
# This host's process index, where the launcher says it (tpu-startup.sh sets TPU_WORKER_ID from the
# TPU metadata; a hand-run ssh session on a TPU VM does not: run it with TPU_WORKER_ID=N).
RANK=${DFLASH_PROCESS_ID:-${SLURM_PROCID:-${JOB_COMPLETION_INDEX:-${TPU_WORKER_ID:-0}}}}

step() { [[ " $STEPS " == *" $1 "* ]]; }
run() {  # a command, or with DRY_RUN=1 its shell-quoted words
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
wait_for() {  # the other processes wait for what process 0 writes
  [[ ${DRY_RUN:-0} == 1 ]] && { echo "# wait for $1"; return; }
  until [[ -e $1 ]]; do sleep 20; done
}

# The regeneration settings of the recipe (dflash.training.recipe_data.REGEN_SETTINGS; docs/quickstart-tpu.md,
# "The data"): greedy; a prompt's last 1024 tokens and up to 2048 new ones, so a single-turn
# conversation fits one 3072-token row; Qwen3 with thinking off (the published Qwen3 drafters are
# non-thinking); REGEN_BATCH conversations per batch: 64, and 32 for the smoke preset, whose
# v5e-4 chips (tensor=4) would need 19.1 GB each at 64 (AOT plans, docs/scaling.md, "Regeneration").
regen_recipe=(--max-prompt-tokens 1024 --max-new-tokens 2048 --temperature 0 --batch-size "$REGEN_BATCH")
if [[ $RECIPE == qwen3 ]]; then regen_recipe+=(--chat-template-kwargs '{"enable_thinking":false}'); fi
mesh=()
if [[ -n $REGEN_MESH ]]; then mesh=(--mesh "$REGEN_MESH"); fi

if step stage && [[ $TARGET == */* && ! -e $TARGET ]]; then  # hub id: weights once into the bucket
  staged=$WORK/models/$TARGET
  if [[ $RANK == 0 && ! -e $staged/.staged ]]; then
    # config, tokenizer and safetensors only (no original/ checkpoints); --include once per pattern
    run hf download "$TARGET" --local-dir "$staged" --include '*.json' --include '*.safetensors' \
      --include '*.txt' --include '*.jinja'
    run touch "$staged/.staged"
  fi
  wait_for "$staged/.staged"
  TARGET=$staged
fi
if step prepare && [[ ! -e $DATA && $DATA == "$WORK"/data/* ]]; then  # the recipe's prompts, once
  if [[ $RANK == 0 ]]; then run dflash-prepare-data --recipe "$RECIPE" --total "$TOTAL" --out "$DATA"; fi
  wait_for "$DATA"
fi
if step regenerate; then  # the target's own responses; shards in $REGEN.shards/ (resumable)
  # shellcheck disable=SC2086  # the extra flags are word-split on purpose
  run dflash-regenerate --target "$TARGET" --data "$DATA" --out "$REGEN" "${regen_recipe[@]}" \
    "${mesh[@]}" ${REGEN_FLAGS:-}
fi
if step train; then  # resumes from the newest whole checkpoint in $RUN/checkpoints
  # shellcheck disable=SC2086
  run dflash-train --config "$CONFIG" --run-dir "$RUN" --set "target.name=$TARGET" \
    --set "data.source=$REGEN" --set data.format=conversations --set "data.lanes=$LANES" ${TRAIN_FLAGS:-}
fi
if step export && [[ "$RANK" == 0 ]]; then  # the best held-out step, bf16, the layout vLLM/SGLang load
  if [[ -e "$EXPORT/config.json" ]]; then
    echo "export: $EXPORT exists, kept"
  else
    # shellcheck disable=SC2086
    run dflash-export --run "$RUN" --step best --dtype bf16 --out "$EXPORT" ${EXPORT_FLAGS:-}
  fi
fi
