"""The benchmark runs where only jax, flax, optax and numpy are installed (TensorFlow, TFDS,
ml_collections, clu, orbax and torch are made unimportable): its default methods (ce, kd,
afd), its table, the collectives of global and grouped batch norm, and its refusal of bad
arguments."""
import json
import subprocess
import sys

import pytest

from tests import runs

BLOCKED = ('tensorflow', 'tensorflow_datasets', 'ml_collections', 'clu', 'orbax', 'torch')
RUN_WITHOUT = (
    'import sys\n'
    f'for name in {BLOCKED!r}:\n'
    '  sys.modules[name] = None  # any import of it raises ImportError\n'
    'from afd_jax import bench\n'
    'sys.exit(bench.main(sys.argv[1:]))\n')


def bench(*args):
  result = subprocess.run([sys.executable, '-c', RUN_WITHOUT, *args], capture_output=True,
                          text=True, timeout=300, env=runs.env(), cwd=runs.REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_bench_runs_its_default_methods_without_tensorflow_or_ml_collections():
  result = bench('--teacher', 'resnet8', '--student', 'resnet8', '--batch', '8', '--devices', '1',
                 '--image-size', '8', '--num-classes', '10', '--steps', '4', '--rounds', '2',
                 '--warmup', '1', '--json')
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert [r['method'] for r in report['results']] == ['ce', 'kd', 'afd']
  for r in report['results']:
    assert r['steps_timed'] == 4 and r['median_step_ms'] > 0 and r['compile_s'] > 0
    assert r['images_per_s'] > 0 and r['gflops_per_step'] > 0
  assert report['afd_over_kd'] > 0 and report['kd_over_ce'] > 0
  assert report['batch'] == 8 and report['dtype'] == 'float32'


def test_bench_prints_a_table_and_counts_the_collectives_of_global_and_grouped_batch_norm():
  """On 4 fake CPU devices (--devices): the table (with the compiled step's collectives) and
  ratios for the global batch norm, in bfloat16; the JSON for groups of the per-device batch.
  Groups leave one all-reduce in the step; the global batch norm needs one per layer and pass."""
  common = ('--teacher', 'resnet8', '--student', 'resnet8', '--batch', '8', '--devices', '4',
            '--image-size', '8', '--num-classes', '10', '--steps', '2', '--rounds', '1',
            '--warmup', '1')
  lines = bench(*common, '--method', 'kd,at', '--dtype', 'bfloat16').stdout.splitlines()
  assert 'x 4 (cpu)' in lines[0] and 'bfloat16' in lines[0] and 'global BN' in lines[0]
  assert lines[1].split() == ['method', 'compile', 's', 'step', 'ms', 'img/s', 'GFLOP/step',
                              'TFLOP/s', 'collectives', 'MB']
  kd_row = next(l.split() for l in lines if l.startswith('kd '))
  assert int(kd_row[6]) >= 18  # resnet8's 9 batch norms, forward and backward
  assert any(l.startswith('at/kd: ') for l in lines)
  result = bench(*common, '--bn-group-size', '2', '--vs-global-bn', '--method', 'kd', '--json')
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['devices'] == 4 and report['bn_group_size'] == 2
  counts = report['results'][0]['collectives']
  assert counts == {'all-reduce': counts['total'], 'total': counts['total']}
  assert counts['total']['count'] == 1 and counts['total']['bytes'] > 0
  # --vs-global-bn: the same method with the global batch norm, timed in the same rounds.
  (global_kd,) = report['global_bn_results']
  assert global_kd['method'] == 'kd' and global_kd['steps_timed'] == 2
  assert global_kd['collectives']['all-reduce']['count'] >= 18
  assert report['grouped_over_global']['kd'] == pytest.approx(
      report['results'][0]['median_step_ms'] / global_kd['median_step_ms'])


def test_bench_rejects_bad_arguments():
  result = subprocess.run([sys.executable, '-c', RUN_WITHOUT, '--method', 'crdd'],
                          capture_output=True, text=True, timeout=120, env=runs.env(),
                          cwd=runs.REPO)
  assert result.returncode == 2 and "unknown method(s) ['crdd']" in result.stderr
