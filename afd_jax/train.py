"""The training loop: mesh, data, restore-or-init, steps, eval, checkpoints, metrics.

`train_and_evaluate(config, workdir)` trains a model alone (`method='none'` and no KD: teacher
training, or a student from scratch) or distils a frozen teacher into a student.
"""
import contextlib
import dataclasses
import hashlib
import os
import signal
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from afd_jax import checkpoint, data, distill, metrics, models, optim, sharding, step, workdir_lock
from afd_jax import task as task_lib
from afd_jax import weights
from afd_jax.errors import UserError, warn
from afd_jax.mixing import Mixing
from afd_jax.state import student_variables

DTYPES = task_lib.DTYPES
TEACHER_DTYPES = ('float32', 'bfloat16')  # float64 is the whole step's (dtype) or nothing
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: stopped early, a checkpoint was saved; rerun to resume.


class TrainingDiverged(UserError):
  """A loss term or the gradient became non-finite; no checkpoint of that state is written."""


def params_sha256(tree) -> str:
  """SHA-256 of a pytree's leaves (path, dtype, shape and bytes) in a canonical (sorted-path)
  order: equal iff runs agree. Any pytree: the parameters, or the whole train state."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                           key=lambda item: jax.tree_util.keystr(item[0])):
    leaf = np.asarray(jax.device_get(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f'{leaf.dtype}{leaf.shape}'.encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


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
  names = [config.student.name] + ([config.teacher.name] if distil else [])
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
  if config.dtype not in DTYPES:
    raise UserError(f'dtype must be one of {", ".join(DTYPES)}, got {config.dtype!r}.')
  if config.teacher.dtype and config.teacher.dtype not in TEACHER_DTYPES:
    raise UserError(f'teacher.dtype must be empty (= dtype) or one of '
                    f'{", ".join(TEACHER_DTYPES)}, got {config.teacher.dtype!r}.')
  if config.dtype == 'float64' and config.teacher.dtype:
    raise UserError('dtype float64 runs the whole step, teacher included, in float64: leave '
                    f'teacher.dtype empty (got {config.teacher.dtype!r}).')
  if config.bn_group_size < 0 or (config.bn_group_size and
                                  config.batch_size % config.bn_group_size):
    raise UserError(f'bn_group_size={config.bn_group_size} must be 0 (the global batch) or a '
                    f'positive divisor of batch_size={config.batch_size}.')
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] < 1:
      raise UserError(f'{key} must be positive, got {config[key]}.')
  if config.num_epochs <= 0 and config.num_train_steps <= 0:
    raise UserError('set num_epochs (or num_train_steps) to a positive number.')
  for key, path in (('student.init_checkpoint', config.student.init_checkpoint),
                    ('teacher.checkpoint', config.teacher.checkpoint if distil else '')):
    if path and path != 'random' and not epath.Path(path).exists():
      raise UserError(f'{key} {path} does not exist.')


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


def evaluate(eval_step, variables, config, info, mesh) -> Dict[str, float]:
  """Top-1/top-5 (%) and loss over every eval example exactly once."""
  totals = None
  for batch in data.eval_iterator(config, info, process_index=jax.process_index(),
                                  process_count=jax.process_count()):
    sums = eval_step(variables, sharding.global_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals['count']), 1.0)
  return {'top1': 100 * float(totals['correct1']) / count,
          'top5': 100 * float(totals['correct5']) / count,
          'loss': float(totals['loss_sum']) / count, 'count': int(totals['count'])}


def evaluate_student(eval_step, state, config, info, mesh) -> Dict[str, float]:
  """`evaluate` of the student; where the run keeps a moving average of it, also of that
  (`ema_top1`, `ema_top5`, `ema_loss`)."""
  out = evaluate(eval_step, student_variables(state), config, info, mesh)
  if state.ema:
    ema = evaluate(eval_step, state.ema, config, info, mesh)
    out.update({f'ema_{k}': v for k, v in ema.items() if k != 'count'})
  return out


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


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains and evaluates; returns (and writes to `workdir/summary.json`) the summary.
  One run per workdir: a second one refuses while this one holds `workdir/LOCK`."""
  start_time = time.time()
  validate(config)
  sharding.maybe_initialize_distributed()
  lock = lock_workdir(workdir)
  try:
    with float64_mode(config):
      return _train_and_evaluate(config, workdir, start_time)
  finally:
    if lock is not None:
      lock.release()


@contextlib.contextmanager
def float64_mode(config):
  """dtype float64: jax_enable_x64 on for the run (restored after it), before anything is
  built. Refused on a TPU, which has no float64 arithmetic."""
  if config.dtype != 'float64':
    yield
    return
  if jax.default_backend() == 'tpu':
    raise UserError('dtype float64 (a mode for checking numerics) needs a CPU or GPU; a TPU '
                    'has no float64 arithmetic. Use dtype float32 or bfloat16.')
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', previous)


def _train_and_evaluate(config, workdir: str, start_time: float) -> Dict[str, Any]:
  mesh = sharding.make_mesh(config.mesh_shape)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  per_device = config.batch_size // mesh.shape[sharding.DATA]
  if config.bn_group_size and per_device % config.bn_group_size:
    warn(f'bn_group_size={config.bn_group_size} does not divide the per-device batch '
                    f'of {per_device}: groups span devices, so batch norm still communicates.')
  info = data.dataset_info(config, process_count=jax.process_count(),
                           num_devices=mesh.shape[sharding.DATA])
  distil = task_lib.is_distillation(config)
  steps_per_epoch = data.steps_per_epoch(config, info, jax.process_count())
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(round(config.num_epochs * steps_per_epoch)))
  task = make_task(config, info, steps_per_epoch)
  if config.debug_nan_at_step > 0:
    task = dataclasses.replace(task, nan_at_step=config.debug_nan_at_step)
  student, teacher = task.student, task.teacher
  total_steps += task.pretrain_steps  # the method's own stage comes first

  # Everything that can refuse does so before anything is written or compiled.
  expected = checkpoint.fingerprint(config, info.num_classes, distil)
  own = checkpoint.has_checkpoints(workdir)
  if own:
    checkpoint.check_compatible(checkpoint.Checkpoints(workdir, create=False).latest_meta(),
                                expected, workdir)
  elif config.resume_from:
    if not checkpoint.has_checkpoints(config.resume_from):
      raise UserError(f'resume_from={config.resume_from} has no checkpoints.')
    checkpoint.check_compatible(
        checkpoint.Checkpoints(config.resume_from, create=False).latest_meta(), expected,
        config.resume_from)
  rep = sharding.replicated(mesh)
  teacher_vars = None
  if distil:
    teacher_vars = jax.device_put(task_lib.cast_floats(
        weights.load_teacher(config, teacher, info.num_classes, info.image_shape),
        task.param_dtype), rep)

  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # processes > 0 (process 0 made it)
  ckpts = checkpoint.Checkpoints(workdir, config.keep_checkpoints, config.keep_best)
  writer = watch = train_iter = None
  try:
    writer = metrics.Writer(workdir)
    init_fn = step.jit_init_state(task, mesh, info.image_shape,
                                  jax.eval_shape(lambda: teacher_vars) if distil else None)
    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            jax.eval_shape(init_fn, rng))
    restored = ckpts.restore_latest(abstract) if own else None
    source = f'{workdir} (own checkpoint)'
    if restored is None and config.resume_from:
      restored = checkpoint.Checkpoints(config.resume_from, create=False).restore_latest(abstract)
      source = f'{config.resume_from} (resume_from)'
    earlier_train_time = 0.0  # the training time of the runs that led to the restored state
    if restored is not None:
      state, restored_meta = restored
      earlier_train_time = float(restored_meta.get('train_time_sec', 0.0))
      writer.console(f'resumed from {source} at step {int(state.step)}')
    else:
      state = init_fn(rng)
      if config.student.init_checkpoint:
        initial = weights.load_model_variables(
            config.student.init_checkpoint, config.student.name, student, info.num_classes,
            info.image_shape, 'student.init_checkpoint', new_head_ok=True)
        initial = task_lib.cast_floats(initial, task.param_dtype)
        state = state.replace(
            params={**state.params, 'student': jax.device_put(initial['params'], rep)},
            batch_stats={**state.batch_stats,
                         'student': jax.device_put(initial['batch_stats'], rep)})
        if state.ema:  # the average starts from the loaded weights
          state = state.replace(ema=student_variables(state))
        writer.console(f'student initialised from {config.student.init_checkpoint}')
    start_step = int(state.step)
    checkpoint.write_json(os.path.join(workdir, 'config.json'), config.to_dict())

    train_step = step.jit_train_step(task, mesh)
    pretrain_step = step.jit_pretrain_step(task, mesh) if task.pretrain is not None else None
    eval_student = step.jit_eval_step(student, mesh)
    pair = f' <- {config.teacher.name} ({config.method}, kd {config.loss.kd_weight})'
    writer.console(
        f'{config.name}: {config.student.name}' + (pair if distil else '')
        + f' on {info.name} ({info.num_train} train / {info.num_eval} eval, {info.num_classes} '
        f'classes), {jax.device_count()} devices x {jax.process_count()} processes, '
        f'{steps_per_epoch} steps/epoch, {total_steps} steps')
    if distil:
      teacher_eval = evaluate(step.jit_eval_step(teacher, mesh), teacher_vars, config, info, mesh)
      writer.console(f'teacher {config.teacher.name}: top1 {teacher_eval["top1"]:.2f} '
                     f'top5 {teacher_eval["top5"]:.2f}')
      writer.scalars(start_step, {'teacher/top1': teacher_eval['top1']})
    else:
      teacher_eval = None

    train_time = lambda: earlier_train_time + time.time() - progress.start_time
    meta = lambda s, extra=None: {'fingerprint': expected, 'step': s, 'config_name': config.name,
                                  'train_time_sec': train_time(), **(extra or {})}
    train_iter = data.train_iterator(config, info, start_step=start_step,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
    progress = metrics.Progress(total_steps, config.batch_size, start_step)
    watch = PreemptionWatch()
    history, history_start, attention = [], start_step, []
    eval_metrics: Optional[Dict[str, float]] = None
    train_metrics: Dict[str, float] = {}
    status = 'finished'
    for step_index in range(start_step, total_steps):
      batch = sharding.global_batch(next(train_iter), mesh)
      run = pretrain_step if step_index < task.pretrain_steps else train_step
      state, step_metrics = run(state, teacher_vars, batch)
      history.append(step_metrics)
      done = step_index + 1
      epoch_end = done % steps_per_epoch == 0 or done == total_steps
      preempted = watch.reached(done)
      periodic = config.checkpoint_every_steps > 0 and done % config.checkpoint_every_steps == 0
      stage_end = done == task.pretrain_steps  # the method's own stage ends: log it apart
      if done % config.log_every_steps == 0 or epoch_end or periodic or preempted or stage_end:
        fetched = jax.device_get(history)
        problem = metrics.first_non_finite(fetched, history_start + 1)
        if problem:
          last = ckpts.steps()
          raise TrainingDiverged(
              f'{problem}. Stopped; no checkpoint of this state was written'
              + (f'; the last good checkpoint is step {last[-1]} in {ckpts.directory}.' if last
                 else '.'))
        attention += [m['attention'] for m in fetched if 'attention' in m]
        means = metrics.mean_metrics([{k: v for k, v in m.items() if k != 'attention'}
                                      for m in fetched])
        train_metrics = {k: float(v) for k, v in means.items()}
        speed = progress.update(done)
        writer.scalars(done, {**{f'train/{k}': float(v) for k, v in means.items()}, **speed})
        writer.console(
            f'step {done}/{total_steps} (epoch {done / steps_per_epoch:.2f}) '
            f'{metrics.format_terms(means, ["loss", "pretrain", "ce", "kd", config.method])} '
            f'top1 {100 * means["top1"]:.1f} lr {means["learning_rate"]:.4g} | '
            f'{speed["images_per_sec"]:.0f} img/s, {1000 * speed["step_time"]:.0f} ms/step, '
            f'ETA {metrics.format_duration(speed["eta_sec"])}')
        history, history_start = [], done
      epoch = done // steps_per_epoch
      save_metrics = None
      if epoch_end and (epoch % config.eval_every_epochs == 0 or done == total_steps):
        eval_metrics = evaluate_student(eval_student, state, config, info, mesh)
        save_metrics = {'top1': eval_metrics['top1']}
        writer.scalars(done, {f'eval/{k}': v for k, v in eval_metrics.items()})
        writer.console(f'eval at step {done}: top1 {eval_metrics["top1"]:.2f} '
                       f'top5 {eval_metrics["top5"]:.2f} loss {eval_metrics["loss"]:.4f}'
                       + (f' (ema top1 {eval_metrics["ema_top1"]:.2f})' if state.ema else ''))
        if attention:
          save_attention(workdir, done, np.mean(attention, axis=0), student, teacher, config,
                         task.distiller)
          attention = []
      if epoch_end or periodic or preempted:
        ckpts.save(done, state, meta(done, {'eval': eval_metrics}), metrics=save_metrics)
      if preempted and done < total_steps:
        status = 'preempted'
        writer.console(f'preemption notice: saved step {done}; rerun the same command to resume.')
        break
    if status == 'finished' and eval_metrics is None:  # resumed at the end: evaluate once
      eval_metrics = evaluate_student(eval_student, state, config, info, mesh)
  finally:
    train_iter = None  # Close the input pipeline now, not at interpreter exit.
    # Each is closed even where another raises, in reverse order: the SIGTERM handler last, so
    # that it still guards the final saves.
    with contextlib.ExitStack() as closing:
      if watch is not None:
        closing.callback(watch.close)
      if writer is not None:
        closing.callback(writer.close)  # the event file complete, however the run ends
      closing.callback(ckpts.close)
  wall = time.time() - progress.start_time
  summary = {'config_name': config.name, 'status': status, 'final_step': int(state.step),
             'total_steps': total_steps, 'eval': eval_metrics, 'teacher_eval': teacher_eval,
             'train': train_metrics,
             'wall_time_sec': wall, 'total_time_sec': time.time() - start_time,
             # Over every run that led here: each earlier run up to its last checkpoint.
             'train_time_sec': earlier_train_time + wall,
             'params_sha256': params_sha256(state.params),
             # The whole state: step, params, batch_stats, opt_state and rng (exact resume).
             'state_sha256': params_sha256(state)}
  if status == 'finished':
    checkpoint.write_json(os.path.join(workdir, 'summary.json'), summary)
    writer.console(f'done: step {summary["final_step"]}, eval top1 '
                   f'{(eval_metrics or {}).get("top1", float("nan")):.2f}, '
                   f'params_sha256 {summary["params_sha256"][:16]}...')
  return summary


def make_task(config, info: data.DatasetInfo, steps_per_epoch: int) -> task_lib.Task:
  """The run's Task (`task_lib.task_from_config`) for this dataset: the split's size, and its labels
  for a method that declares `needs_train_labels`. Raises UserError."""
  try:
    method = (distill.registry.get(config.method)
              if task_lib.is_distillation(config) and config.method != 'none' else None)
    train_labels = (data.train_labels(config, info, jax.process_count())
                    if method is not None and method.needs_train_labels else None)
    task = task_lib.task_from_config(config, info.num_classes, steps_per_epoch, DTYPES[config.dtype],
                                 info.image_shape, num_train_examples=info.num_train,
                                 train_labels=train_labels)
    task_lib.check_batch_norm_groups(task, info.image_shape)
    task_lib.check_float64(task, info.image_shape)
  except (ValueError, TypeError) as e:  # a factory's kwargs, taps that match nothing, a grid
    raise UserError(str(e)) from None
  return task


def save_attention(workdir, step_count, mean_attention, student, teacher, config,
                   distiller=None) -> None:
  """Writes the mean attention (teacher layers x student layers) and, if enabled, its plot,
  labelled with the layers the distiller links (`viz.link_labels`)."""
  if jax.process_index() != 0:
    return
  folder = epath.Path(workdir) / 'attention'
  folder.mkdir(parents=True, exist_ok=True)
  with (folder / f'{step_count:08d}.npy').open('wb') as f:
    np.save(f, mean_attention)
  checkpoint.write_json(str(folder / 'taps.json'),
                        {'teacher': [t.name for t in teacher.taps()],
                         'student': [t.name for t in student.taps()]})
  logging.info('mean attention at step %d (T x S):\n%s', step_count,
               np.array2string(mean_attention, precision=2, max_line_width=200))
  if config.plot_attention:
    from afd_jax import viz  # pylint: disable=g-import-not-at-top
    labels = viz.link_labels(distiller, [t.name for t in teacher.taps()],
                             [t.name for t in student.taps()])
    viz.plot_attention(mean_attention, *labels, os.path.join(workdir, 'attention.png'),
                       title=f'{config.teacher.name} -> {config.student.name}, step {step_count}')
