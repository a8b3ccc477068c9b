#!/usr/bin/env python3
"""Runs (or resumes) the two-teacher study on Fashion-MNIST and prints its table.

  .venv/bin/python launch/two_teacher_study.py [--root workdirs/two_teachers] [--seeds 0,1,2]
                                               [--report-only]

configs/two_teachers.py: teacher a is the shipped resnet20, teacher b a wrn16x2 that this script
trains first (seed 0, the quick-start's teacher recipe); a resnet8 student alone, then KD and AFD
from a alone, b alone and both, per seed. Every run is one `python -m afd_jax.main` (command and
log in ROOT/<run>/); results go to docs/results/two_teachers_runs.json (launch/study_runs.py),
and seed 0's AFD attention over both teachers' layers to
docs/results/two_teachers_afd_attention.png.
"""
import os
import shutil
import sys

import study_runs  # launch/study_runs.py, beside this file

RECORD = os.path.join(study_runs.REPO, 'docs', 'results', 'two_teachers_runs.json')
TEACHER_B_RUN = 'teacher_b-s0'
ROWS = [('student', '', 'resnet8 alone')] + [
    (method, teachers, f'{label} from {who}')
    for method, label in (('kd', 'KD'), ('afd', 'AFD'))
    for teachers, who in (('a', 'resnet20 (a)'), ('b', 'wrn16x2 (b)'), ('ab', 'both'))]


def command(root: str, method: str, teachers: str, seed: int):
  """The run's name and its command line."""
  if method == 'teacher_b':
    name, arg = TEACHER_B_RUN, 'teacher_b'
  elif method == 'student':
    name, arg = f'student-s{seed}', f'student,seed={seed}'
  else:
    name, arg = f'{method}-{teachers}-s{seed}', f'{method},teachers={teachers},seed={seed}'
  teacher_b = os.path.join(root, TEACHER_B_RUN)
  extra = {'b': [f'--config.teacher.checkpoint={teacher_b}'],
           'ab': [f'--config.teachers[1].checkpoint={teacher_b}']}.get(teachers, [])
  return name, [sys.executable, '-m', 'afd_jax.main', f'--config=configs/two_teachers.py:{arg}',
                f'--workdir={os.path.join(root, name)}', *extra]


def copy_attention_plot(name: str, folder: str) -> None:
  plot = os.path.join(folder, 'attention.png')
  if name == 'afd-ab-s0' and os.path.exists(plot):
    shutil.copyfile(plot, os.path.join(os.path.dirname(RECORD), 'two_teachers_afd_attention.png'))


def main():
  root, seeds, report_only = study_runs.parse_args(__doc__.split('\n')[0], 'two_teachers')
  record = study_runs.load_record(RECORD)
  if not report_only:
    runs = [('teacher_b', '', 0)] + [(m, t, s) for s in seeds for m, t, _ in ROWS]
    plan = [(*command(root, m, t, s), 'b' in t) for m, t, s in runs]
    if study_runs.run_plan(root, plan, record, RECORD, TEACHER_B_RUN, copy_attention_plot):
      sys.exit(1)
  rows = ['| run | top-1 (%) | per seed | wall s per run (median) |', '|---|---|---|---|']
  teacher_b = study_runs.table_row('teacher b: wrn16x2 (seed 0)', [record.get(TEACHER_B_RUN)])
  rows += [teacher_b] if teacher_b else []
  for method, teachers, label in ROWS:
    row = study_runs.table_row(label, [record.get(command(root, method, teachers, s)[0])
                                       for s in seeds])
    rows += [row] if row else []
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
