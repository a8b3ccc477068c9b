"""What the resumable study runners share (launch/*_study.py): a JSON record of finished runs in
docs/results/, one `python -m afd_jax.main` per run that resumes from its checkpoint, and the
mean ± std table of a row's seeds.

A run found in the record is not run again, so a study goes on from the record on a machine
without its workdirs; a run whose checkpoint a later run needs (a teacher) is trained again
where its folder is gone, and must give the recorded params_sha256. SIGTERM to the runner stops
the run in progress at a checkpoint.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORES = ('top1', 'miou', 'pixel_accuracy')  # what a run's record keeps of its final eval


def parse_args(description: str, default_root: str) -> Tuple[str, List[int], bool]:
  """A study runner's `--root`, `--seeds` and `--report-only`: (absolute root, seeds, report
  only)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--root', default=os.path.join(REPO, 'workdirs', default_root))
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--report-only', action='store_true')
  args = parser.parse_args()
  return (os.path.abspath(args.root), [int(s) for s in args.seeds.split(',')],
          args.report_only)


def load_record(path: str) -> Dict[str, dict]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def save_record(path: str, record) -> None:
  with open(path, 'w') as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.write('\n')


def commit() -> str:
  return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                        text=True).stdout.strip()


def run(root: str, name: str, cmd, record, record_path: str, needed_on_disk: bool = False,
        on_recorded: Optional[Callable[[str, str], None]] = None) -> int:
  """Runs (or resumes) one run unless it is recorded; records it; returns the exit code.

  `needed_on_disk`: the run's checkpoint is used by a later run, so a recorded run whose folder
  is gone is trained again and checked against the recorded params_sha256. `on_recorded(name,
  folder)` is called once a run is newly recorded (e.g. to copy its attention plot).
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
  scores = {k: summary['eval'][k] for k in SCORES if k in summary['eval']}
  record[name] = {**scores, 'wall_time_sec': summary['wall_time_sec'],
                  'params_sha256': summary['params_sha256'], 'commit': commit()}
  save_record(record_path, record)
  if on_recorded is not None:
    on_recorded(name, folder)
  return 0


def run_plan(root: str, plan, record, record_path: str, teacher_run: str,
             on_recorded: Optional[Callable[[str, str], None]] = None) -> int:
  """Runs (or resumes) every `(name, command, uses_teacher)` of `plan` in order (`run`);
  `teacher_run` is trained again where its folder is gone only while an unrecorded run of the
  plan uses it. Returns the first non-zero exit code, else 0."""
  needs_teacher = any(uses and name not in record for name, _, uses in plan)
  for name, cmd, _ in plan:
    code = run(root, name, cmd, record, record_path,
               needed_on_disk=name == teacher_run and needs_teacher, on_recorded=on_recorded)
    if code:
      return code
  return 0


def table_row(label: str, runs: Sequence[Optional[dict]], key: str = 'top1') -> Optional[str]:
  """`| label | mean ± std | per seed | median wall s |` of `key` over the recorded `runs`
  (None: not yet run), or None where none is recorded."""
  found = [r for r in runs if r]
  if not found:
    return None
  tops = [r[key] for r in found]
  spread = f' ± {statistics.stdev(tops):.2f}' if len(tops) > 1 else ''
  per_seed = ', '.join(f'{r[key]:.2f}' if r else '-' for r in runs)
  wall = statistics.median(r['wall_time_sec'] for r in found)
  return f'| {label} | {statistics.mean(tops):.2f}{spread} | {per_seed} | {wall:.0f} |'
