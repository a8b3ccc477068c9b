"""The benchmark runs where only jax, flax, optax and numpy are installed (the GPU machine's
set-up): TensorFlow, TFDS, ml_collections, clu and orbax are made unimportable."""
import json
import subprocess
import sys

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


def test_bench_all_methods_without_tensorflow_or_ml_collections():
  result = bench('--teacher', 'resnet14', '--student', 'resnet8', '--batch', '8',
                 '--image-size', '8', '--num-classes', '10', '--steps', '4', '--rounds', '2',
                 '--warmup', '1', '--json')
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert [r['method'] for r in report['results']] == ['ce', 'kd', 'afd']
  for r in report['results']:
    assert r['steps_timed'] == 4 and r['median_step_ms'] > 0 and r['compile_s'] > 0
    assert r['images_per_s'] > 0 and r['gflops_per_step'] > 0
  assert report['afd_over_kd'] > 0 and report['kd_over_ce'] > 0
  assert report['batch'] == 8 and report['dtype'] == 'float32'


def test_bench_counts_the_collectives_of_grouped_and_global_batch_norm():
  """--devices 4 (fake CPU devices) and --bn-group-size: the JSON reports the compiled step's
  collectives; groups of the per-device batch leave one all-reduce, the global batch norm one
  per layer and pass."""
  counts = {}
  for group in ('0', '2'):
    result = bench('--teacher', 'resnet8', '--student', 'resnet8', '--batch', '8', '--devices',
                   '4', '--bn-group-size', group, '--image-size', '8', '--num-classes', '10',
                   '--steps', '1', '--warmup', '0', '--method', 'kd', '--json')
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['devices'] == 4 and report['bn_group_size'] == int(group)
    counts[group] = report['results'][0]['collectives']
  assert counts['2'] == {'all-reduce': counts['2']['total'], 'total': counts['2']['total']}
  assert counts['2']['total']['count'] == 1 and counts['2']['total']['bytes'] > 0
  assert counts['0']['all-reduce']['count'] >= 14  # resnet8's 7 batch norms, forward + backward


def test_bench_prints_a_table_and_the_ratios():
  result = bench('--teacher', 'resnet8', '--student', 'resnet8', '--batch', '8',
                 '--image-size', '8', '--num-classes', '10', '--steps', '2', '--rounds', '1',
                 '--warmup', '1', '--method', 'kd,at', '--dtype', 'bfloat16')
  lines = result.stdout.splitlines()
  assert lines[1].split() == ['method', 'compile', 's', 'step', 'ms', 'img/s', 'GFLOP/step',
                              'TFLOP/s', 'collectives', 'MB']
  assert any(l.startswith('at/kd: ') for l in lines)


def test_bench_rejects_bad_arguments():
  result = subprocess.run([sys.executable, '-c', RUN_WITHOUT, '--method', 'crd'],
                          capture_output=True, text=True, timeout=120, env=runs.env(),
                          cwd=runs.REPO)
  assert result.returncode == 2 and "unknown method(s) ['crd']" in result.stderr
