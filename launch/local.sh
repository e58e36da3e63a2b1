#!/usr/bin/env bash
# Runs one MetaDiff job as N JAX processes on this machine, with an explicit coordinator.
#
# Usage:
#   launch/local.sh [options] [-- extra args for metadiff_jax.main]
#
#   NUM_PROCESSES=2 CPU=1 DEVICES_PER_PROCESS=2 launch/local.sh \
#       --config configs/glyphs_conv4.py --workdir runs/local -- --config.train.steps=500
#
# Starts, in the background, for i in 0..N-1:
#   python -m metadiff_jax.main --config C --workdir W \
#       --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i [extra args]
# with process i's output in W/logs/process_<i>.log; waits for all of them. If one fails,
# the others are stopped, and the script exits non-zero naming that process and showing the
# end of its log. Process 0 writes the run's files (checkpoints, metrics, results) in W.
#
# Options (each also an environment variable; the flag wins):
#   -n, --num-processes N       NUM_PROCESSES, default 2
#   --port PORT                 PORT of the coordinator (process 0), default a free port
#   --config FILE[:PRESETS]     CONFIG, default configs/glyphs_conv4.py
#   --workdir DIR               WORKDIR, default runs/local
#   --cpu                       CPU=1: JAX on CPU (JAX_PLATFORMS=cpu) with
#                               XLA_FLAGS=--xla_force_host_platform_device_count=K, to
#                               simulate K devices per process (K = DEVICES_PER_PROCESS)
#   --devices-per-process K     DEVICES_PER_PROCESS, default 1 with --cpu; without --cpu it
#                               gives process i the GPUs i*K..i*K+K-1 (CUDA_VISIBLE_DEVICES)
#   --dry-run                   DRY_RUN=1: print the commands (prefixed "+ "), run nothing
#   -h, --help                  this text
#   PYTHON                      the interpreter, default "python" from PATH
#   TAIL_LINES                  lines of a failed process's log to show, default 30
#   EXTRA_ARGS                  more args for main, space-separated (after those given after --)
#
# What to change: the global device count is NUM_PROCESSES x devices per process, and
# config.pretrain.batch_size and config.train.episodes_per_step must be multiples of it
# (glyphs_conv4: 128 and 8, so 2 x 2 or 2 x 4 devices work). Run from the repository root
# (config paths are relative), after `python -m metadiff_jax.data build <dataset>`.
# On a machine with several GPUs, one process already uses all of them: run main directly;
# this script is for testing multi-process runs (use --devices-per-process to split GPUs).
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

options '-n|--num-processes=2' --port= --config=configs/glyphs_conv4.py --workdir=runs/local \
  --cpu --devices-per-process=
defaults PYTHON=python TAIL_LINES=30
parse_args "$@"

positive_ints NUM_PROCESSES
[[ -z "$DEVICES_PER_PROCESS" ]] || positive_ints DEVICES_PER_PROCESS
[[ "$CONFIG" && "$WORKDIR" ]] || die "CONFIG and WORKDIR must not be empty"

if [[ -z "$PORT" ]]; then
  command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found; set PYTHON or PORT"
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$PORT'"

# The environment of process i: CPU simulation, or its own slice of the GPUs.
process_env() {
  local i="$1" k
  ENV=()
  if [[ "$CPU" == 1 ]]; then
    k="${DEVICES_PER_PROCESS:-1}"
    ENV=(JAX_PLATFORMS=cpu "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$k")
  elif [[ -n "$DEVICES_PER_PROCESS" ]]; then
    local visible=() picked=() j
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
      IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    else
      for ((j = 0; j < NUM_PROCESSES * DEVICES_PER_PROCESS; j++)); do visible+=("$j"); done
    fi
    for ((j = i * DEVICES_PER_PROCESS; j < (i + 1) * DEVICES_PER_PROCESS; j++)); do
      [[ $j -lt ${#visible[@]} ]] || die "not enough GPUs for $NUM_PROCESSES x $DEVICES_PER_PROCESS (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
      picked+=("${visible[$j]}")
    done
    ENV=("CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${picked[*]}")")
  fi
}

for ((i = 0; i < NUM_PROCESSES; i++)); do process_env "$i"; done  # fails before any starts

LOGS="$WORKDIR/logs"
run mkdir -p "$LOGS"

PIDS=()
stop_all() {  # TERM the processes still running, KILL them after 10 s
  local pid t
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < 20; t++)); do
    local alive=0
    for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && return 0
    sleep 0.5
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'echo "interrupted: stopping the processes" >&2; stop_all; exit 130' INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  process_env "$i"
  main_args "--coordinator_address=127.0.0.1:$PORT" "--num_processes=$NUM_PROCESSES" \
    "--process_id=$i"
  CMD=("$PYTHON" "${MAIN_ARGS[@]}")
  LOG="$LOGS/process_$i.log"
  echo "+ $(quote ${ENV[@]+"${ENV[@]}"} "${CMD[@]}") > $(quote "$LOG") 2>&1 &"
  if ! dry; then
    env ${ENV[@]+"${ENV[@]}"} "${CMD[@]}" > "$LOG" 2>&1 &
    PIDS+=("$!")
  fi
done
echo "+ wait"
dry && exit 0

echo "started $NUM_PROCESSES processes (coordinator 127.0.0.1:$PORT); logs: $LOGS/process_<i>.log" \
     "(follow process 0: tail -f $(quote "$LOGS/process_0.log"))"

# Wait for all; on the first failure stop the others and report it.
DONE=()
remaining=$NUM_PROCESSES
while [[ $remaining -gt 0 ]]; do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [[ -z "${DONE[$i]:-}" ]] || continue
    kill -0 "${PIDS[$i]}" 2>/dev/null && continue
    if wait "${PIDS[$i]}"; then rc=0; else rc=$?; fi
    DONE[i]=1
    remaining=$((remaining - 1))
    if [[ $rc -ne 0 ]]; then
      LOG="$LOGS/process_$i.log"
      trap - INT TERM
      stop_all
      {
        echo "error: process $i of $NUM_PROCESSES failed (exit status $rc); the others were stopped." \
             "Last $TAIL_LINES lines of $LOG:"
        tail -n "$TAIL_LINES" "$LOG" | sed 's/^/  | /'
      } >&2
      exit "$rc"
    fi
  done
  [[ $remaining -gt 0 ]] && sleep 0.5
done
echo "all $NUM_PROCESSES processes finished; results in $WORKDIR (process 0's log: $LOGS/process_0.log)"
