#!/usr/bin/env bash
# clrjax on a Cloud TPU VM pod slice: the same command on every worker (one JAX process per host).
#
#   export TPU=my-v4-32 ZONE=us-central2-b [PROJECT=my-project]
#   launch/tpu_pod.sh setup        # copy this checkout to every worker, make a Python 3.11 venv there
#   launch/tpu_pod.sh run experiments/train.py --config=configs/simclr.py:imagenet \
#       --workdir=/mnt/shared/runs/simclr_in1k
#   DRY_RUN=1 launch/tpu_pod.sh run ...   # print the gcloud commands instead of running them
#
# `run` is only `gcloud compute tpus tpu-vm ssh --worker=all --command="cd clrjax && .venv/bin/python ..."`:
# every worker finds the others itself (clrjax.clusters asks the TPU VM metadata server for
# worker-network-endpoints, as jax.distributed's GceTpuCluster does), so the same gcloud command
# typed by hand works too.
# Python: jax 0.10.2 (and flax, orbax) require Python >= 3.11, newer than the system python3 of
# older TPU VM images (Ubuntu 22.04: 3.10). `setup` therefore installs uv with the system pip and
# lets `uv venv --python $PYTHON_VERSION` use a system Python of that version or download one.
# The workdir must be one directory every worker sees (Filestore/NFS or a gcsfuse mount at the
# same path): all processes write the checkpoint together.
# Resume after preemption (spot/preemptible slices): recreate the slice if needed, run `setup`
# again, then run the same `run` command; training resumes from the last checkpoint.
# Environment: REMOTE_DIR (default clrjax, relative to the worker's home), PYTHON_VERSION
# (default 3.11), SYSTEM_PYTHON (default python3, only runs pip install uv), JAX_SPEC
# (default "jax[tpu]").
set -euo pipefail

usage() {
  echo "usage: TPU=<name> ZONE=<zone> $0 setup | run <script.py> [args...]" >&2
  exit 2
}

[ $# -ge 1 ] || usage
ACTION="$1"; shift
: "${TPU:?set TPU=<TPU VM name>, e.g. TPU=my-v4-32}"
: "${ZONE:?set ZONE=<zone of the TPU>, e.g. ZONE=us-central2-b}"
REMOTE_DIR="${REMOTE_DIR:-clrjax}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
SYSTEM_PYTHON="${SYSTEM_PYTHON:-python3}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
VENV_PYTHON=".venv/bin/python"   # relative to REMOTE_DIR
GCLOUD=(gcloud compute tpus tpu-vm)
PROJECT_ARGS=()
[ -n "${PROJECT:-}" ] && PROJECT_ARGS=(--project="$PROJECT")
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

shell_quote() {  # readable quoting for printed commands: plain words stay bare
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
run_cmd() {  # prints (DRY_RUN=1) or runs one command
  if [ "${DRY_RUN:-0}" = "1" ]; then
    shell_quote "$@"
  else
    "$@"
  fi
}

on_all_workers() {
  run_cmd "${GCLOUD[@]}" ssh "$TPU" --zone="$ZONE" ${PROJECT_ARGS[@]+"${PROJECT_ARGS[@]}"} --worker=all --command="$1"
}

case "$ACTION" in
  setup)
    ARCHIVE="/tmp/clrjax-$$.tar.gz"
    run_cmd tar -czf "$ARCHIVE" -C "$REPO" --exclude=.venv --exclude=.git --exclude=runs \
      --exclude=__pycache__ .
    run_cmd "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU:clrjax.tar.gz" --zone="$ZONE" ${PROJECT_ARGS[@]+"${PROJECT_ARGS[@]}"} --worker=all
    # pip refuses --user installs on images whose python is "externally managed" (PEP 668).
    UV_INSTALL="$SYSTEM_PYTHON -m pip install -q --user uv || $SYSTEM_PYTHON -m pip install -q --user --break-system-packages uv"
    on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf clrjax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && ($UV_INSTALL) && ~/.local/bin/uv venv -q --allow-existing --python $PYTHON_VERSION .venv && ~/.local/bin/uv pip install -q --python $VENV_PYTHON -e . '$JAX_SPEC'"
    ;;
  run)
    [ $# -ge 1 ] || usage
    for arg in "$@"; do
      case "$arg" in
        --coordinator_address=*|--num_processes=*|--process_id=*)
          echo "error: $arg is detected by jax.distributed on a TPU pod; remove it from the command." >&2
          exit 2;;
      esac
    done
    REMOTE_ARGS="$(shell_quote "$@")"
    on_all_workers "cd $REMOTE_DIR && $VENV_PYTHON $REMOTE_ARGS"
    ;;
  *)
    usage;;
esac
