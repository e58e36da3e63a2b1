#!/usr/bin/env bash
# Submits one MetaDiff job to SLURM over several GPU nodes: writes an sbatch script and runs sbatch.
#
# Usage:
#   launch/slurm_gpu.sh [options] [-- extra args for metadiff_jax.main]
#
#   NODES=2 GPUS_PER_NODE=8 PARTITION=gpu WORKDIR=/shared/runs/mini \
#       launch/slurm_gpu.sh --config configs/miniimagenet_resnet12.py -- --config.train.steps=100000
#
# The job runs, from REPO with VENV activated, one task per node:
#   srun python -m metadiff_jax.main --config CONFIG --workdir WORKDIR [extra args]
# jax.distributed.initialize() finds the other tasks through SLURM's variables.
#
# One task (process) per node, holding all the node's GPUs: JAX drives every local GPU from
# one process, so a node needs no more, and the host work (drawing episodes, reading data)
# is done once per node, not once per GPU. JAX's SLURM detection would give each process
# only the GPU numbered SLURM_LOCALID (it assumes one task per GPU), so the job exports
# JAX_LOCAL_DEVICE_IDS=0,...,GPUS_PER_NODE-1, which jax.distributed.initialize() reads.
#
# Options (each also an environment variable; the flag wins):
#   --nodes N             NODES, default 2
#   --gpus-per-node G     GPUS_PER_NODE, default 8
#   --partition P         PARTITION, default the cluster's
#   --account A           ACCOUNT, default the cluster's
#   --time T              TIME, the time limit, default 24:00:00
#   --job-name NAME       JOB_NAME, default metadiff
#   --config FILE         CONFIG, default configs/miniimagenet_resnet12.py (presets allowed)
#   --workdir DIR         WORKDIR, on a filesystem every node sees, default $PWD/runs/JOB_NAME
#   --data-dir DIR        DATA_DIR, the built datasets (shared), default config.data.data_dir
#   --venv DIR            VENV, a virtualenv with the package and jax[cuda12], default
#                         REPO/.venv ("" to use the python on the nodes' PATH)
#   --dry-run             DRY_RUN=1: print the sbatch script and the sbatch command, submit nothing
#   -h, --help            this text
#   REPO                  the checkout the job runs from (shared), default this script's
#   CPUS_PER_TASK         CPUs per task (per node), default 4 per GPU ("" for the cluster's)
#   GRES                  the GPU request, default gpu:GPUS_PER_NODE (e.g. gpu:a100:4)
#   EXTRA_SBATCH          more sbatch options, space-separated, e.g. "--mem=0 --exclusive"
#   SETUP                 shell lines run before srun, e.g. "module load cuda/12.4"
#   EXTRA_ARGS            more args for main, space-separated (after those given after --)
#
# What to change: NODES, GPUS_PER_NODE, PARTITION/ACCOUNT, WORKDIR and DATA_DIR (shared paths),
# VENV (make it once: python3 -m venv .venv && .venv/bin/pip install -e . "jax[cuda12]").
# config.pretrain.batch_size and config.train.episodes_per_step must be multiples of
# NODES x GPUS_PER_NODE (16 GPUs: e.g. 128 and 16).
# The sbatch script is kept as WORKDIR/slurm/JOB_NAME-<time>.sbatch; the job's output (all
# tasks, lines labelled by task) is WORKDIR/logs/slurm-<jobid>.out; results, metrics and
# checkpoints are in WORKDIR. Submitting again resumes the run from its checkpoints.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

defaults "REPO=$LAUNCH_REPO" CPUS_PER_TASK?=auto GRES= EXTRA_SBATCH= SETUP=
options --nodes=2 --gpus-per-node=8 --partition= --account= --time=24:00:00 \
  --job-name=metadiff --config=configs/miniimagenet_resnet12.py --workdir= --data-dir= \
  "--venv?=$REPO/.venv"
parse_args "$@"

positive_ints NODES GPUS_PER_NODE
[[ "$JOB_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "JOB_NAME may hold only letters, digits, _ . -, got '$JOB_NAME'"
[[ "$CPUS_PER_TASK" == auto ]] && CPUS_PER_TASK=$((4 * GPUS_PER_NODE))
GRES="${GRES:-gpu:$GPUS_PER_NODE}"
WORKDIR="${WORKDIR:-$PWD/runs/$JOB_NAME}"
[[ "$WORKDIR" == /* ]] || WORKDIR="$PWD/$WORKDIR"  # the tasks start in REPO, not here
[[ -z "$DATA_DIR" || "$DATA_DIR" == /* || "$DATA_DIR" == '~'* ]] || DATA_DIR="$PWD/$DATA_DIR"

DEVICE_IDS="0"
for ((g = 1; g < GPUS_PER_NODE; g++)); do DEVICE_IDS+=",$g"; done
if [[ -n "$DATA_DIR" ]]; then main_args "--config.data.data_dir=$DATA_DIR"; else main_args; fi

# The sbatch script.
script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gres=$GRES"
  [[ -n "$CPUS_PER_TASK" ]] && echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
  echo "#SBATCH --time=$TIME"
  [[ -n "$PARTITION" ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n "$ACCOUNT" ]] && echo "#SBATCH --account=$ACCOUNT"
  echo "#SBATCH --output=$WORKDIR/logs/slurm-%j.out"
  if [[ -n "$EXTRA_SBATCH" ]]; then
    local opt opts
    read -r -a opts <<< "$EXTRA_SBATCH"
    for opt in "${opts[@]}"; do echo "#SBATCH $opt"; done
  fi
  cat <<SCRIPT
# Written by launch/slurm_gpu.sh. One task per node, which drives all the node's GPUs.
set -eo pipefail
cd $(quote "$REPO")
${SETUP}
SCRIPT
  [[ -n "$VENV" ]] && echo "source $(quote "$VENV/bin/activate")"
  cat <<SCRIPT
# JAX's SLURM detection would give each task only GPU number SLURM_LOCALID; this task has
# them all.
export JAX_LOCAL_DEVICE_IDS=$DEVICE_IDS
# srun does not always pass --cpus-per-task on to its tasks (SLURM 22.05+).
[ -n "\${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=\$SLURM_CPUS_PER_TASK
echo "job \$SLURM_JOB_ID: \$SLURM_JOB_NUM_NODES nodes (\$SLURM_JOB_NODELIST), $GPUS_PER_NODE GPUs each"
srun --label --kill-on-bad-exit=1 python $(quote "${MAIN_ARGS[@]}")
SCRIPT
}

STAMP="$(date +%Y%m%d-%H%M%S)"
SBATCH_FILE="$WORKDIR/slurm/$JOB_NAME-$STAMP.sbatch"
if dry; then
  echo "# the sbatch script ($SBATCH_FILE):"
  script
  echo "+ $(quote mkdir -p "$WORKDIR/logs" "$WORKDIR/slurm")"
  echo "+ $(quote sbatch --parsable "$SBATCH_FILE")"
  exit 0
fi

command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
mkdir -p "$WORKDIR/logs" "$WORKDIR/slurm"
script > "$SBATCH_FILE"
echo "+ $(quote sbatch --parsable "$SBATCH_FILE")"
JOB_ID="$(sbatch --parsable "$SBATCH_FILE")"
JOB_ID="${JOB_ID%%;*}"
echo "submitted job $JOB_ID ($NODES nodes x $GPUS_PER_NODE GPUs); script: $SBATCH_FILE"
echo "output: $WORKDIR/logs/slurm-$JOB_ID.out (tail -f it); results in $WORKDIR; squeue -j $JOB_ID"
