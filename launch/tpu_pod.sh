#!/usr/bin/env bash
# clrjax on a Cloud TPU VM pod slice: the same command on every worker (one JAX process per host).
#
#   export TPU=my-v4-32 ZONE=us-central2-b [PROJECT=my-project]
#   launch/tpu_pod.sh setup        # copy this checkout to every worker and pip-install it
#   launch/tpu_pod.sh run experiments/train.py --config=configs/simclr.py:imagenet \
#       --workdir=/mnt/shared/runs/simclr_in1k
#   DRY_RUN=1 launch/tpu_pod.sh run ...   # print the gcloud commands instead of running them
#
# The workdir must be one directory every worker sees (Filestore/NFS or a gcsfuse mount at the
# same path): all processes write the checkpoint together.
# Resume after preemption (spot/preemptible slices): recreate the slice if needed, run `setup`
# again, then run the same `run` command; training resumes from the last checkpoint.
# Environment: REMOTE_DIR (default clrjax, relative to the worker's home), PYTHON (default
# python3), JAX_SPEC (default "jax[tpu]"), WORKER_HOSTNAMES (default: read from gcloud).
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
PYTHON="${PYTHON:-python3}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
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

worker_hostnames() {
  # jax.distributed's Cloud TPU detection (and clrjax.parallel's) reads TPU_WORKER_HOSTNAMES;
  # set it explicitly so every worker agrees on the coordinator (worker 0).
  if [ -n "${WORKER_HOSTNAMES:-}" ]; then
    echo "$WORKER_HOSTNAMES"
  elif [ "${DRY_RUN:-0}" = "1" ]; then
    echo "<worker-ips-from-gcloud-describe>"
  else
    "${GCLOUD[@]}" describe "$TPU" --zone="$ZONE" ${PROJECT_ARGS[@]+"${PROJECT_ARGS[@]}"} \
      --format='value(networkEndpoints[].ipAddress)' | tr ';' ','
  fi
}

case "$ACTION" in
  setup)
    ARCHIVE="/tmp/clrjax-$$.tar.gz"
    run_cmd tar -czf "$ARCHIVE" -C "$REPO" --exclude=.venv --exclude=.git --exclude=runs \
      --exclude=__pycache__ .
    run_cmd "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU:clrjax.tar.gz" --zone="$ZONE" ${PROJECT_ARGS[@]+"${PROJECT_ARGS[@]}"} --worker=all
    on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf clrjax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && $PYTHON -m pip install -q -e . '$JAX_SPEC'"
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
    on_all_workers "cd $REMOTE_DIR && TPU_WORKER_HOSTNAMES=$(worker_hostnames) $PYTHON $REMOTE_ARGS"
    ;;
  *)
    usage;;
esac
