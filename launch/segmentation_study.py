#!/usr/bin/env python3
"""Runs (or resumes) the offline segmentation study and prints its table.

  .venv/bin/python launch/segmentation_study.py [--root workdirs/segmentation] [--seeds 0,1,2]
                                                [--report-only]

configs/segmentation.py:data=scenes: a resnet20 + FPN teacher trained alone (seed 0), then a
resnet8 + FPN student alone, with pixel KD, with CWD and with AFD, per seed, on
`fashion_mnist_scenes` (mIoU on its 2,000 test scenes). Every run is one
`python -m afd_jax.main` (command and log in ROOT/<run>/); results go to
docs/results/segmentation_runs.json (launch/study_runs.py); seed 0's AFD attention plot to
docs/results/segmentation_afd_attention.png and its predictions to
docs/results/segmentation_predictions.png.
"""
import os
import shutil
import sys

import study_runs  # launch/study_runs.py, beside this file

RECORD = os.path.join(study_runs.REPO, 'docs', 'results', 'segmentation_runs.json')
TEACHER_RUN = 'teacher-s0'
ROWS = (('none', 'resnet8 + FPN alone'), ('kd', 'pixel KD'), ('cwd', 'CWD'), ('afd', 'AFD'))


def command(root: str, method: str, seed: int):
  """The run's name and its command line."""
  name = TEACHER_RUN if method == 'teacher' else f'{method}-s{seed}'
  extra = [] if method in ('teacher', 'none') else [
      f'--config.teacher.checkpoint={os.path.join(root, TEACHER_RUN)}']
  return name, [sys.executable, '-m', 'afd_jax.main',
                f'--config=configs/segmentation.py:data=scenes,method={method},seed={seed}',
                f'--workdir={os.path.join(root, name)}', *extra]


def copy_plots(name: str, folder: str) -> None:
  results = os.path.dirname(RECORD)
  for source, target in (('attention.png', 'segmentation_afd_attention.png'),
                         ('predictions.png', 'segmentation_predictions.png')):
    path = os.path.join(folder, source)
    if name == 'afd-s0' and os.path.exists(path):
      shutil.copyfile(path, os.path.join(results, target))


def main():
  root, seeds, report_only = study_runs.parse_args(__doc__.split('\n')[0], 'segmentation')
  record = study_runs.load_record(RECORD)
  if not report_only:
    plan = [(*command(root, m, s), m not in ('teacher', 'none'))
            for m, s in [('teacher', 0)] + [(m, s) for s in seeds for m, _ in ROWS]]
    if study_runs.run_plan(root, plan, record, RECORD, TEACHER_RUN, copy_plots):
      sys.exit(1)
  rows = ['| run | mIoU (%) | per seed | wall s per run (median) |', '|---|---|---|---|']
  teacher = study_runs.table_row('teacher: resnet20 + FPN (seed 0)', [record.get(TEACHER_RUN)],
                                 'miou')
  rows += [teacher] if teacher else []
  for method, label in ROWS:
    row = study_runs.table_row(label, [record.get(command(root, method, s)[0]) for s in seeds],
                               'miou')
    rows += [row] if row else []
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
