#!/usr/bin/env bash
# The GPU benchmark of docs/performance.md: WRN-40-2 -> WRN-16-2, ce/kd/afd interleaved in one
# process, batch 64 and 1024, float32 and bfloat16. Needs only jax (a CUDA build), flax, optax and
# numpy. Writes one JSON object per configuration to ${1:-gpu_bench.jsonl} and prints tables.
#   bash launch/gpu_bench.sh [OUT.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_bench.jsonl}
: > "$out"
for batch in 64 1024; do
  for dtype in float32 bfloat16; do
    python3 -m afd_jax.bench --teacher wrn40x2 --student wrn16x2 --batch "$batch" \
        --dtype "$dtype" --method all --steps 50 --rounds 5 --warmup 5 --json | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, sys
for line in open(sys.argv[1]):
  r = json.loads(line)
  print(f"{r['device']}, batch {r['batch']}, {r['dtype']}: " + ', '.join(
      f"{x['method']} {x['median_step_ms']:.2f} ms ({x['images_per_s']:.0f} img/s, "
      f"{x['tflops_per_s']:.1f} TFLOP/s)" for x in r['results'])
      + f"; afd/kd {r['afd_over_kd']:.3f}, kd/ce {r['kd_over_ce']:.3f}")
PY
