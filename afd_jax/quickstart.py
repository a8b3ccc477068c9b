"""The quick-start: on the offline `digits` dataset, train a teacher (or reuse WORKDIR/teacher),
the student alone, and the student distilled with AFD; print a table and where things are.

  python -m afd_jax.quickstart --workdir=workdirs/quickstart
(`bash launch/quickstart.sh` sets up the environment first.) Configs: configs/quickstart.py.
"""
import json
import os
import sys

from absl import app, flags, logging

from afd_jax import train
from afd_jax.errors import UserError

_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/quickstart', 'Root folder of the three runs.')


def _finished(workdir: str):
  path = os.path.join(workdir, 'summary.json')
  if os.path.exists(path):
    with open(path) as f:
      summary = json.load(f)
    if summary.get('status') == 'finished':
      return summary
  return None


def run_all(root: str):
  from configs import quickstart  # pylint: disable=g-import-not-at-top  (run from the repo root)
  results = {}
  for run in quickstart.RUNS:
    workdir = os.path.join(root, run)
    config = quickstart.get_config(run)
    if run == 'afd':
      config.teacher.checkpoint = os.path.join(root, 'teacher')
    summary = _finished(workdir) if run == 'teacher' else None
    if summary:
      print(f'== {run}: reusing {workdir}', flush=True)
    else:
      print(f'== {run}: {config.name} -> {workdir}', flush=True)
      summary = train.train_and_evaluate(config, workdir)
    results[run] = (config, summary)
  return results


def print_table(root: str, results) -> None:
  rows = [('teacher', 'teacher'), ('student alone', 'student'), ('student with AFD', 'afd')]
  print('\n| run              | model    | top-1 (%) |')
  print('|------------------|----------|-----------|')
  for label, run in rows:
    config, summary = results[run]
    print(f'| {label:16s} | {config.student.name:8s} | {summary["eval"]["top1"]:9.2f} |')
  print(f'\nWorkdirs: {os.path.join(root, "{teacher,student,afd}")} (checkpoints/, '
        'TensorBoard events, summary.json, config.json)')
  print(f'Attention-link plot: {os.path.join(root, "afd", "attention.png")} '
        f'(redraw: python -m afd_jax.visualize --workdir={os.path.join(root, "afd")})')
  print(f'TensorBoard: tensorboard --logdir={root}')


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    results = run_all(_WORKDIR.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print_table(_WORKDIR.value, results)


if __name__ == '__main__':
  app.run(main)
