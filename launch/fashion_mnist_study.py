#!/usr/bin/env python3
"""Runs (or resumes) the Fashion-MNIST study and writes docs/results/fashion_mnist.md.

  .venv/bin/python launch/fashion_mnist_study.py [--root workdirs/fashion_mnist] [--seeds 0,1,2]
                                                 [--report-only]

Every run is `python -m afd_jax.main --config=configs/fashion_mnist.py:method=M,seed=S
--workdir=ROOT/M-sS` (each seed's teacher first; the students distil the teacher of their seed).
A finished run (its summary.json) is skipped; an interrupted one resumes from its checkpoint, so
rerunning this script after a stop continues the study. Logs: ROOT/M-sS/log.txt. The report
keeps its '## Discussion' section across reruns.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import fashion_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position

LABELS = {'teacher': f'teacher ({fashion_mnist.TEACHER})',
          'none': f'student alone ({fashion_mnist.STUDENT})', 'kd': 'KD', 'fitnet': 'FitNet',
          'at': 'AT', 'afd': 'AFD'}
REPORT = os.path.join(REPO, 'docs', 'results', 'fashion_mnist.md')
HEATMAP = os.path.join(REPO, 'docs', 'results', 'fashion_mnist_afd_attention.png')


def workdir(root, method, seed):
  return os.path.join(root, f'{method}-s{seed}')


def summary(root, method, seed):
  path = os.path.join(workdir(root, method, seed), 'summary.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def command(root, method, seed):
  cmd = [sys.executable, '-m', 'afd_jax.main',
         f'--config=configs/fashion_mnist.py:method={method},seed={seed}',
         f'--workdir={workdir(root, method, seed)}']
  if method not in ('teacher', 'none'):
    cmd.append(f'--config.teacher.checkpoint={workdir(root, "teacher", seed)}')
  return cmd


def run(root, method, seed):
  if summary(root, method, seed):
    print(f'{method}-s{seed}: finished earlier', flush=True)
    return
  os.makedirs(workdir(root, method, seed), exist_ok=True)
  start = time.time()
  print(f'{method}-s{seed}: running ({" ".join(command(root, method, seed)[1:])})', flush=True)
  with open(os.path.join(workdir(root, method, seed), 'log.txt'), 'a') as log:
    code = subprocess.call(command(root, method, seed), stdout=log, stderr=subprocess.STDOUT,
                           cwd=REPO)
  if code != 0:
    sys.exit(f'{method}-s{seed} failed with exit code {code}; see its log.txt')
  print(f'{method}-s{seed}: top1 {summary(root, method, seed)["eval"]["top1"]:.2f} '
        f'({time.time() - start:.0f} s)', flush=True)


def discussion():
  if not os.path.exists(REPORT):
    return '## Discussion\n\n(to be written from the results)\n'
  text = open(REPORT).read()
  return text[text.index('## Discussion'):] if '## Discussion' in text else ''


def report(root, seeds):
  rows, total = [], 0.0
  for method in fashion_mnist.METHODS:
    results = [summary(root, method, s) for s in seeds]
    if not all(results):
      rows.append(f'| {LABELS[method]} | (not finished) | | |')
      continue
    top1 = [r['eval']['top1'] for r in results]
    wall = sum(r['wall_time_sec'] for r in results)
    total += sum(r['total_time_sec'] for r in results)
    std = statistics.stdev(top1) if len(top1) > 1 else 0.0
    rows.append(f'| {LABELS[method]} | {statistics.mean(top1):.2f} ± {std:.2f} | '
                f'{", ".join(f"{t:.2f}" for t in top1)} | {wall / 60:.0f} |')
  afd_dir = workdir(root, 'afd', seeds[0])
  os.makedirs(os.path.dirname(REPORT), exist_ok=True)
  if os.path.exists(os.path.join(afd_dir, 'attention.png')):
    shutil.copyfile(os.path.join(afd_dir, 'attention.png'), HEATMAP)
  c = fashion_mnist.get_config(f'method=afd,seed={seeds[0]}')
  lines = [
      '# Fashion-MNIST: student alone vs KD vs FitNet vs AT vs AFD',
      '',
      f'Teacher {fashion_mnist.TEACHER} -> student {fashion_mnist.STUDENT}, Debian\'s '
      '`dataset-fashion-mnist` through the offline `fashion_mnist_local` builder. Schedule '
      f'(configs/fashion_mnist.py): the first {c.dataset.train_subset:,} training images, '
      f'{c.num_epochs} epochs, batch {c.batch_size}, SGD {c.optimizer.learning_rate} with cosine '
      f'decay, weight decay {c.optimizer.weight_decay}, crop + flip. Top-1 on the full 10,000-image '
      'test split at the **last epoch** (the protocol of the CRD benchmark), mean ± sample std '
      f'over seeds {", ".join(map(str, seeds))}; each student distils the teacher of its seed. Loss '
      'weights as the CRD benchmark: KD = 0.1 CE + 0.9 KD (T 4); FitNet CE + 100 hint; AT CE + '
      '1000 AT; AFD CE + 0.9 KD + 200 L_AFD (the official recipe).',
      '',
      '| run | top-1 (%) | per seed | train min (3 seeds) |',
      '|---|---|---|---|',
      *rows,
      '',
      f'Total wall time of the runs: {total / 3600:.2f} h on a 2-core CPU (compilation, evaluation '
      'and checkpoints included).',
      '',
      'Reproduce (runs or resumes every run, then rewrites this file):',
      '',
      '```bash',
      '.venv/bin/python launch/fashion_mnist_study.py',
      '```',
      '',
      'One run: ' + '`' + ' '.join(['python'] + command('workdirs/fashion_mnist', 'afd', 0)[1:]) + '`',
      '',
      f'Attention links of the AFD run, seed {seeds[0]} (mean over the last epoch\'s training '
      'batches; rows: teacher layers, columns: student layers):',
      '',
      '![AFD attention](fashion_mnist_afd_attention.png)',
      '',
      discussion(),
  ]
  os.makedirs(os.path.dirname(REPORT), exist_ok=True)
  with open(REPORT, 'w') as f:
    f.write('\n'.join(lines))
  print(f'wrote {REPORT}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', default=os.path.join(REPO, 'workdirs', 'fashion_mnist'))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--report-only', action='store_true')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  if not args.report_only:
    for seed in seeds:
      for method in fashion_mnist.METHODS:
        run(args.root, method, seed)
  report(args.root, seeds)


if __name__ == '__main__':
  main()
