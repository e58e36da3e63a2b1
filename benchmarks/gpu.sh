#!/usr/bin/env bash
# The GPU benchmark suite at full size, as one script for a short lease of one GPU.
#
#   bash benchmarks/gpu.sh OUT_DIR          # writes OUT_DIR/<benchmark>.json and logs
#   SMALL=1 bash benchmarks/gpu.sh /tmp/x   # the same script at CPU sizes (a dry check)
#   SKIP="sampling" bash benchmarks/gpu.sh OUT_DIR   # leave out benchmarks by label
#
# Ordered by what matters most; each benchmark has its own time limit so that one slow part
# cannot take the others' time, and a failure does not stop the rest. It needs jax (with
# CUDA), flax, optax, orbax-checkpoint, chex and ml-collections, not the data stack
# (tensorflow-datasets): where ml-collections is missing, put its wheel in .whl/ and it is
# installed to /tmp/site first. Record the figures, with the card, in docs/PERFORMANCE.md.
set -uo pipefail
out="${1:?usage: bash benchmarks/gpu.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ! python3 -c "import ml_collections" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import jax; print(jax.devices(), jax.__version__)" | tee "$out/devices.txt"

run() {  # label (the output's name), script, seconds, args...
  local label=$1 script=$2 limit=$3; shift 3
  if [[ " ${SKIP:-} " == *" $label "* ]]; then echo "=== $label skipped"; return; fi
  echo "=== $label"
  timeout "$limit" python3 "benchmarks/$script.py" "$@" --out "$out/$label.json" \
      > "$out/$label.log" 2>&1
  echo "exit $? after ${SECONDS}s"; tail -n 15 "$out/$label.log"
}

if [[ "${SMALL:-0}" == 1 ]]; then
  run sampling sampling 120 --episodes 2,8 --steps 50 --num_sampling_steps 10 --repeats 1
  run train_head train_head 120 --episodes 8,16 --steps_per_call 5 --calls 1 --baseline_steps 3 \
      --classes 8 --images_per_class 10 --dim 64
  run eval_end_to_end eval_end_to_end 120 --image_size 16 --classes 6 --images_per_class 20 --episodes 10 \
      --batch_episodes 10 --steps 50 --baseline_episodes 1
  run pretrain pretrain 120 --image_size 16 --batch 8 --train_images 64 --steps 2 --num_images 100 \
      --classes 5 --extract_batch 50 --episodes 10 --repeats 1
  run memory memory 120 --steps 10 --dim 16 --episodes 1,4
  run eval_end_to_end_bf16 eval_end_to_end 120 --image_size 16 --classes 6 --images_per_class 20 \
      --episodes 10 --batch_episodes 10 --steps 50 --baseline_episodes 1 --dtype bfloat16
  exit 0
fi
run sampling sampling 150 --episodes 1,1024,8192,65536 --baseline_max_episodes 8192 \
    --num_sampling_steps 50,250 --repeats 3
run eval_end_to_end eval_end_to_end 110 --backbone resnet12 --image_size 84 --images_per_class 600 \
    --episodes 600 --batch_episodes 600 --embed_batch 1000 --baseline_episodes 2
run train_head train_head 110 --episodes 8,64,256,1024,4096 --steps_per_call 500 --calls 3 \
    --baseline_steps 50 --baseline_max_episodes 1024
run pretrain pretrain 150 --backbone resnet12 --image_size 84 --batch 128 --num_images 12000 \
    --extract_batch 1000 --steps 20 --repeats 3
run memory memory 100 --episodes 1,64,1024
run eval_end_to_end_bf16 eval_end_to_end 90 --backbone resnet12 --image_size 84 \
    --images_per_class 600 --episodes 600 --batch_episodes 600 --embed_batch 1000 \
    --baseline_episodes 1 --dtype bfloat16
