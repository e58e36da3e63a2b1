#!/usr/bin/env bash
# Runs one MetaDiff job on a Cloud TPU VM slice (e.g. v4-32: 4 workers), then deletes it.
#
# Usage:
#   BUCKET=my-bucket launch/tpu_pod.sh [options] [-- extra args for metadiff_jax.main]
#
#   BUCKET=my-bucket TYPE=v4-32 launch/tpu_pod.sh --config configs/miniimagenet_resnet12.py \
#       -- --config.train.steps=100000
#
# Steps (each printed as "+ command" before it runs; gcloud's ssh/scp use --worker=all):
#   1. gcloud compute tpus tpu-vm create NAME --zone ZONE --accelerator-type TYPE --version RUNTIME
#   2. puts the code on every worker: a tarball of REPO (a local checkout: its tracked and
#      untracked-but-not-ignored files) copied with tpu-vm scp, or `git clone` of REPO (a URL)
#   3. on every worker: installs gcsfuse if missing and mounts gs://BUCKET at MOUNT
#      (gcsfuse --implicit-dirs ...), so the workdir and the datasets are plain POSIX paths
#   4. on every worker: a Python PYTHON_VERSION venv (made with uv) and
#      `pip install -e . "jax[tpu]"`
#   5. on every worker at once: python -m metadiff_jax.main --config CONFIG --workdir WORKDIR
#      --config.data.data_dir=DATA_DIR [extra args]; jax.distributed detects the slice itself
#   6. gcloud compute tpus tpu-vm delete NAME, also when a step fails or on Ctrl-C (not with
#      KEEP=1, and never for a slice whose create failed: it may be someone else's)
# Re-running the same command resumes the run from its checkpoints in WORKDIR.
#
# Options (each also an environment variable; the flag wins):
#   --name NAME           NAME, the slice's name, default metadiff-tpu
#   --zone ZONE           ZONE, default us-central2-b
#   --type TYPE           TYPE, the accelerator type, default v4-32 (v5e: v5litepod-32)
#   --runtime VERSION     RUNTIME, the TPU VM image, default tpu-ubuntu2204-base (v4; v5e:
#                         v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
#   --project PROJECT     PROJECT, default gcloud's configured project
#   --bucket BUCKET       BUCKET (required), a GCS bucket name without gs://
#   --config FILE         CONFIG, default configs/miniimagenet_resnet12.py (a path in the repo,
#                         presets allowed: configs/x.py:shot=1)
#   --workdir DIR         WORKDIR, default MOUNT/runs/NAME
#   --data-dir DIR        DATA_DIR, default MOUNT/tensorflow_datasets
#   --repo SRC            REPO, a local checkout (default: the one holding this script) or a
#                         git URL to clone on the workers
#   --ref REF             REF, the branch or tag to clone (URL only), default the default branch
#   --spot                SPOT=1: a Spot slice (cheaper, may be preempted: re-run to resume)
#   --preemptible         PREEMPTIBLE=1: a preemptible slice (older TPU types)
#   --keep                KEEP=1: leave the slice running at the end
#   --skip-create         SKIP_CREATE=1: use an existing slice NAME (still deleted unless KEEP=1)
#   --dry-run             DRY_RUN=1: print every command (prefixed "+ "), run none (needs no gcloud)
#   -h, --help            this text
#   MOUNT                 where the bucket is mounted on the workers, default /mnt/BUCKET
#   GCSFUSE_FLAGS         default "--implicit-dirs --rename-dir-limit=100000
#                         --metadata-cache-ttl-secs=0" (renames: Orbax commits a checkpoint by
#                         renaming its directory; no metadata cache: every worker sees the
#                         files that process 0 wrote)
#   PYTHON_VERSION        the workers' Python, default 3.11 (the images have 3.10; the tested
#                         jax/flax need >= 3.11)
#   SCOPES                service account scopes, default cloud-platform ("" to leave gcloud's)
#   CREATE_FLAGS          more flags for tpu-vm create, e.g. "--reserved --network=my-net"
#   EXTRA_ARGS            more args for main, space-separated (after those given after --)
#
# What to change: BUCKET, ZONE/TYPE/RUNTIME for your quota, CONFIG. Put the built datasets in
# gs://BUCKET/tensorflow_datasets/ first (build locally with `python -m metadiff_jax.data build
# NAME --data_dir DIR`, then `gcloud storage cp -r DIR/NAME gs://BUCKET/tensorflow_datasets/`).
# config.pretrain.batch_size and config.train.episodes_per_step must be multiples of the
# slice's device count (v4-32: 16 chips; 128 and 16 work). Results (results.md, metrics,
# checkpoints) end up in gs://BUCKET/runs/NAME; the workers' output streams to this terminal.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

options --name=metadiff-tpu --zone=us-central2-b --type=v4-32 --runtime=tpu-ubuntu2204-base \
  --project= --bucket= --config=configs/miniimagenet_resnet12.py --workdir= --data-dir= \
  "--repo=$LAUNCH_REPO" --ref= --spot --preemptible --keep --skip-create
defaults MOUNT= PYTHON_VERSION=3.11 CREATE_FLAGS= \
  "GCSFUSE_FLAGS=--implicit-dirs --rename-dir-limit=100000 --metadata-cache-ttl-secs=0" \
  "SCOPES?=https://www.googleapis.com/auth/cloud-platform"
parse_args "$@"

[[ -n "$BUCKET" ]] || die "set BUCKET (or --bucket), the GCS bucket for the workdir and the datasets"
BUCKET="${BUCKET#gs://}"
BUCKET="${BUCKET%/}"
MOUNT="${MOUNT:-/mnt/$BUCKET}"
WORKDIR="${WORKDIR:-$MOUNT/runs/$NAME}"
DATA_DIR="${DATA_DIR:-$MOUNT/tensorflow_datasets}"
dry || command -v gcloud >/dev/null ||
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) and run gcloud init"

TPU=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=("--project=$PROJECT")
on_all() {  # runs a shell command line on every worker at once
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all "--command=$1"
}

# The code and the venv on the workers, in the home directory (~ expands there).
# shellcheck disable=SC2088
CODE='~/metadiff_jax'
VENV='~/metadiff_venv'

CREATING=0
CREATED=0
TARBALL=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  [[ -n "$TARBALL" ]] && ! dry && rm -f "$TARBALL"
  if [[ "$CREATING" == 1 && "$CREATED" == 0 ]]; then
    echo "the slice was not created; if one named $NAME exists and is yours, delete it with:" \
         "$(quote "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet)" >&2
  fi
  if [[ "$CREATED" == 1 ]]; then
    if [[ "$KEEP" == 1 ]]; then
      echo "KEEP=1: the slice $NAME is still running (billed); delete it with:" >&2
      echo "  $(quote "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet)" >&2
    else
      run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet || {
        echo "error: could not delete the slice $NAME; delete it by hand:" \
             "$(quote "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet)" >&2
        [[ $rc -ne 0 ]] || rc=1
      }
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP  # a closed terminal still deletes the slice

# 1. The slice.
if [[ "$SKIP_CREATE" == 1 ]]; then
  CREATED=1
else
  CREATE=("${TPU[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=$TYPE" "--version=$RUNTIME")
  [[ "$SPOT" == 1 ]] && CREATE+=(--spot)
  [[ "$PREEMPTIBLE" == 1 ]] && CREATE+=(--preemptible)
  [[ -n "$SCOPES" ]] && CREATE+=("--scopes=$SCOPES")
  if [[ -n "$CREATE_FLAGS" ]]; then read -r -a more <<< "$CREATE_FLAGS"; CREATE+=("${more[@]}"); fi
  CREATING=1
  run "${CREATE[@]}"
  CREATED=1
fi

# 2. The code on every worker.
if [[ "$REPO" == *://* || "$REPO" == git@* ]]; then
  on_all "rm -rf $CODE && git clone --depth=1 ${REF:+--branch=$(quote "$REF") }$(quote "$REPO") $CODE"
else
  [[ -d "$REPO" ]] || die "REPO '$REPO' is neither a directory nor a git URL"
  TARBALL="${TMPDIR:-/tmp}/metadiff_jax-$NAME-$$.tgz"
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked and untracked-but-not-ignored files, less those deleted from the working tree.
    PACK="cd $(quote "$REPO") && git ls-files -z --cached --others --exclude-standard \
| while IFS= read -r -d '' f; do if [ -e \"\$f\" ]; then printf '%s\\0' \"\$f\"; fi; done \
| COPYFILE_DISABLE=1 tar -czf $(quote "$TARBALL") --null -T -"
    echo "+ $PACK"
    dry || bash -o pipefail -c "$PACK"
  else
    run tar -czf "$TARBALL" -C "$REPO" --exclude=.git --exclude=.venv --exclude=runs \
      --exclude=__pycache__ .
  fi
  run "${TPU[@]}" scp "$TARBALL" "$NAME:metadiff_jax.tgz" "${WHERE[@]}" --worker=all
  on_all "rm -rf $CODE && mkdir -p $CODE && tar -xzf ~/metadiff_jax.tgz -C $CODE"
fi

# 3. The bucket, mounted on every worker.
APT="sudo apt-get -o DPkg::Lock::Timeout=600 -q"
on_all "set -e; if ! command -v gcsfuse >/dev/null; then \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
$APT update && $APT install -y gcsfuse; fi; \
sudo mkdir -p $(quote "$MOUNT") && sudo chown \$(id -u):\$(id -g) $(quote "$MOUNT"); \
mountpoint -q $(quote "$MOUNT") || gcsfuse $GCSFUSE_FLAGS $(quote "$BUCKET" "$MOUNT")"

# 4. Python and the package on every worker.
on_all "set -e; cd $CODE; test -x $VENV/bin/python || { python3 -m pip install --user -q uv \
&& python3 -m uv venv --seed --python $(quote "$PYTHON_VERSION") $VENV; }; \
$VENV/bin/pip install -q -e . \"jax[tpu]\""

# 5. The run, on every worker at once.
main_args "--config.data.data_dir=$DATA_DIR"
on_all "cd $CODE && $VENV/bin/python $(quote "${MAIN_ARGS[@]}")"
WHERE_TO="$WORKDIR on the workers"
[[ "$WORKDIR" == "$MOUNT"/* ]] && WHERE_TO="gs://$BUCKET/${WORKDIR#"$MOUNT"/}"
if dry; then echo "dry run: nothing was run; results would go to $WHERE_TO"
else echo "finished: results in $WHERE_TO (results.md, results.json)"; fi
# 6. The EXIT trap deletes the slice.
