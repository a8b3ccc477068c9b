#!/usr/bin/env python3
"""How long the CLI takes to start and to exit around a tiny run (the time no step is in).

  .venv/bin/python launch/cli_exit_time.py [--runs 3] [--devices 1]

Runs `python -m afd_jax.main` on configs/digits.py, shrunk to 3 steps of resnet8 <- resnet8
(an untrained teacher, no checkpoint), `--runs` times in a fresh workdir each, and prints per run
and as medians: the seconds to the first line of the run (imports, data, model set-up), to the
'done:' line, and from 'done:' to the process's exit (exit handlers and interpreter shutdown).
The digits data is built once in a temporary data_dir (offline), by a first run that is not
counted; each run takes about 1.5 minutes on 2 CPU cores, most of it compiling.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.teacher.name=resnet8', '--config.teacher.checkpoint=random',
        '--config.student.name=resnet8', '--config.afd.qk_dim=16', '--config.batch_size=32',
        '--config.num_train_steps=3', '--config.checkpoint_every_steps=0',
        '--config.keep_best=False', '--config.log_every_steps=1']


def one_run(data_dir: str, workdir: str, env: Dict[str, str]) -> Dict[str, float]:
  cmd = [sys.executable, '-m', 'afd_jax.main', f'--config={REPO}/configs/digits.py:afd',
         f'--config.dataset.data_dir={data_dir}', *TINY, f'--workdir={workdir}']
  with tempfile.TemporaryFile('w+') as err:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                            env=env)
    first = done = None
    for line in proc.stdout:
      first = first or time.monotonic()
      if line.startswith('done:'):
        done = time.monotonic()
    proc.wait()
    end = time.monotonic()
    if proc.returncode != 0 or done is None:
      err.seek(0)
      last = ([l for l in err.read().splitlines() if l.strip()] or ['(nothing on stderr)'])[-1]
      sys.exit(f'error: the run failed (exit {proc.returncode}): {last}')
  return {'to first line': first - start, 'to done': done - start, 'done to exit': end - done}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--devices', type=int, default=1, help='fake CPU devices')
  args = parser.parse_args()
  if args.runs < 1 or args.devices < 1:
    sys.exit('error: --runs and --devices take a positive number.')
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
  flags += f' --xla_force_host_platform_device_count={args.devices}'
  env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': flags.strip()}
  with tempfile.TemporaryDirectory() as tmp:
    rows = [one_run(os.path.join(tmp, 'data'), os.path.join(tmp, f'run{i}'), env)
            for i in range(args.runs + 1)][1:]  # the first builds the data: not counted
  for i, row in enumerate(rows):
    print(f'run {i}: ' + ', '.join(f'{k} {v:.2f} s' for k, v in row.items()))
  print('median: ' + ', '.join(f'{k} {statistics.median(r[k] for r in rows):.2f} s'
                               for k in rows[0]))


if __name__ == '__main__':
  main()
