"""One run per workdir, in one process: a second lock on a held workdir refuses, naming the holder,
and a released lock is taken without a takeover. Two CLI runs started together on one workdir,
SIGKILL of the holder and the rerun that takes its lock over and resumes exactly:
tests/test_checkpoint.py."""
import os

import pytest

from afd_jax import workdir_lock
from afd_jax.errors import UserError


def test_lock_in_process_refuses_and_releases(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(UserError, match=rf'in use by another run \(pid {os.getpid()} on '):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  first.release()
  again = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert again.took_over is None  # released cleanly: nothing to take over
  again.release()
