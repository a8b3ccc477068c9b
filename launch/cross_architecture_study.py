#!/usr/bin/env python3
"""Runs (or resumes) the cross-architecture study on Fashion-MNIST and prints its tables.

  .venv/bin/python launch/cross_architecture_study.py [--root workdirs/cross_arch]
                                                      [--seeds 0,1,2] [--only cnn2vit|vit2cnn]
                                                      [--report-only]

CNN -> ViT: the quick-start's resnet20 teacher into a ViT student with the ViT recipe
(`configs/deit.py:recipe=small`): the ViT alone, KD, DeiT hard, DeiT soft, AFD and SP.
ViT -> CNN: a vit_micro4 trained alone by the same recipe (seed 0's `none` run above) into
resnet8 with the CNN study's recipe (`configs/fashion_mnist.py`): resnet8 alone, KD, AFD.
Every run is one `python -m afd_jax.main` (its command in ROOT/<run>/command.txt, its log in
ROOT/<run>/log.txt); an interrupted one resumes from its checkpoint, and SIGTERM to this script
stops the run in progress at a checkpoint. Results (top-1, wall time, params_sha256, the commit)
are kept in docs/results/cross_architecture_runs.json, and a run found there is not run again,
so the study goes on from the record on a machine without ROOT. The one exception is the ViT
teacher: when ROOT lacks it and a ViT -> CNN run is still to do, it is trained again and must
give the recorded params_sha256 (else the script stops). AFD's attention plots of seed 0 are
copied to docs/results/cross_architecture_<direction>_afd_attention.png.
"""
import argparse
import os
import shutil
import sys

import study_runs  # launch/study_runs.py, beside this file

REPO = study_runs.REPO
RECORD = os.path.join(REPO, 'docs', 'results', 'cross_architecture_runs.json')
CNN2VIT = ('none', 'kd', 'deit_hard', 'deit_soft', 'afd', 'sp')
VIT2CNN = ('none', 'kd', 'afd')
LABELS = {'none': 'student alone', 'kd': 'KD', 'deit_hard': 'DeiT hard',
          'deit_soft': 'DeiT soft', 'afd': 'AFD', 'sp': 'SP'}
VIT_TEACHER_RUN = 'cnn2vit-none-s0'  # the ViT alone of seed 0 teaches resnet8


def commands(root: str, direction: str, method: str, seed: int):
  """The run's name and its command line."""
  name = f'{direction}-{method}-s{seed}'
  if direction == 'cnn2vit':
    config = f'configs/deit.py:recipe=small,method={method},seed={seed}'
    extra = []
  else:
    config = f'configs/fashion_mnist.py:method={method},seed={seed}'
    extra = ['--config.teacher.name=vit_micro4',
             f'--config.teacher.checkpoint={os.path.join(root, VIT_TEACHER_RUN)}']
  cmd = [sys.executable, '-m', 'afd_jax.main', f'--config={config}',
         f'--workdir={os.path.join(root, name)}', *extra]
  return name, cmd


def copy_attention_plot(name: str, folder: str) -> None:
  """Seed 0's AFD attention plot of each direction, into docs/results/."""
  plot = os.path.join(folder, 'attention.png')
  if name.endswith('-afd-s0') and os.path.exists(plot):
    direction = name.split('-')[0]
    shutil.copyfile(plot, os.path.join(os.path.dirname(RECORD),
                                       f'cross_architecture_{direction}_afd_attention.png'))


def table(record, direction: str, methods, seeds) -> str:
  rows = ['| run | top-1 (%) | per seed | wall s per run (median) |', '|---|---|---|---|']
  for method in methods:
    row = study_runs.table_row(LABELS[method],
                               [record.get(f'{direction}-{method}-s{s}') for s in seeds])
    if row:
      rows.append(row)
  return '\n'.join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default=os.path.join(REPO, 'workdirs', 'cross_arch'))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--only', choices=('cnn2vit', 'vit2cnn'), default=None)
  parser.add_argument('--report-only', action='store_true')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  record = study_runs.load_record(RECORD)
  plan = [(d, m, s) for s in seeds
          for d, methods in (('cnn2vit', CNN2VIT), ('vit2cnn', VIT2CNN)) for m in methods]
  if not args.report_only:
    for direction, method, seed in plan:
      if args.only and direction != args.only:
        continue
      name, cmd = commands(os.path.abspath(args.root), direction, method, seed)
      teaches = name == VIT_TEACHER_RUN and any(
          f'vit2cnn-{m}-s{s}' not in record for m in VIT2CNN for s in seeds)
      if study_runs.run(args.root, name, cmd, record, RECORD, needed_on_disk=teaches,
                        on_recorded=copy_attention_plot):
        sys.exit(1)
  for direction, methods in (('cnn2vit', CNN2VIT), ('vit2cnn', VIT2CNN)):
    print(f'\n{direction}\n' + table(record, direction, methods, seeds))


if __name__ == '__main__':
  main()
