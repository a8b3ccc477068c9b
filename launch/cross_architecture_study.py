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
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def load_record():
  if not os.path.exists(RECORD):
    return {}
  with open(RECORD) as f:
    return json.load(f)


def save_record(record) -> None:
  with open(RECORD, 'w') as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.write('\n')


def commit() -> str:
  return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                        text=True).stdout.strip()


def run(root: str, name: str, cmd, record, needed_on_disk: bool = False) -> int:
  """Runs (or resumes) one run unless it is recorded; records it; returns the exit code.

  `needed_on_disk`: the run's checkpoint is used by a later run, so a recorded run whose folder
  is gone is trained again and checked against the recorded params_sha256.
  """
  folder = os.path.join(root, name)
  done = os.path.join(folder, 'summary.json')
  if name in record and (os.path.exists(done) or not needed_on_disk):
    return 0
  if not os.path.exists(done):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'command.txt'), 'w') as f:
      f.write(' '.join(cmd) + '\n')
    print(f'running {name}', flush=True)
    with open(os.path.join(folder, 'log.txt'), 'a') as log:
      child = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
      signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
      code = child.wait()
    if code != 0:
      print(f'{name} exited with {code}; see {folder}/log.txt', flush=True)
      return code
  with open(done) as f:
    summary = json.load(f)
  if name in record:
    if record[name]['params_sha256'] != summary['params_sha256']:
      print(f'{name} trained again gives params_sha256 {summary["params_sha256"][:12]}..., not '
            f'the recorded {record[name]["params_sha256"][:12]}...; the runs it taught were '
            'taught by another teacher, so the study stops here', flush=True)
      return 1
    return 0
  record[name] = {'top1': summary['eval']['top1'], 'wall_time_sec': summary['wall_time_sec'],
                  'params_sha256': summary['params_sha256'], 'commit': commit()}
  save_record(record)
  plot = os.path.join(folder, 'attention.png')
  if name.endswith('-afd-s0') and os.path.exists(plot):
    direction = name.split('-')[0]
    shutil.copyfile(plot, os.path.join(os.path.dirname(RECORD),
                                       f'cross_architecture_{direction}_afd_attention.png'))
  return 0


def table(record, direction: str, methods, seeds) -> str:
  rows = ['| run | top-1 (%) | per seed | wall s per run (median) |', '|---|---|---|---|']
  for method in methods:
    runs = [record.get(f'{direction}-{method}-s{s}') for s in seeds]
    found = [r for r in runs if r]
    if not found:
      continue
    tops = [r['top1'] for r in found]
    spread = f' ± {statistics.stdev(tops):.2f}' if len(tops) > 1 else ''
    per_seed = ', '.join(f'{r["top1"]:.2f}' if r else '-' for r in runs)
    wall = statistics.median(r['wall_time_sec'] for r in found)
    rows.append(f'| {LABELS[method]} | {statistics.mean(tops):.2f}{spread} | {per_seed} | '
                f'{wall:.0f} |')
  return '\n'.join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default=os.path.join(REPO, 'workdirs', 'cross_arch'))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--only', choices=('cnn2vit', 'vit2cnn'), default=None)
  parser.add_argument('--report-only', action='store_true')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  record = load_record()
  plan = [(d, m, s) for s in seeds
          for d, methods in (('cnn2vit', CNN2VIT), ('vit2cnn', VIT2CNN)) for m in methods]
  if not args.report_only:
    for direction, method, seed in plan:
      if args.only and direction != args.only:
        continue
      name, cmd = commands(os.path.abspath(args.root), direction, method, seed)
      teaches = name == VIT_TEACHER_RUN and any(
          f'vit2cnn-{m}-s{s}' not in record for m in VIT2CNN for s in seeds)
      if run(args.root, name, cmd, record, needed_on_disk=teaches):
        sys.exit(1)
  for direction, methods in (('cnn2vit', CNN2VIT), ('vit2cnn', VIT2CNN)):
    print(f'\n{direction}\n' + table(record, direction, methods, seeds))


if __name__ == '__main__':
  main()
