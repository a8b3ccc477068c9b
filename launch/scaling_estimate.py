"""The scaling estimate of docs/performance.md, on paper: how much of a data-parallel AFD step
is communication on 8, 64 and 256 chips, with global and with grouped batch norm.

Measured here (8 fake CPU devices, nothing is timed): for each pair and per-device batch, the
AFD train step (`step.jit_train_step`, the trainer's) is compiled with global batch norm and
with groups of the per-device batch; XLA's cost analysis gives the FLOPs per device and
`afd_jax.collectives` the collectives of the optimised HLO (count, payload bytes). Neither
depends on the device count: the program is the same, only its replica groups grow.

Estimated from published figures (HARDWARE below, each with its source):
  communication = count x latency(n) + 2 (n - 1) / n x bytes / bandwidth     (ring all-reduce)
  compute       = FLOPs / peak bf16 FLOP/s                                    (a lower bound)
The collectives are taken as not overlapping compute: a global batch norm's forward reductions
cannot (each layer waits on its statistics); the gradient all-reduce could partly.

  .venv/bin/python launch/scaling_estimate.py [--pairs wrn40x2:wrn16x2,resnet56:resnet20]
"""
import argparse
import math
import os
import sys

import jax

jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_num_cpu_devices', 8)
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_backend_optimization_level=0').strip()  # nothing is timed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from afd_jax import bench, sharding  # pylint: disable=wrong-import-position

US = 1e-6
SCALING_BOOK = 'https://jax-ml.github.io/scaling-book/'


def torus_latency(shape, hop_s=1 * US, fixed_s=5 * US):
  """Small all-reduce on a TPU torus: bidirectional rings along each axis, reduce-scatter and
  all-gather, about k hops of ~1 us per axis of size k (scaling book, 'sharding': "Each hop over
  an ICI link has some intrinsic overhead ... typically around 1us"), plus a fixed cost (its
  measured 3-hop example took ~8 us against 3 us predicted: we add 5 us)."""
  return fixed_s + hop_s * sum(shape)


def nccl_latency(n, gpus_per_node=8, node_s=15 * US, level_s=32 * US):
  """Small NCCL all-reduce on H100s: ~15 us in one 8-GPU NVLink node (NCCL's own cost model,
  src/graph/tuning.cc: ring LL base 6.6 us + 14 NVLink hops x 0.6 us); across nodes, ~32 us
  more per level of the inter-node tree (2 nodes x 8 Hopper GPUs on NDR InfiniBand measured
  ~47 us, github.com/NVIDIA/nccl/issues/1244)."""
  nodes = max(1, n // gpus_per_node)
  return node_s + level_s * math.log2(nodes)


# Per chip: peak dense bf16 FLOP/s; all-reduce bandwidth (bytes/s); latency(n) of one small
# all-reduce; the torus (TPU) for 8 / 64 / 256 chips.
HARDWARE = {
    'TPU v5e': dict(  # docs.cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, ICI 1,600 Gbps
        peak=197e12, bandwidth=lambda n: 200e9,            # (one direction), 2D torus
        latency=lambda n: torus_latency({8: (2, 4), 64: (8, 8), 256: (16, 16)}[n])),
    'TPU v5p': dict(  # docs.cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, ICI 4,800 Gbps,
        peak=459e12, bandwidth=lambda n: 600e9,            # 3D torus
        latency=lambda n: torus_latency({8: (2, 2, 2), 64: (4, 4, 4), 256: (4, 8, 8)}[n])),
    'H100': dict(  # 989 TFLOP/s bf16 dense; NVLink all-reduce ~370 GB/s in practice (scaling
        peak=989e12,  # book, 'gpus'); across nodes one 400 Gb/s ConnectX-7 per GPU (DGX H100)
        bandwidth=lambda n: 370e9 if n <= 8 else 50e9, latency=nccl_latency),
}
DEVICES = (8, 64, 256)


def measure(teacher, student, per_device_batch, group):
  args = argparse.Namespace(
      teacher=teacher, student=student, qk_dim=128, batch=8 * per_device_batch,
      bn_group_size=group, teacher_dtype='', dtype='bfloat16', image_size=32, channels=3,
      num_classes=100, teacher_taps='', student_taps='', teacher_kwargs='', student_kwargs='')
  case = bench.Case('afd', args, sharding.make_mesh((-1, 1)))
  total = case.collectives['total']
  return {'flops': case.flops, 'count': total['count'], 'bytes': total['bytes']}


def communication_s(hw, n, count, nbytes):
  return count * hw['latency'](n) + 2 * (n - 1) / n * nbytes / hw['bandwidth'](n)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--pairs', default='wrn40x2:wrn16x2,resnet56:resnet20')
  parser.add_argument('--batches', default='64,128', help='per-device batches')
  args = parser.parse_args(argv)
  assert jax.device_count() == 8
  rows = []
  for pair in args.pairs.split(','):
    teacher, student = pair.split(':')
    for b in (int(x) for x in args.batches.split(',')):
      rows.append((teacher, student, b, measure(teacher, student, b, 0),
                   measure(teacher, student, b, b)))
  print('| pair | batch / device | GFLOP / device / step | collectives, global BN | '
        'collectives, grouped BN (k = batch / device) |')
  print('|---|---|---|---|---|')
  for t, s, b, g, k in rows:
    print(f'| {t} -> {s} | {b} | {g["flops"] / 1e9:.1f} | {g["count"]} ({g["bytes"] / 1e6:.1f} MB)'
          f' | {k["count"]} ({k["bytes"] / 1e6:.1f} MB) |')
  print()
  print('Estimated communication per step, ms, global BN / grouped BN (share of the step with '
        'compute at peak bf16 in brackets):')
  print()
  print('| pair | batch / device | chip | compute at peak, ms | '
        + ' | '.join(f'{n} chips' for n in DEVICES) + ' |')
  print('|---|---|---|---|' + '---|' * len(DEVICES))
  for t, s, b, g, k in rows:
    for name, hw in HARDWARE.items():
      compute = g['flops'] / hw['peak']
      cells = []
      for n in DEVICES:
        cg = communication_s(hw, n, g['count'], g['bytes'])
        ck = communication_s(hw, n, k['count'], k['bytes'])
        cells.append(f'{1e3 * cg:.2f} / {1e3 * ck:.2f} ({cg / (cg + compute):.0%} / '
                     f'{ck / (ck + compute):.0%})')
      print(f'| {t} -> {s} | {b} | {name} | {1e3 * compute:.3f} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
