"""Benchmark of the training step on synthetic data: the very step the trainer runs.

  python -m afd_jax.bench --teacher wrn40x2 --student wrn16x2 --batch 64 --method all \
      --dtype float32 --steps 30 [--bn-group-size 8] [--devices 8] [--mesh 2,4 --shard-teacher
      --shard-student] [--json]

Prints compile time, median step time, images/s, XLA's FLOPs per step and achieved TFLOP/s,
the collectives of the compiled step (count and payload bytes of all-reduce, all-gather,
reduce-scatter, ... from its optimised HLO; `afd_jax.collectives`), the operations it launches
(`hlo ops`: `collectives.top_level_ops`, a measure of a launch-bound accelerator's cost), per
device the bytes of the teacher's and the student's parameters and of the whole train state
(`param_bytes_per_device`: `teacher`, `student`, `train_state`) and
XLA's memory analysis of the step (`memory_per_device`: argument, output, temporary and aliased
bytes), and peak device memory where the backend reports it. `--devices N` runs on N fake CPU devices (to
see the communication of an N-device step on one machine); by default, all devices of the backend.
`--mesh D,M` gives the (data, model) mesh; `--shard-teacher` splits the teacher's weights over
its model axis (`config.teacher.shard`), `--shard-student` the train state
(`config.student.shard`).
`--method all` (the default) times ce, kd and afd in one process, interleaving them in rounds so
that machine noise hits all alike, and prints the ratios afd/kd and kd/ce; `--method kd,crd,...`
times any registered methods the same way. Needs only jax, flax, optax and numpy (no TensorFlow).
`--head fpn` (or progressive) puts both models under a segmentation head: per-pixel logits and
labels, for segmentation's methods (`--method ce,kd,cwd,afd`).
"""
import argparse
import json
import statistics
import sys
import time
import types
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from afd_jax import cli, collectives, distill, models, sharding, step
from afd_jax import task as task_lib
from afd_jax.errors import UserError

# The step's speed in the dtypes one trains in (float64 is a mode for checking numerics).
DTYPES = {name: task_lib.DTYPES[name] for name in ('float32', 'bfloat16')}


def method_names():
  """ce (the student alone), kd, then every registered method (read now: a fork's too)."""
  return ('ce', 'kd') + distill.registry.registered()


def namespace(d):
  return types.SimpleNamespace(**{k: namespace(v) if isinstance(v, dict) else v
                                  for k, v in d.items()})


def bench_config(method: str, teacher: str, student: str, qk_dim: int = 128,
                 teacher_options=None, student_options=None, bn_group_size: int = 0,
                 teacher_dtype: str = '', batch_size: int = 64):
  """Official CIFAR-100 hyper-parameters; `ce`: student alone, `kd`: + Hinton KD,
  other methods: + KD + that method's loss at its registered weight.

  Every method is timed with KD 0.9 on top, like afd (most run without KD in their own
  recipes), so that each method's ratio to kd is the cost of its own loss alone. AB and FSP
  (weight 0 in the main stage) then cost what kd does: their cost is their own stage."""
  known = method_names()
  if method not in known:
    raise ValueError(f'Unknown method {method!r}. Known methods: {", ".join(known)}.')
  feature = method if method not in ('ce', 'kd') else 'none'
  return namespace({
      'method': feature,
      'teacher': {'name': teacher, 'dtype': teacher_dtype, **(teacher_options or {})},
      'student': {'name': student, **(student_options or {})},
      'afd': {'qk_dim': qk_dim}, 'fitnet': {'student_tap': -1, 'teacher_tap': -1, 'relu': True},
      'num_epochs': 240, 'bn_group_size': bn_group_size, 'batch_size': batch_size,
      'loss': {'ce_weight': 1.0, 'kd_weight': 0.0 if method == 'ce' else 0.9,
               'kd_temperature': 4.0,
               'feature_weight': (distill.registry.get(feature).feature_weight
                                  if feature != 'none' else 0.0)},
      'optimizer': {'learning_rate': 0.05, 'momentum': 0.9, 'nesterov': False,
                    'weight_decay': 5e-4, 'decay_bias_and_bn': True, 'schedule': 'step',
                    'decay_epochs': (150, 180, 210), 'decay_factor': 0.1,
                    'warmup_epochs': 0.0}})


class Case:
  """One method's compiled step, state and synthetic batch."""

  def __init__(self, method, args, mesh):
    config = bench_config(method, args.teacher, args.student, args.qk_dim,
                          model_options(args, 'teacher'), model_options(args, 'student'),
                          args.bn_group_size, args.teacher_dtype, args.batch)
    self.method, self.bn_group_size = method, args.bn_group_size
    shape = (args.image_size, args.image_size, args.channels)
    # CIFAR's 50000 training examples at 781 steps per epoch (methods with per-example state).
    dense = bool(getattr(args, 'head', ''))
    self.task = task_lib.task_from_config(config, args.num_classes, 781, DTYPES[args.dtype],
                                          shape, num_train_examples=50000, dense=dense)
    rep = sharding.replicated(mesh)
    images = jnp.zeros((2,) + shape)
    self.teacher_vars, placement = None, None
    if self.task.teacher is not None:
      teacher_init = jax.jit(lambda k: self.task.teacher.init(k, images, train=False))
      abstract = jax.eval_shape(teacher_init, jax.random.PRNGKey(1))
      placement = sharding.fsdp(abstract, mesh) if args.shard_teacher else None
      self.teacher_vars = jax.jit(teacher_init, out_shardings=placement or rep)(
          jax.random.PRNGKey(1))
    teacher_abstract = (jax.eval_shape(lambda: self.teacher_vars)
                        if self.teacher_vars is not None else None)
    state_placement = (sharding.fsdp(step.abstract_state(self.task, shape, teacher_abstract),
                                     mesh, "the student's train state")
                       if args.shard_student else None)
    init = step.jit_init_state(self.task, mesh, shape, teacher_abstract, state_placement)
    self.init = init
    self.state = init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    self.batch = sharding.global_batch(
        {'image': rng.normal(size=(args.batch,) + shape).astype(np.float32),
         'label': rng.integers(0, args.num_classes, (args.batch,) + shape[:2] if dense
                               else args.batch).astype(np.int32),
         'index': rng.permutation(50000)[:args.batch].astype(np.int32)}, mesh)
    jitted = step.jit_train_step(self.task, mesh, placement, state_placement)
    start = time.perf_counter()
    self.compiled = jitted.lower(self.state, self.teacher_vars, self.batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.flops = flops_of(self.compiled)
    self.collectives = collectives.summary(self.compiled)
    self.hlo_ops = collectives.launch_count(self.compiled)
    self.param_bytes = {'teacher': bytes_per_device(self.teacher_vars),
                        'student': bytes_per_device(self.state.params['student']),
                        'train_state': bytes_per_device(self.state)}
    self.memory = xla_memory(self.compiled)
    self.times: List[float] = []

  def first_step_metrics(self):
    """Loss terms of one step from the initial state (for the bf16-vs-f32 comparison)."""
    _, metrics = self.compiled(self.init(jax.random.PRNGKey(0)), self.teacher_vars, self.batch)
    return {k: float(v) for k, v in jax.device_get(metrics).items() if jnp.ndim(v) == 0}

  def run(self, steps: int, record: bool) -> None:
    for _ in range(steps):
      start = time.perf_counter()
      self.state, m = self.compiled(self.state, self.teacher_vars, self.batch)
      jax.block_until_ready(m['loss'])
      if record:
        self.times.append(time.perf_counter() - start)


def model_options(args, side: str) -> Dict[str, object]:
  """`taps` and `kwargs` of `--teacher` / `--student` (for models from outside the zoo), and
  the segmentation head of `--head`."""
  options = {'taps': getattr(args, f'{side}_taps', '') or '',
             'head': getattr(args, 'head', '') or ''}
  kwargs = getattr(args, f'{side}_kwargs', '') or ''
  if kwargs:
    options['kwargs'] = json.loads(kwargs)
  return options


def use_cpu_devices(parser, n: int) -> None:
  """Run on `n` CPU devices (set before JAX starts its backends, else it must already hold)."""
  try:
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:  # backends already started (in-process callers)
    if jax.default_backend() != 'cpu' or jax.device_count() != n:
      parser.error(f'--devices {n}: JAX has already started with {jax.device_count()} '
                   f'{jax.default_backend()} devices in this process')


def flops_of(compiled) -> float:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', float('nan')))
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    return float('nan')


def bytes_per_device(tree) -> int:
  """Bytes of `tree`'s `params` (or of the tree) that one device holds: each array's shard."""
  if tree is None:
    return 0
  tree = tree.get('params', tree) if isinstance(tree, dict) else tree
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def xla_memory(compiled) -> Dict[str, int]:
  """XLA's memory analysis of the compiled step, per device: its arguments, outputs, temporary
  buffers and the argument bytes aliased to outputs (the donated state); {} if not reported."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  return {'argument_bytes': int(analysis.argument_size_in_bytes),
          'output_bytes': int(analysis.output_size_in_bytes),
          'temp_bytes': int(analysis.temp_size_in_bytes),
          'alias_bytes': int(analysis.alias_size_in_bytes)}


def peak_memory_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def summarize(case: Case, batch: int) -> Dict[str, float]:
  median = statistics.median(case.times)
  return {'method': case.method, 'compile_s': case.compile_seconds, 'median_step_ms': 1e3 * median,
          'images_per_s': batch / median, 'gflops_per_step': case.flops / 1e9,
          'tflops_per_s': case.flops / median / 1e12, 'steps_timed': len(case.times),
          'collectives': {k: v for k, v in case.collectives.items() if v['count'] or k == 'total'},
          'hlo_ops': case.hlo_ops, 'param_bytes_per_device': case.param_bytes,
          'memory_per_device': case.memory}


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  model_help = f'a zoo model ({", ".join(models.names())}) or package.module:factory'
  parser.add_argument('--teacher', default='wrn40x2', help=model_help)
  parser.add_argument('--student', default='wrn16x2', help=model_help)
  for side in ('teacher', 'student'):
    parser.add_argument(f'--{side}-taps', default='',
                        help="'auto' or comma-separated module-path globs (default: the zoo's "
                             "taps; auto for a factory)")
    parser.add_argument(f'--{side}-kwargs', default='', help='JSON keyword arguments of a factory')
  parser.add_argument('--method', default='all',
                      help=f'all (= ce,kd,afd) or a comma-separated list of {",".join(method_names())}')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--dtype', default='float32', choices=tuple(DTYPES))
  parser.add_argument('--teacher-dtype', default='', choices=('',) + tuple(DTYPES),
                      help="the teacher's activations (default: --dtype)")
  parser.add_argument('--bn-group-size', type=int, default=0,
                      help='batch-norm statistics over groups of this many examples (0: global)')
  parser.add_argument('--vs-global-bn', action='store_true',
                      help='with --bn-group-size: also time every method with the global batch '
                           'norm, interleaved in the same rounds, and report grouped/global')
  parser.add_argument('--devices', type=int, default=0,
                      help='N fake CPU devices (default: every device of the default backend)')
  parser.add_argument('--mesh', default='',
                      help="DATA,MODEL: the mesh's shape (default: every device on data)")
  parser.add_argument('--shard-teacher', action='store_true',
                      help="split the teacher's weights over the mesh's model axis "
                           '(config.teacher.shard)')
  parser.add_argument('--shard-student', action='store_true',
                      help="split the train state (student, distiller, optimizer state) over "
                           "the mesh's model axis (config.student.shard)")
  parser.add_argument('--steps', type=int, default=30, help='timed steps per method')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=5, help='interleaved rounds (--method all)')
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--channels', type=int, default=3)
  parser.add_argument('--num-classes', type=int, default=100)
  parser.add_argument('--qk-dim', type=int, default=128)
  parser.add_argument('--head', default='', choices=('',) + models.SEGMENTATION_HEADS,
                      help='segmentation: both models under this head (per-pixel logits and '
                           'labels; methods such as cwd)')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  parser.add_argument('--compare-dtypes', action='store_true',
                      help='also report the first step\'s loss terms in bfloat16 vs float32')
  return parser


def parse_args(argv):
  """The arguments, the methods to time and the mesh; bad input ends in `parser.error`."""
  parser = make_parser()
  args = parser.parse_args(argv)
  for side in ('teacher', 'student'):
    try:
      models.check_name(getattr(args, side))
      model_options(args, side)
    except ValueError as e:  # json.JSONDecodeError is one
      parser.error(f'--{side}: {e}')
  if args.devices < 0 or args.bn_group_size < 0:
    parser.error('--devices and --bn-group-size must be >= 0')
  if args.bn_group_size and args.batch % args.bn_group_size:
    parser.error(f'--bn-group-size {args.bn_group_size} must divide --batch {args.batch}')
  if args.vs_global_bn and not args.bn_group_size:
    parser.error('--vs-global-bn compares against --bn-group-size k > 0; give one')
  if args.devices:
    use_cpu_devices(parser, args.devices)
  try:
    shape = tuple(int(n) for n in args.mesh.split(',')) if args.mesh else (-1, 1)
    mesh = sharding.make_mesh(shape)
  except (ValueError, UserError) as e:
    parser.error(f'--mesh {args.mesh}: {e}')
  if args.batch % mesh.shape[sharding.DATA]:
    parser.error(f'--batch {args.batch} must divide by the {mesh.shape[sharding.DATA]} devices')
  methods = ('ce', 'kd', 'afd') if args.method == 'all' else tuple(args.method.split(','))
  unknown = [m for m in methods if m not in method_names()]
  if unknown:
    parser.error(f'unknown method(s) {unknown}; choose from all, {", ".join(method_names())}')
  try:  # the models' taps (patterns that match nothing, a token grid that cannot be known)
    options = (model_options(args, 'teacher'), model_options(args, 'student'))
    for m in methods:  # each method fits the task (cwd: segmentation only)
      task_lib.check_task(bench_config(m, args.teacher, args.student, args.qk_dim, *options),
                          bool(args.head))
    task_lib.task_from_config(bench_config('kd', args.teacher, args.student, args.qk_dim,
                                           *options),  # builds the teacher too
                              args.num_classes, 781, jnp.float32,
                              (args.image_size, args.image_size, args.channels),
                              dense=bool(args.head))
  except (ValueError, TypeError) as e:
    parser.error(str(e))
  return args, methods, mesh


def build_cases(args, methods, mesh):
  """Each method's compiled step; with --vs-global-bn, also each with the global batch norm."""
  cases = [Case(m, args, mesh) for m in methods]
  global_args = argparse.Namespace(**{**vars(args), 'bn_group_size': 0})
  global_cases = [Case(m, global_args, mesh) for m in methods] if args.vs_global_bn else []
  return cases, global_cases


def time_cases(timed: List[Case], args) -> None:
  """Warm-up steps, then `args.steps` timed steps per case, interleaved in rounds."""
  for case in timed:
    case.run(args.warmup, record=False)
  rounds = max(1, args.rounds if len(timed) > 1 else 1)
  per_round = [args.steps // rounds + (i < args.steps % rounds) for i in range(rounds)]
  for n in per_round:
    for case in timed:
      case.run(n, record=True)


def add_dtype_differences(cases: List[Case], results, args, mesh) -> None:
  """--compare-dtypes: each result's relative differences of the first step's loss terms."""
  other = 'bfloat16' if args.dtype == 'float32' else 'float32'
  for case, result in zip(cases, results):
    twin = Case(case.method, argparse.Namespace(**{**vars(args), 'dtype': other}), mesh)
    a, b = case.first_step_metrics(), twin.first_step_metrics()
    result[f'first_step_vs_{other}'] = {
        k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-12)
        for k in ('loss', 'ce', 'kd') + distill.registry.registered() if k in a}


def make_report(args, results, global_cases: List[Case]) -> Dict[str, object]:
  """The run's settings, each method's results, and the ratios of their step times."""
  report = {'device': f'{jax.devices()[0].device_kind} x {jax.device_count()}',
            'backend': jax.default_backend(), 'teacher': args.teacher, 'student': args.student,
            'batch': args.batch, 'dtype': args.dtype, 'image_size': args.image_size,
            'teacher_dtype': args.teacher_dtype or args.dtype, 'bn_group_size': args.bn_group_size,
            'devices': jax.device_count(), 'head': getattr(args, 'head', '') or '',
            'peak_memory_bytes': peak_memory_bytes(), 'results': results}
  if global_cases:
    report['global_bn_results'] = [summarize(c, args.batch) for c in global_cases]
    report['grouped_over_global'] = {
        r['method']: r['median_step_ms'] / g['median_step_ms']
        for r, g in zip(results, report['global_bn_results'])}
  by = {r['method']: r['median_step_ms'] for r in results}
  for m in distill.registry.registered():
    if m in by and 'kd' in by:
      report[f'{m}_over_kd'] = by[m] / by['kd']
  if 'kd' in by and 'ce' in by:
    report['kd_over_ce'] = by['kd'] / by['ce']
  return report


def print_report(report, args) -> None:
  """The report as a table, its ratios and comparisons."""
  results = report['results']
  groups = f'BN groups of {args.bn_group_size}' if args.bn_group_size else 'global BN'
  print(f'{report["device"]} ({report["backend"]}), {args.teacher} -> {args.student}, batch '
        f'{args.batch}, {args.dtype} (teacher {report["teacher_dtype"]}), '
        f'{args.image_size}x{args.image_size}, {groups}'
        + (f', segmentation ({report["head"]} head)' if report['head'] else ''))
  print(f'{"method":8s} {"compile s":>9s} {"step ms":>9s} {"img/s":>9s} {"GFLOP/step":>11s} '
        f'{"TFLOP/s":>8s} {"collectives":>11s} {"MB":>7s} {"hlo ops":>8s}')
  for r in results:
    total = r['collectives']['total']
    print(f'{r["method"]:8s} {r["compile_s"]:9.1f} {r["median_step_ms"]:9.1f} '
          f'{r["images_per_s"]:9.0f} {r["gflops_per_step"]:11.2f} {r["tflops_per_s"]:8.3f} '
          f'{total["count"]:11d} {total["bytes"] / 1e6:7.2f} {r["hlo_ops"]:8d}')
  mib = lambda n: f'{n / 2**20:.1f}'
  for r in results:
    params, memory = r['param_bytes_per_device'], r['memory_per_device']
    print(f'{r["method"]}: per device, parameters teacher {mib(params["teacher"])} MiB, student '
          f'{mib(params["student"])} MiB, train state {mib(params["train_state"])} MiB'
          + (f'; XLA: arguments {mib(memory["argument_bytes"])}, outputs '
             f'{mib(memory["output_bytes"])}, temporaries {mib(memory["temp_bytes"])} MiB'
             if memory else ''))
  if report['peak_memory_bytes']:
    print(f'peak device memory: {report["peak_memory_bytes"] / 2**30:.2f} GiB')
  for key in [f'{m}_over_kd' for m in distill.registry.registered()] + ['kd_over_ce']:
    if key in report:
      print(f'{key.replace("_over_", "/")}: {report[key]:.3f}')
  for r in report.get('global_bn_results', ()):
    total = r['collectives']['total']
    print(f'{r["method"]} with the global batch norm: {r["median_step_ms"]:.1f} ms, '
          f'{total["count"]} collectives ({total["bytes"] / 1e6:.2f} MB); grouped/global '
          f'{report["grouped_over_global"][r["method"]]:.3f}')
  for r in results:
    for key, diffs in r.items():
      if key.startswith('first_step_vs_'):
        print(f'{r["method"]}: relative difference of the first step\'s loss terms, {args.dtype} '
              f'vs {key[len("first_step_vs_"):]}: '
              + ', '.join(f'{k} {v:.2e}' for k, v in diffs.items()))


def main(argv=None) -> int:
  args, methods, mesh = parse_args(argv)
  cases, global_cases = build_cases(args, methods, mesh)
  time_cases(cases + global_cases, args)
  results = [summarize(c, args.batch) for c in cases]
  if args.compare_dtypes:
    add_dtype_differences(cases, results, args, mesh)
  report = make_report(args, results, global_cases)
  if args.json:
    print(json.dumps(report))
  else:
    print_report(report, args)
  return 0


if __name__ == '__main__':
  cli.exit_without_final_gc()
  sys.exit(main())
