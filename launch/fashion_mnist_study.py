#!/usr/bin/env python3
"""Runs (or resumes) the Fashion-MNIST study and writes docs/results/fashion_mnist.md.

  .venv/bin/python launch/fashion_mnist_study.py [--root workdirs/fashion_mnist] [--seeds 0,1,2]
                                                 [--methods none,kd,afd,semckd] [--report-only]

Every run is `python -m afd_jax.main --config=configs/fashion_mnist.py:method=M,seed=S
--workdir=ROOT/M-sS` (the students distil the teacher of their seed, trained before the first of
them that still has to run; the student alone needs none).
`--methods` picks which of configs/fashion_mnist.py's METHODS run (a comparison of a few methods
on the same pair and schedule: e.g. `--methods none,kd,afd,semckd,reviewkd,dkd`).
Each finished run's result is recorded in docs/results/fashion_mnist_runs.json (top-1, times,
the commit, its parameters' hash and its teacher's) and is not run again while its teacher is
the one in the teacher's workdir; an interrupted run resumes from its checkpoint, so rerunning
this script after a stop continues the study. A teacher whose workdir is gone is trained again
(same seed, same command) when a student of its seed still has to run; if its parameters come
out bit for bit the same, its record stands, and otherwise the students that distilled the old
one run again (the report marks with † the rows not yet redone).
Logs: ROOT/M-sS/log.txt.
The report is built from the record, so it keeps every method finished so far, and its
'## Discussion' section across reruns.
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
          'at': 'AT', 'afd': 'AFD', 'crd+kd': 'CRD+KD', 'semckd': 'SemCKD',
          'reviewkd': 'ReviewKD'}
REPORT = os.path.join(REPO, 'docs', 'results', 'fashion_mnist.md')
RECORD = os.path.join(REPO, 'docs', 'results', 'fashion_mnist_runs.json')
# In a student's workdir: what it was started against, so that an interrupted rerun resumes.
STARTED_AGAINST = 'study_started_against.txt'
# The methods that learn their layer links, whose maps the report draws side by side.
LINK_MAPS = ('afd', 'semckd')


def study_entries():
  """The methods in order, each followed by its variants (configs/fashion_mnist.py VARIANTS:
  'method@key=value', a run beside the protocol)."""
  out = []
  for method in fashion_mnist.METHODS:
    out += [method] + [v for v in fashion_mnist.VARIANTS if v.partition('@')[0] == method]
  return out


ENTRIES = study_entries()


def base(entry):
  return entry.partition('@')[0]


def name(entry):
  """'semckd@lr=0.05' -> 'semckd_lr0.05': the workdir's and the record's name."""
  return entry.replace('@', '_').replace('=', '')


def heatmap(method):
  return os.path.join(REPO, 'docs', 'results', f'fashion_mnist_{method}_attention.png')


def workdir(root, entry, seed):
  return os.path.join(root, f'{name(entry)}-s{seed}')


def label(entry):
  method, _, extra = entry.partition('@')
  text = LABELS.get(method, method.upper())
  return f'{text} ({extra.replace("=", " ")})' if extra else text


def summary(root, method, seed):
  path = os.path.join(workdir(root, method, seed), 'summary.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_record():
  if not os.path.exists(RECORD):
    return {}
  with open(RECORD) as f:
    return json.load(f)


def save_record(record):
  with open(RECORD, 'w') as f:
    json.dump(dict(sorted(record.items())), f, indent=1)
    f.write('\n')


def commit():
  out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                       cwd=REPO)
  return out.stdout.strip() or 'unknown'


def command(root, entry, seed):
  method, _, extra = entry.partition('@')
  cmd = [sys.executable, '-m', 'afd_jax.main',
         f'--config=configs/fashion_mnist.py:method={method},seed={seed}'
         + (f',{extra}' if extra else ''),
         f'--workdir={workdir(root, entry, seed)}']
  if method not in ('teacher', 'none'):
    cmd.append(f'--config.teacher.checkpoint={workdir(root, "teacher", seed)}')
  return cmd


def teacher_sha256(root, seed):
  done = summary(root, 'teacher', seed)
  return done['params_sha256'] if done else None


def is_current(entry, record, study_entry, seed, root=None):
  """Whether a recorded run is one of this study's: a student distilled the recorded teacher of
  its seed, and the student alone ran with the code of the rest (the first study's runs,
  recorded without hashes, are run again). With `root`, a teacher must also be the run in its
  workdir (a teacher trained again to other parameters replaces its record)."""
  if not entry:
    return False
  method = base(study_entry)
  if method == 'teacher':
    return 'params_sha256' in entry and (
        root is None or entry['params_sha256'] == teacher_sha256(root, seed))
  if method == 'none':
    return 'params_sha256' in entry or 'failed' in entry
  teacher = record.get(f'teacher-s{seed}', {}).get('params_sha256')
  return teacher is not None and entry.get('teacher_sha256') == teacher


def started_against(folder):
  """What a student's workdir was started against: its teacher's params_sha256, or 'none' for
  the student alone (None: a folder from before the runner wrote it)."""
  path = os.path.join(folder, STARTED_AGAINST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read().strip()


def last_error(folder):
  with open(os.path.join(folder, 'log.txt')) as f:
    errors = [line.strip() for line in f if line.startswith('error: ')]
  return errors[-1][len('error: '):] if errors else ''


def run(root, method, seed, record):
  key, folder = f'{name(method)}-s{seed}', workdir(root, method, seed)
  entry = record.get(key)
  if is_current(entry, record, method, seed, root):
    print(f'{key}: finished earlier', flush=True)
    return
  against = 'none' if base(method) == 'none' else teacher_sha256(root, seed)
  if base(method) != 'teacher' and against is None:
    sys.exit(f'{key} needs teacher-s{seed}, which has no finished run in {root}')
  if (base(method) != 'teacher' and os.path.exists(folder)
      and (entry or started_against(folder) is not None)
      and started_against(folder) != against):
    # Its teacher has changed since (or its code, for the student alone), and the folder is not
    # a run started against the current one: keep the old run beside, with its checkpoints, and
    # run it again from the start.
    n = 1
    while os.path.exists(f'{folder}.stale{n}'):
      n += 1
    os.rename(folder, f'{folder}.stale{n}')
    print(f'{key}: its teacher changed; the old run is now {folder}.stale{n}', flush=True)
  if not summary(root, method, seed):
    os.makedirs(folder, exist_ok=True)
    if base(method) != 'teacher':
      with open(os.path.join(folder, STARTED_AGAINST), 'w') as f:
        f.write(against + '\n')
    start = time.time()
    print(f'{key}: running ({" ".join(command(root, method, seed)[1:])})', flush=True)
    with open(os.path.join(folder, 'log.txt'), 'a') as log:
      code = subprocess.call(command(root, method, seed), stdout=log, stderr=subprocess.STDOUT,
                             cwd=REPO)
    error = last_error(folder) if code == 2 else ''
    if code != 0 and not error.startswith('non-finite '):  # stopped, refused: rerun to resume
      sys.exit(f'{key} failed with exit code {code}; see its log.txt')
    print(f'{key}: ' + (error or f'top1 {summary(root, method, seed)["eval"]["top1"]:.2f}')
          + f' ({time.time() - start:.0f} s)', flush=True)
  done = summary(root, method, seed)
  if done is None:  # the run diverged (the trainer's divergence guard): a result, recorded
    new = {'failed': last_error(folder), 'commit': commit()}
  else:
    new = {'top1': done['eval']['top1'], 'wall_time_sec': done['wall_time_sec'],
           # every process of a resumed run (summaries written before it existed: none)
           **({'train_time_sec': done['train_time_sec']} if 'train_time_sec' in done else {}),
           'total_time_sec': done['total_time_sec'], 'commit': commit(),
           'params_sha256': done['params_sha256']}
  if base(method) not in ('teacher', 'none'):
    new['teacher_sha256'] = against
  if base(method) == 'teacher' and entry and entry.get('params_sha256') is not None and (
      entry['params_sha256'] == new.get('params_sha256')):
    # Its workdir was gone and it ran again to the same parameters, bit for bit: the record keeps
    # the run it had (its students stay current), and notes the commits that reproduced it.
    new = {**entry, 'reproduced': entry.get('reproduced', []) + [new['commit']]}
  elif entry:  # the run this one replaces, for the report's note
    new['replaces'] = {'top1': entry.get('top1'), 'commit': entry['commit']}
  record[key] = new
  save_record(record)


def discussion():
  if not os.path.exists(REPORT):
    return '## Discussion\n\n(to be written from the results)\n'
  text = open(REPORT).read()
  return text[text.index('## Discussion'):] if '## Discussion' in text else ''


def teacher_note(root, seeds, record):
  teachers = [(seed, record.get(f'teacher-s{seed}', {})) for seed in seeds]
  again = [(s, e) for s, e in teachers
           if 'top1' in e and e.get('replaces', {}).get('top1') is not None]
  same = [(s, e) for s, e in teachers if 'reproduced' in e]
  lines = []
  if again:
    lines += [
        'The teachers were trained again (same command and seed, current code; their first '
        'workdirs were gone): top-1 '
        + ', '.join(f'{e["top1"]:.2f} (seed {s}; first study {e["replaces"]["top1"]:.2f})'
                    for s, e in again)
        + '; every row without † distils these (or runs without a teacher) with the current '
        'code.', '']
  if same:
    lines += [
        'Teachers trained again after their workdirs were lost came out with the same '
        'parameters bit for bit (params_sha256): '
        + ', '.join(f'seed {s} (trained at {e["commit"]}, again at {", ".join(e["reproduced"])})'
                    for s, e in same)
        + '.', '']
  return lines


def report(root, seeds, record):
  rows, total = [], 0.0
  for method in ENTRIES:
    results = [record.get(f'{name(method)}-s{s}') for s in seeds]
    if not any(results):
      continue
    if not all(results):
      rows.append(f'| {label(method)} | (not finished: '
                  f'{sum(map(bool, results))} of {len(seeds)} seeds) | | |')
      continue
    current = [is_current(r, record, method, s) for r, s in zip(results, seeds)]
    mark = '' if all(current) else ' †'
    per_seed = ', '.join(('failed' if 'failed' in r else f'{r["top1"]:.2f}') + ('' if c else '†')
                         for r, c in zip(results, current))
    partly_redone = any(current) and not all(current)
    if partly_redone:  # the redone seeds only
      results = [r for r, c in zip(results, current) if c]
    top1 = [r['top1'] for r in results if 'failed' not in r]
    failed = [r['failed'] for r in results if 'failed' in r]
    wall = sum(r.get('train_time_sec', r.get('wall_time_sec', 0)) for r in results)
    total += sum(r.get('total_time_sec', 0) for r in results)
    if not top1:
      rows.append(f'| {label(method)}{mark} | failed in every seed: {failed[0]} | {per_seed} | |')
      continue
    std = statistics.stdev(top1) if len(top1) > 1 else 0.0
    mean = f'{statistics.mean(top1):.2f} ± {std:.2f}'
    if partly_redone:
      mean = f'{mean} (the {len(top1)} seeds redone)' if len(top1) > 1 else (
          f'{top1[0]:.2f} (the one seed redone)')
    elif failed:
      mean += f' ({len(top1)} of {len(seeds)} seeds; the others: {failed[0]})'
    rows.append(f'| {label(method)}{mark} | {mean} | {per_seed} | {wall / 60:.0f} |')
  os.makedirs(os.path.dirname(REPORT), exist_ok=True)
  maps = []
  for method in LINK_MAPS:  # the method's map, or its first variant's (a diverged run has none)
    for entry in [e for e in ENTRIES if base(e) == method]:
      plot = os.path.join(workdir(root, entry, seeds[0]), 'attention.png')
      if summary(root, entry, seeds[0]) and os.path.exists(plot):  # a finished run's, else
        # the one reported earlier
        shutil.copyfile(plot, heatmap(name(entry)))
      if os.path.exists(heatmap(name(entry))):
        maps.append(entry)
        break
  c = fashion_mnist.get_config(f'method=afd,seed={seeds[0]}')
  lines = [
      '# Fashion-MNIST: the student alone vs KD, AFD and the other distillation methods',
      '',
      f'Teacher {fashion_mnist.TEACHER} -> student {fashion_mnist.STUDENT}, Debian\'s '
      '`dataset-fashion-mnist` through the offline `fashion_mnist_local` builder. Schedule '
      f'(configs/fashion_mnist.py): the first {c.dataset.train_subset:,} training images, '
      f'{c.num_epochs} epochs, batch {c.batch_size}, SGD {c.optimizer.learning_rate} with cosine '
      f'decay, weight decay {c.optimizer.weight_decay}, crop + flip. Top-1 on the full '
      '10,000-image test split at the **last epoch** (the protocol of the CRD benchmark), mean '
      f'± sample std over seeds {", ".join(map(str, seeds))}; each student distils the teacher of '
      'its seed. Loss weights as each method\'s original code (configs/methods.py, which cites '
      'them): KD = 0.1 CE + 0.9 KD (T 4); FitNet CE + 100 hint; AT CE + 1000 AT; AFD CE + 0.9 '
      'KD + 200 L_AFD (the official recipe); the CRD benchmark\'s others at its weights, AB, FT '
      f'and FSP after their own pre-training stage of {fashion_mnist.PRETRAIN_EPOCHS} epochs '
      '(the benchmark\'s 30 of 240, scaled); SemCKD, ReviewKD and DKD at their repositories\' '
      'CIFAR-100 weights, the 20-epoch warm-ups of the last two scaled alike '
      f'({fashion_mnist.WARMUP_EPOCHS:.2f}).',
      '',
      '| run | top-1 (%) | per seed | train min (3 seeds) |',
      '|---|---|---|---|',
      *rows,
      '',
      *(['† A run of the first study (2026-11-28: earlier code and the first teachers), not yet '
         'run again with the current teachers; a row partly redone averages its redone seeds '
         'only.', '']
        if any('†' in r for r in rows) else []),
      *teacher_note(root, seeds, record),
      f'Total wall time of the runs: {total / 3600:.2f} h on a 2-core x86-64 VM (XLA CPU, float32; '
      'compilation, evaluation and checkpoints included). The discussion below dates each row.',
      '',
      'Reproduce (runs or resumes every run, then rewrites this file):',
      '',
      '```bash',
      '.venv/bin/python launch/fashion_mnist_study.py',
      '```',
      '',
      'One run: `' + ' '.join(['python'] + command('workdirs/fashion_mnist', 'afd', 0)[1:]) + '`',
      '',
      f'Learned layer links, seed {seeds[0]} (each method\'s attention, mean over the last '
      'epoch\'s training batches; rows: teacher layers, columns: student layers; '
      '`python -m afd_jax.visualize --workdir=...` redraws one):',
      '',
      '| ' + ' | '.join(label(m) for m in maps) + ' |',
      '|' + '---|' * len(maps),
      '| ' + ' | '.join(f'![{label(m)} links]({os.path.basename(heatmap(name(m)))})'
                        for m in maps) + ' |',
      '',
      discussion(),
  ]
  os.makedirs(os.path.dirname(REPORT), exist_ok=True)
  with open(REPORT, 'w') as f:
    f.write('\n'.join(lines))
  print(f'wrote {REPORT}')


def recorded_teachers(record, seeds):
  return [record.get(f'teacher-s{seed}', {}).get('params_sha256') for seed in seeds]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', default=os.path.join(REPO, 'workdirs', 'fashion_mnist'))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--methods', default=','.join(ENTRIES[1:]),
                      help='comma-separated students to run (the teachers run as needed)')
  parser.add_argument('--report-only', action='store_true')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  chosen = [m for m in args.methods.split(',') if m]
  unknown = [m for m in chosen if m not in ENTRIES]
  if unknown:
    parser.error(f'unknown method(s) {unknown}; choose from {", ".join(ENTRIES)}')
  record = load_record()
  while not args.report_only:  # method by method (every seed of one), each seed's teacher first
    before = recorded_teachers(record, seeds)
    for method in [m for m in chosen if m != 'teacher']:
      for seed in seeds:
        if (base(method) != 'none'  # the student alone needs no teacher
            and not is_current(record.get(f'{name(method)}-s{seed}'), record, method, seed)
            and not is_current(record.get(f'teacher-s{seed}'), record, 'teacher', seed,
                               args.root)):
          run(args.root, 'teacher', seed, record)
        run(args.root, method, seed, record)
    if recorded_teachers(record, seeds) == before:
      break
    # A teacher trained again to other parameters: the students of its seed run before it were
    # current then and are not now; one more pass runs them.
  report(args.root, seeds, record)


if __name__ == '__main__':
  main()
