#!/usr/bin/env bash
# The GPU benchmark of docs/performance.md: WRN-40-2 -> WRN-16-2, ce/kd/afd interleaved in one
# process, for each batch x dtype x batch-norm grouping. Needs only jax (a CUDA build), flax,
# optax and numpy. Appends one JSON object per configuration to OUT.jsonl and prints a table.
#   bash launch/gpu_bench.sh [OUT.jsonl] [BATCHES] [DTYPES] [BN_GROUP_SIZES]
# defaults: gpu_bench.jsonl, "64 1024", "float32 bfloat16", "0 32" (0: global batch norm;
# 32: statistics over groups of 32 examples, config.bn_group_size).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_bench.jsonl}
batches=${2:-64 1024}
dtypes=${3:-float32 bfloat16}
groups=${4:-0 32}
for batch in $batches; do
  for dtype in $dtypes; do
    for group in $groups; do
      python3 -m afd_jax.bench --teacher wrn40x2 --student wrn16x2 --batch "$batch" \
          --dtype "$dtype" --bn-group-size "$group" --method all --steps 30 --rounds 3 \
          --warmup 5 --json | tee -a "$out"
    done
  done
done
python3 - "$out" <<'PY'
import json, sys
for line in open(sys.argv[1]):
  r = json.loads(line)
  bn = f"BN groups of {r['bn_group_size']}" if r.get('bn_group_size') else 'global BN'
  print(f"{r['device']}, batch {r['batch']}, {r['dtype']} (teacher {r.get('teacher_dtype')}), "
        f"{bn}: " + ', '.join(
      f"{x['method']} {x['median_step_ms']:.2f} ms ({x['images_per_s']:.0f} img/s, "
      f"{x['tflops_per_s']:.1f} TFLOP/s, compile {x['compile_s']:.0f} s)" for x in r['results'])
      + f"; afd/kd {r['afd_over_kd']:.3f}, kd/ce {r['kd_over_ce']:.3f}")
PY
