#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create (or reuse) it, copy this checkout (git HEAD) to every
# worker, install, and run the same afd_jax command on all workers (--worker=all). JAX finds the
# other hosts from the TPU metadata (afd_jax calls jax.distributed.initialize when it sees
# several workers); each host reads its own share of the data.
#
#   launch/tpu_pod.sh [--dry-run] [--create] --name NAME --zone ZONE [--type v4-32] \
#       [--version tpu-ubuntu2204-base] [--project PROJECT] -- AFD_JAX_MAIN_ARGS...
#
# Example (ImageNet, AFD, ResNet-34 -> ResNet-18):
#   launch/tpu_pod.sh --create --name afd --zone us-central2-b --type v4-32 -- \
#       --config=configs/imagenet.py:method=afd --workdir=gs://BUCKET/runs/imagenet-afd \
#       --config.dataset.data_dir=gs://BUCKET/tfds --config.teacher.checkpoint=/home/$USER/resnet34.pth
# The workdir must be shared storage (GCS) that every worker sees; a .pth teacher must be on
# every worker's disk (copy it with `gcloud compute tpus tpu-vm scp --worker=all`).
# Rerunning the same command resumes from the workdir's latest checkpoint (preemption-safe).
# --dry-run prints the gcloud commands instead of running them.
set -euo pipefail
dry=0; create=0; name=''; zone=''; type='v4-32'; version='tpu-ubuntu2204-base'; project=''
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --create) create=1 ;;
    --name) name=$2; shift ;;
    --zone) zone=$2; shift ;;
    --type) type=$2; shift ;;
    --version) version=$2; shift ;;
    --project) project=$2; shift ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$name" ] || [ -z "$zone" ] || [ $# -eq 0 ]; then
  echo "tpu_pod.sh: --name, --zone and the afd_jax arguments after -- are required" >&2; exit 2
fi
cd "$(dirname "$0")/.."
common=(--zone "$zone")
[ -n "$project" ] && common+=(--project "$project")
run() {
  if [ $dry = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
quoted=$(printf '%q ' "$@")
if [ $create = 1 ]; then
  if [ $dry = 1 ] || ! gcloud compute tpus tpu-vm describe "$name" "${common[@]}" >/dev/null 2>&1; then
    run gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$type" \
        --version "$version"
  fi
fi
run git archive --format=tar.gz -o /tmp/afd_jax.tar.gz HEAD
run gcloud compute tpus tpu-vm scp /tmp/afd_jax.tar.gz "$name:~/afd_jax.tar.gz" "${common[@]}" \
    --worker=all
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command \
    "mkdir -p afd_jax && tar -xzf afd_jax.tar.gz -C afd_jax && cd afd_jax && \
python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2' \
-f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command \
    "cd afd_jax && .venv/bin/python -m afd_jax.main $quoted"
