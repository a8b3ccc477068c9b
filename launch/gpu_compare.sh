#!/usr/bin/env bash
# The GPU comparison of docs/performance.md, in one go on one GPU: afd_jax's training step
# (python -m afd_jax.bench, ce/kd/afd interleaved in one process) and the official PyTorch AFD
# code's (launch/gpu_compare.py official, the same three steps and shapes) for
#   WRN-40-2 -> WRN-16-2, 32x32, batch 64, float32
#   WRN-40-2 -> WRN-16-2, 32x32, batch 1024, bfloat16
#   resnet34im -> resnet18im, 224x224, 1000 classes, batch 256, bfloat16
# then one markdown table (step ms and images/s per method, afd/kd, ours/official) on stdout and
# in OUT.md, the raw JSON lines beside it in OUT.jsonl.
#
#   AFD_OFFICIAL_DIR=<checkout of clovaai/attention-feature-distillation> \
#     bash launch/gpu_compare.sh [--out OUT.md] [--steps 30] [--rounds 3] [--warmup 5] \
#       [--bn-group-size K] [--dry-run]
#
# --out defaults to $OUT/gpu_compare.md ($OUT unset: ./gpu_compare.md). --bn-group-size K also
# times our WRN steps with batch-norm statistics over groups of K examples (the official code has
# global batch norm only). --dry-run prints every command, in order, and runs none (it needs no
# GPU, torch or AFD_OFFICIAL_DIR). Needs python3 with jax (CUDA), flax, optax, numpy and torch
# (CUDA); PYTHON=... picks another interpreter. The official code is read from AFD_OFFICIAL_DIR
# as it is, never copied here.
set -euo pipefail
dry=0; out=''; steps=30; rounds=3; warmup=5; group=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out|--steps|--rounds|--warmup|--bn-group-size)
      if [ $# -lt 2 ]; then echo "gpu_compare.sh: $1 needs a value" >&2; exit 2; fi
      case "$1" in
        --out) out=$2 ;; --steps) steps=$2 ;; --rounds) rounds=$2 ;; --warmup) warmup=$2 ;;
        --bn-group-size) group=$2 ;;
      esac
      shift ;;
    *) echo "gpu_compare.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
for value in "$steps" "$rounds" "$warmup" "$group"; do
  case "$value" in
    ''|*[!0-9]*) echo "gpu_compare.sh: --steps, --rounds, --warmup and --bn-group-size take" \
                      "whole numbers, not '$value'" >&2; exit 2 ;;
  esac
done
steps=$((10#$steps)); rounds=$((10#$rounds)); warmup=$((10#$warmup)); group=$((10#$group))
if [ $steps = 0 ] || [ $rounds = 0 ]; then
  echo "gpu_compare.sh: --steps and --rounds must be at least 1" >&2; exit 2
fi
if [ "$group" != 0 ] && { [ $((64 % group)) != 0 ] || [ $((1024 % group)) != 0 ]; }; then
  echo "gpu_compare.sh: --bn-group-size $group must divide the batches 64 and 1024" >&2; exit 2
fi
out=${out:-${OUT:-$PWD}/gpu_compare.md}
case "$out" in /*) ;; *) out=$PWD/$out ;; esac
official=${AFD_OFFICIAL_DIR:-}
if [ $dry = 0 ]; then
  if [ -z "$official" ]; then
    echo "gpu_compare.sh: set AFD_OFFICIAL_DIR to a checkout of" \
         "clovaai/attention-feature-distillation (or pass --dry-run)" >&2; exit 2
  fi
  if [ ! -f "$official/distill/AFD.py" ]; then
    echo "gpu_compare.sh: AFD_OFFICIAL_DIR=$official is not a checkout of" \
         "clovaai/attention-feature-distillation (no distill/AFD.py)" >&2; exit 2
  fi
fi
official=${official:-'$AFD_OFFICIAL_DIR'}
case "$official" in /*|'$AFD_OFFICIAL_DIR') ;; *) official=$PWD/$official ;; esac
raw=${out%.md}.jsonl
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
case "$py" in /*) ;; */*) py=$PWD/$py ;; esac  # a relative path, from here
timing=(--steps "$steps" --rounds "$rounds" --warmup "$warmup")

# run [--append FILE] CMD...: print it (--dry-run) or show and run it, stdout appended to FILE.
run() {
  local to=''
  if [ "$1" = --append ]; then to=$2; shift 2; fi
  local line; line=$(printf '%q ' "$@"); line=${line% }
  [ -n "$to" ] && line+=" >> $(printf '%q' "$to")"
  line=${line//\\\$AFD_OFFICIAL_DIR/\"\$AFD_OFFICIAL_DIR\"}  # unset (--dry-run): as a variable
  if [ $dry = 1 ]; then echo "$line"; return; fi
  echo "+ $line"
  if [ -n "$to" ]; then "$@" >> "$to"; else "$@"; fi
}

run cd "$repo"
run "$py" launch/gpu_compare.py check --official-dir "$official"
run mkdir -p "$(dirname "$out")"
run rm -f "$raw"
# teacher student image-size num-classes batch dtype
for spec in "wrn40x2 wrn16x2 32 100 64 float32" "wrn40x2 wrn16x2 32 100 1024 bfloat16" \
            "resnet34im resnet18im 224 1000 256 bfloat16"; do
  read -r teacher student size classes batch dtype <<< "$spec"
  shape=(--teacher "$teacher" --student "$student" --image-size "$size" --num-classes "$classes"
         --batch "$batch" --dtype "$dtype")
  run --append "$raw" "$py" -m afd_jax.bench "${shape[@]}" --method all "${timing[@]}" --json
  if [ "$group" != 0 ] && [ "$teacher" = wrn40x2 ]; then
    run --append "$raw" "$py" -m afd_jax.bench "${shape[@]}" --bn-group-size "$group" \
        --method all "${timing[@]}" --json
  fi
  run --append "$raw" "$py" launch/gpu_compare.py official --official-dir "$official" \
      "${shape[@]}" "${timing[@]}"
done
run "$py" launch/gpu_compare.py table "$raw" --out "$out"
