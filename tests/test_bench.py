"""The benchmark runs where only jax, flax, optax and numpy are installed (TensorFlow, TFDS,
ml_collections, clu, orbax and torch are made unimportable): its default methods (ce, kd,
afd), its table, the collectives of global and grouped batch norm, the operations a step
launches (`collectives.top_level_ops`), the parameter bytes per device and XLA's memory
analysis, a segmentation pair (--head), and its refusal of bad arguments."""
import json
import subprocess
import sys

import pytest

from afd_jax import collectives
from tests import runs

BLOCKED = ('tensorflow', 'tensorflow_datasets', 'ml_collections', 'clu', 'orbax', 'torch')
RUN_WITHOUT = (
    'import sys\n'
    f'for name in {BLOCKED!r}:\n'
    '  sys.modules[name] = None  # any import of it raises ImportError\n'
    'from afd_jax import bench\n'
    'sys.exit(bench.main(sys.argv[1:]))\n')


# resnet8 with 10 classes: test_models.py's 83,892 at 100 classes, less 90 x (64 + 1).
RESNET8_PARAMETERS_10_CLASSES = 83892 - 90 * 65


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
  ce, kd, afd = (r['hlo_ops'] for r in report['results'])
  assert afd > kd > ce > 0  # KD adds the teacher's forward, AFD its attention module
  assert report['batch'] == 8 and report['dtype'] == 'float32'
  resnet8 = RESNET8_PARAMETERS_10_CLASSES * 4  # float32 bytes, one device holds them all
  assert [{k: r['param_bytes_per_device'][k] for k in ('teacher', 'student')}
          for r in report['results']] == [
      {'teacher': 0, 'student': resnet8}] + [{'teacher': resnet8, 'student': resnet8}] * 2
  ce_state, _, afd_state = (r['param_bytes_per_device']['train_state'] for r in report['results'])
  assert afd_state > ce_state > 2 * resnet8  # + momentum; AFD's module and its momentum
  for r in report['results']:  # the donated state is an argument aliased to an output
    memory = r['memory_per_device']
    assert memory['argument_bytes'] >= memory['alias_bytes'] >= r['param_bytes_per_device']['student']
    assert memory['output_bytes'] > 0 and memory['temp_bytes'] > 0


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
                              'TFLOP/s', 'collectives', 'MB', 'hlo', 'ops']
  kd_row = next(l.split() for l in lines if l.startswith('kd '))
  at_row = next(l.split() for l in lines if l.startswith('at '))
  assert int(kd_row[6]) >= 18  # resnet8's 9 batch norms, forward and backward
  assert int(at_row[8]) > int(kd_row[8]) > 0  # AT's attention maps and loss on top of KD
  assert any(l.startswith('at/kd: ') for l in lines)
  mib = f'{RESNET8_PARAMETERS_10_CLASSES * 4 / 2**20:.1f}'  # replicated: all on each device
  assert any(l.startswith(f'kd: per device, parameters teacher {mib} MiB, student {mib} MiB, '
                          'train state ') and '; XLA: arguments ' in l for l in lines)
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


def test_bench_shards_the_teacher_and_the_train_state_over_the_model_axis_of_its_mesh():
  """--mesh 2,4 --shard-teacher --shard-student on 8 fake devices: a device holds under 0.3x of
  resnet14's parameter bytes (split four ways, small arrays that 4 does not divide replicated)
  and under 0.35x of the student's (replicated, each holds them all: the test above)."""
  result = bench('--teacher', 'resnet14', '--student', 'resnet8', '--batch', '8', '--devices',
                 '8', '--mesh', '2,4', '--shard-teacher', '--shard-student', '--image-size', '8',
                 '--num-classes', '10', '--steps', '1', '--rounds', '1', '--warmup', '1',
                 '--method', 'kd', '--json')
  (kd,) = json.loads(result.stdout.strip().splitlines()[-1])['results']
  resnet14 = (181108 - 90 * 65) * 4  # test_models.py's count at 100 classes, less 90 x (64 + 1)
  assert 0 < kd['param_bytes_per_device']['teacher'] <= 0.3 * resnet14
  assert 0 < kd['param_bytes_per_device']['student'] <= 0.35 * RESNET8_PARAMETERS_10_CLASSES * 4


def test_bench_times_a_segmentation_pair_with_cwd(capsys):
  """--head fpn (in this process, on its 8 devices): both models under the FPN head, per-pixel
  labels; CWD is timed beside the student alone (AFD's segmentation step: its trace in
  test_segmentation_train.py), and CWD on a classification pair is refused in one line."""
  from afd_jax import bench as bench_lib  # pylint: disable=g-import-not-at-top
  assert bench_lib.main(['--teacher', 'resnet8', '--student', 'resnet8', '--head', 'fpn',
                         '--batch', '8', '--image-size', '8', '--num-classes', '3', '--steps',
                         '1', '--rounds', '1', '--warmup', '1', '--method', 'ce,cwd',
                         '--json']) in (0, None)
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  rows = {r['method']: r for r in report['results']}
  assert sorted(rows) == ['ce', 'cwd'] and report['head'] == 'fpn'
  assert rows['cwd']['hlo_ops'] > rows['ce']['hlo_ops'] > 0  # the teacher's forward, CWD
  assert rows['cwd']['gflops_per_step'] > 0 and rows['cwd']['steps_timed'] == 1
  with pytest.raises(SystemExit) as refused:
    bench_lib.main(['--method', 'cwd'])
  assert refused.value.code == 2
  assert "method 'cwd' distils segmentation only" in capsys.readouterr().err.splitlines()[-1]


def test_bench_rejects_bad_arguments():
  result = subprocess.run([sys.executable, '-c', RUN_WITHOUT, '--method', 'crdd'],
                          capture_output=True, text=True, timeout=120, env=runs.env(),
                          cwd=runs.REPO)
  assert result.returncode == 2 and "unknown method(s) ['crdd']" in result.stderr
  result = subprocess.run([sys.executable, '-c', RUN_WITHOUT, '--devices', '8', '--mesh', '3,4'],
                          capture_output=True, text=True, timeout=120, env=runs.env(),
                          cwd=runs.REPO)
  assert result.returncode == 2
  assert '--mesh 3,4: mesh_shape (3, 4) needs 12 devices, there are 8.' in result.stderr


# A module with a fused computation called twice, a while loop in ENTRY whose body runs a while
# loop of its own, and a custom call; a TPU layout (with parentheses) on one shape.
HAND_WRITTEN_HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8]{0}, s32[])->f32[8]{0}}

%fused_add (param_0: f32[8], param_1: f32[8]) -> f32[8] {
  %param_0 = f32[8]{0} parameter(0)
  %param_1 = f32[8]{0} parameter(1)
  %add.0 = f32[8]{0} add(f32[8]{0} %param_0, f32[8]{0} %param_1)
  %multiply.0 = f32[8]{0} multiply(f32[8]{0} %add.0, f32[8]{0} %add.0)
  ROOT %exponential.0 = f32[8]{0} exponential(f32[8]{0} %multiply.0)
}

%inner_body (p.1: (f32[8], s32[])) -> (f32[8], s32[]) {
  %p.1 = (f32[8]{0}, s32[]) parameter(0)
  %x.1 = f32[8]{0} get-tuple-element((f32[8]{0}, s32[]) %p.1), index=0
  %i.1 = s32[] get-tuple-element((f32[8]{0}, s32[]) %p.1), index=1
  %one.1 = s32[] constant(1)
  %next.1 = s32[] add(s32[] %i.1, s32[] %one.1)
  %sine.1 = f32[8]{0} sine(f32[8]{0} %x.1)
  ROOT %tuple.1 = (f32[8]{0}, s32[]) tuple(f32[8]{0} %sine.1, s32[] %next.1)
}

%cond (p.2: (f32[8], s32[])) -> pred[] {
  %p.2 = (f32[8]{0}, s32[]) parameter(0)
  %i.2 = s32[] get-tuple-element((f32[8]{0}, s32[]) %p.2), index=1
  %limit.2 = s32[] constant(3)
  ROOT %compare.2 = pred[] compare(s32[] %i.2, s32[] %limit.2), direction=LT
}

%outer_body (p.3: (f32[8], s32[])) -> (f32[8], s32[]) {
  %p.3 = (f32[8]{0}, s32[]) parameter(0)
  %while.3 = (f32[8]{0}, s32[]) while((f32[8]{0}, s32[]) %p.3), condition=%cond, body=%inner_body
  %x.3 = f32[8]{0} get-tuple-element((f32[8]{0}, s32[]) %while.3), index=0
  %i.3 = s32[] get-tuple-element((f32[8]{0}, s32[]) %while.3), index=1
  %fusion.3 = f32[8]{0} fusion(f32[8]{0} %x.3, f32[8]{0} %x.3), kind=kLoop, calls=%fused_add
  %one.3 = s32[] constant(1)
  %next.3 = s32[] add(s32[] %i.3, s32[] %one.3)
  ROOT %tuple.3 = (f32[8]{0}, s32[]) tuple(f32[8]{0} %fusion.3, s32[] %next.3)
}

%outer_cond (p.4: (f32[8], s32[])) -> pred[] {
  %p.4 = (f32[8]{0}, s32[]) parameter(0)
  %i.4 = s32[] get-tuple-element((f32[8]{0}, s32[]) %p.4), index=1
  %limit.4 = s32[] constant(5)
  %negate.4 = s32[] negate(s32[] %limit.4)
  ROOT %compare.4 = pred[] compare(s32[] %i.4, s32[] %negate.4), direction=GT
}

ENTRY %main (a: f32[8], n: s32[]) -> (f32[8], s32[]) {
  %a = f32[8]{0} parameter(0)
  %n = s32[] parameter(1)
  %c = f32[8]{0} constant({1, 2, 3, 4, 5, 6, 7, 8})
  %b = f32[2,4]{1,0} bitcast(f32[8]{0} %a)
  %copy = f32[2,4]{0,1:T(2,128)} copy(f32[2,4]{1,0} %b)
  %fusion = f32[8]{0} fusion(f32[8]{0} %a, f32[8]{0} %c), kind=kLoop, calls=%fused_add
  %t = (f32[8]{0}, s32[]) tuple(f32[8]{0} %fusion, s32[] %n)
  %while = (f32[8]{0}, s32[]) while((f32[8]{0}, s32[]) %t), condition=%outer_cond, body=%outer_body
  %r = f32[8]{0} get-tuple-element((f32[8]{0}, s32[]) %while), index=0
  %cc = f32[8]{0} custom-call(f32[8]{0} %r, f32[2,4]{0,1:T(2,128)} %copy), custom_call_target=f
  ROOT %out = (f32[8]{0}, s32[]) tuple(f32[8]{0} %cc, s32[] %n)
}
"""


def test_top_level_ops_counts_entry_and_while_bodies_but_not_fused_ops_or_bookkeeping():
  """ENTRY: copy, fusion, while, custom-call (4; its parameters, constant, bitcast, tuples and
  get-tuple-element do not count). The outer loop's body: while, fusion, add (3); the inner
  loop's body: add, sine (2). The fused computation's add, multiply and exponential and the
  loop conditions' compare and negate are not top-level."""
  assert collectives.top_level_ops(HAND_WRITTEN_HLO) == 4 + 3 + 2
  # Two modules in one text count apart (computation names are per module).
  assert collectives.top_level_ops(HAND_WRITTEN_HLO + '\n' + HAND_WRITTEN_HLO) == 2 * 9
  # Without the ENTRY's loop, neither body counts.
  no_loop = HAND_WRITTEN_HLO.replace('while((f32[8]{0}, s32[]) %t)', 'copy((f32[8]{0}, s32[]) %t)')
  assert collectives.top_level_ops(no_loop) == 4
