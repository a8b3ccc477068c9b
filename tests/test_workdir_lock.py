"""One run per workdir: of two runs started together on one workdir the second refuses, naming the
holder; after SIGKILL of the holder a new run takes the lock over and resumes."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from afd_jax import workdir_lock
from afd_jax.errors import UserError
from tests import runs


def start(args, workdir):
  cmd = [sys.executable, '-m', 'afd_jax.main', *args, f'--workdir={workdir}']
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=runs.env(1), cwd=runs.REPO)


def test_two_runs_on_one_workdir_then_sigkill_and_resume(digits_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  long_run = runs.flag_args(digits_data_dir, num_train_steps=2000, checkpoint_every_steps=5)
  first, second = start(long_run, workdir), start(long_run, workdir)
  # The loser exits at once (before compiling); the holder keeps running.
  deadline = time.time() + 240
  while first.poll() is None and second.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  loser, holder = (first, second) if first.poll() is not None else (second, first)
  assert loser.poll() == 2 and holder.poll() is None
  err = loser.stderr.read()
  assert 'Traceback' not in err
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(errors) == 1
  assert f'{workdir} is in use by another run (pid {holder.pid} on {socket.gethostname()}' \
      in errors[0]

  for line in holder.stdout:  # SIGKILL once a checkpoint exists
    match = re.match(r'step (\d+)/', line)
    if match and int(match.group(1)) >= 10:
      break
  time.sleep(1)
  holder.send_signal(signal.SIGKILL)
  assert holder.wait(timeout=60) == -signal.SIGKILL
  saved = [int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  assert saved

  rerun = runs.cli(runs.flag_args(digits_data_dir, num_train_steps=max(saved) + 5,
                                  checkpoint_every_steps=5), workdir=str(workdir), devices=1,
                   check=True)
  assert (f'took over the lock of a run that is gone in {workdir} (pid {holder.pid} on '
          f'{socket.gethostname()})') in rerun.stdout
  assert re.search(r'resumed from .* at step (5|10|15)', rerun.stdout)
  assert runs.summary(workdir)['status'] == 'finished'
  assert (workdir / workdir_lock.LOCK).read_text() == ''  # released: no holder named


def test_lock_in_process_refuses_and_releases(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(UserError, match=rf'in use by another run \(pid {os.getpid()} on '):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  first.release()
  again = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert again.took_over is None  # released cleanly: nothing to take over
  again.release()
