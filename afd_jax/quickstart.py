"""The quick-start: on Fashion-MNIST (offline), distil the shipped resnet20 teacher into a resnet8
student that sees 2,000 training images, next to the same student alone and with KD; print the
table and where things are.

  python -m afd_jax.quickstart --workdir=workdirs/quickstart
  python -m afd_jax.quickstart --workdir=workdirs/quickstart-seeds --seeds=0,1,2 \\
      --report=docs/results/quickstart.md        (the measured protocol: mean +- std over seeds)
(`bash launch/quickstart.sh` sets up the environment first.) Configs: configs/quickstart.py.
A finished run (its summary.json) is reused and an interrupted one resumes, so rerunning the
command continues where it stopped.
"""
import json
import os
import statistics
import sys
from typing import Dict, List

from absl import flags, logging

from afd_jax import cli, train
from afd_jax.errors import UserError


def define_flags():
  """The CLI's flags (defined only when run as a program, so the module imports as a library)."""
  flags.DEFINE_string('workdir', 'workdirs/quickstart', 'Root folder of the runs.')
  flags.DEFINE_list('seeds', ['0'], 'Seeds to run; more than one adds mean +- std.')
  flags.DEFINE_string('report', '', 'Also write the table as Markdown to this file.')
  flags.DEFINE_string('student', 'resnet8', 'The student model (e.g. vit_mini4).')


class Preempted(Exception):
  """A run stopped early on SIGTERM (its checkpoint is saved)."""


LABELS = {'student': 'student alone', 'kd': 'student with KD', 'afd': 'student with AFD'}


def _finished(workdir: str):
  path = os.path.join(workdir, 'summary.json')
  if os.path.exists(path):
    with open(path) as f:
      summary = json.load(f)
    if summary.get('status') == 'finished':
      return summary
  return None


def run_dir(root: str, run: str, seed: str, many: bool) -> str:
  return os.path.join(root, f'{run}-s{seed}' if many else run)


def run_all(root: str, seeds: List[str], student: str = 'resnet8') -> Dict[str, List[dict]]:
  """{run: [summary per seed]} for the three student runs."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top  (run from the repo root)
  if not os.path.exists(quickstart.TEACHER_CHECKPOINT):
    raise UserError(f'the shipped teacher {quickstart.TEACHER_CHECKPOINT} is missing; '
                    'launch/quickstart_teacher/README.md says how to make it.')
  results = {run: [] for run in quickstart.STUDENT_RUNS}
  for seed in seeds:
    for run in quickstart.STUDENT_RUNS:
      workdir = run_dir(root, run, seed, len(seeds) > 1)
      summary = _finished(workdir)
      if summary:
        print(f'== {run} (seed {seed}): reusing {workdir}', flush=True)
      else:
        config = quickstart.get_config(f'{run},seed={seed},student={student}')
        print(f'== {run} (seed {seed}): {config.name} -> {workdir}', flush=True)
        summary = train.train_and_evaluate(config, workdir)
        if summary['status'] != 'finished':  # SIGTERM: stop here; rerunning resumes
          raise Preempted(f'{workdir} stopped at step {summary["final_step"]}; rerun the same '
                          'command to resume.')
      results[run].append(summary)
  return results


def _cell(values: List[float]) -> str:
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def table(results: Dict[str, List[dict]], student: str = 'resnet8') -> str:
  teacher = [s['teacher_eval']['top1'] for s in results['kd']]
  rows = [('teacher (shipped)', 'resnet20', teacher[:1])]
  rows += [(LABELS[run], student, [s['eval']['top1'] for s in summaries])
           for run, summaries in results.items()]
  width = max(8, len(student))
  lines = [f'| run               | {"model":{width}s} | top-1 (%) |', '|---|---|---|']
  lines += [f'| {label:17s} | {model:{width}s} | {_cell(values):>9s} |'
            for label, model, values in rows]
  return '\n'.join(lines)


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  root, seeds, student = flags.FLAGS.workdir, flags.FLAGS.seeds, flags.FLAGS.student
  try:
    results = run_all(root, seeds, student)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except Preempted as e:
    print(f'preempted: {e}', file=sys.stderr)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  text = table(results, student)
  print('\n' + text)
  if len(seeds) > 1:
    print(f'(mean ± std over seeds {",".join(seeds)}; top-1 on the 10,000 test images)')
  if flags.FLAGS.report:
    with open(flags.FLAGS.report, 'w') as f:
      f.write(text + '\n')
    print(f'table written to {flags.FLAGS.report}')
  afd = run_dir(root, 'afd', seeds[0], len(seeds) > 1)
  print(f'\nWorkdirs: {root} (checkpoints/, TensorBoard events, summary.json, config.json)')
  print(f'Attention-link plot: {os.path.join(afd, "attention.png")} '
        f'(redraw: python -m afd_jax.visualize --workdir={afd})')
  print(f'TensorBoard: tensorboard --logdir={root}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
