"""What guards a training run around its loop: the settings checked before anything starts
(`validate`), one run per workdir (`lock_workdir`), and the preemption notice (`PreemptionWatch`).
"""
import signal
from typing import List, Optional

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from afd_jax import distill, models, optim, workdir_lock
from afd_jax import task as task_lib
from afd_jax.errors import UserError
from afd_jax.mixing import Mixing

TEACHER_DTYPES = ('float32', 'bfloat16')  # float64 is the whole step's (dtype) or nothing


def validate(config) -> None:
  """Checks the settings that need no data or devices; one clear message on the first problem."""
  if config.method != 'none':
    try:
      distill.registry.get(config.method)
    except ValueError as e:
      raise UserError(str(e)) from None
    if 'index' in distill.registry.get(config.method).inputs and config.dataset.shuffle_buffer:
      raise UserError(f"method {config.method!r} needs each example's index in the training "
                      f'split, which a streamed pipeline (dataset.shuffle_buffer='
                      f'{config.dataset.shuffle_buffer}) does not know; set '
                      'dataset.shuffle_buffer=0 to hold the split in memory.')
  distil = task_lib.is_distillation(config)
  teachers = task_lib.teacher_sections(config) if distil else ()
  names = [config.student.name] + [section.name for _, section in teachers]
  for name in names:
    try:
      models.check_name(name)
    except ValueError as e:
      raise UserError(str(e)) from None
  optim.check(config.optimizer)
  problems = Mixing.from_config(config).problems()
  if problems:
    raise UserError(problems[0])
  if not 0 <= config.ema_decay < 1:
    raise UserError(f'ema_decay must be in [0, 1) (0 = off), got {config.ema_decay}.')
  if config.student.drop_path_rate and not 0 <= config.student.drop_path_rate < 1:
    raise UserError(f'student.drop_path_rate must be in [0, 1), got '
                    f'{config.student.drop_path_rate}.')
  if config.dtype not in task_lib.DTYPES:
    raise UserError(f'dtype must be one of {", ".join(task_lib.DTYPES)}, got {config.dtype!r}.')
  for key, (_, section) in zip(_teacher_keys(config), task_lib.teacher_sections(config)):
    _check_teacher_dtype(config, section, key)
  if config.bn_group_size < 0 or (config.bn_group_size and
                                  config.batch_size % config.bn_group_size):
    raise UserError(f'bn_group_size={config.bn_group_size} must be 0 (the global batch) or a '
                    f'positive divisor of batch_size={config.batch_size}.')
  for key in ('batch_size', 'eval_batch_size', 'log_every_steps', 'eval_every_epochs'):
    if config[key] < 1:
      raise UserError(f'{key} must be positive, got {config[key]}.')
  if config.num_epochs <= 0 and config.num_train_steps <= 0:
    raise UserError('set num_epochs (or num_train_steps) to a positive number.')
  paths = [('student.init_checkpoint', config.student.init_checkpoint)]
  paths += [(f'{key}.checkpoint', section.checkpoint)
            for key, (_, section) in zip(_teacher_keys(config), teachers)]
  for key, path in paths:
    if path and path != 'random' and not epath.Path(path).exists():
      raise UserError(f'{key} {path} does not exist.')
  if distil and config.get('teachers'):
    try:
      task_lib.check_several_teachers(config)
    except ValueError as e:
      raise UserError(str(e)) from None


def _teacher_keys(config) -> List[str]:
  """The config paths of the teachers' sections: `teacher`, or `teachers[k]`."""
  teachers = config.get('teachers') or ()
  return [f'teachers[{k}]' for k in range(len(teachers))] if teachers else ['teacher']


def _check_teacher_dtype(config, section, key: str) -> None:
  if section.dtype and section.dtype not in TEACHER_DTYPES:
    raise UserError(f'{key}.dtype must be empty (= dtype) or one of '
                    f'{", ".join(TEACHER_DTYPES)}, got {section.dtype!r}.')
  if config.dtype == 'float64' and section.dtype:
    raise UserError('dtype float64 runs the whole step, teacher included, in float64: leave '
                    f'{key}.dtype empty (got {section.dtype!r}).')


def lock_workdir(workdir: str) -> Optional[workdir_lock.WorkdirLock]:
  """Creates `workdir` if needed and takes its lock (process 0, for the whole job); every process
  raises UserError if the workdir is a file, cannot be written, or another run holds it."""
  lock, problem = None, ''
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    try:
      if path.exists() and not path.is_dir():
        raise UserError(f'--workdir {workdir} is a file, not a folder.')
      try:
        path.mkdir(parents=True, exist_ok=True)
        lock = workdir_lock.WorkdirLock(workdir).acquire()
      except OSError as e:
        raise UserError(f'--workdir {workdir} cannot be written '
                        f'({e.strerror or type(e).__name__}).') from None
    except UserError as e:
      problem = str(e)
    if lock is not None and lock.took_over:
      print(f'WARNING: took over the lock of a run that is gone in {workdir} '
            f'(pid {lock.took_over.get("pid")} on {lock.took_over.get("host")}).', flush=True)
  if jax.process_count() > 1:
    refused = multihost_utils.broadcast_one_to_all(np.int32(bool(problem)))
    if int(refused) and not problem:
      problem = f'process 0 could not take the lock of {workdir} (see its log).'
  if problem:
    raise UserError(problem)
  return lock


class PreemptionWatch:
  """Did this job get a preemption notice (SIGTERM)? Multi-host: all processes agree on the
  step through JAX's preemption sync point; single process: our own SIGTERM handler."""

  def __init__(self):
    self._flag = False
    self._multi = jax.process_count() > 1
    self._previous = None
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._flag = True

  def reached(self, step_id: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step_id)
    return self._flag

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
