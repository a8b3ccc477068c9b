"""The training loop: mesh, data, restore-or-init, steps, eval, checkpoints, metrics.

`train_and_evaluate(config, workdir)` trains a model alone (`method='none'` and no KD: teacher
training, or a student from scratch) or distils a frozen teacher into a student.
"""
import contextlib
import dataclasses
import hashlib
import os
import time
from typing import Any, Dict, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np
from absl import logging
from etils import epath

from afd_jax import (checkpoint, data, distill, evaluation, metrics, models, predictions,
                     run_guard, sharding, step)
from afd_jax import task as task_lib
from afd_jax import weights
from afd_jax.errors import UserError, warn
from afd_jax.evaluation import EvalBatches, evaluate, evaluate_student
from afd_jax.state import student_variables

DTYPES = task_lib.DTYPES
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: stopped early, a checkpoint was saved; rerun to resume.


class TrainingDiverged(UserError):
  """A loss term or the gradient became non-finite; no checkpoint of that state is written."""


def params_sha256(tree) -> str:
  """SHA-256 of a pytree's leaves (path, dtype, shape and bytes) in a canonical (sorted-path)
  order: equal iff runs agree. Any pytree: the parameters, or the whole train state."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                           key=lambda item: jax.tree_util.keystr(item[0])):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # split over processes
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    leaf = np.asarray(jax.device_get(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f'{leaf.dtype}{leaf.shape}'.encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains and evaluates; returns (and writes to `workdir/summary.json`) the summary.
  One run per workdir: a second one refuses while this one holds `workdir/LOCK`."""
  start_time = time.time()
  run_guard.validate(config)
  sharding.maybe_initialize_distributed()
  lock = run_guard.lock_workdir(workdir)
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
  setup = _prepare(config, workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # processes > 0 (process 0 made it)
  ckpts = checkpoint.Checkpoints(workdir, config.keep_checkpoints, config.keep_best)
  writer = watch = None
  try:
    writer = metrics.Writer(workdir)
    state, earlier_train_time = _restore_or_init(setup, ckpts, writer)
    checkpoint.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
    loop = _StepLoop(setup, ckpts, writer, earlier_train_time)
    writer.console(_describe(setup))
    teacher_eval = _evaluate_teacher(setup, writer, int(state.step))
    watch = run_guard.PreemptionWatch()
    state, status = loop.run(state, watch)
  finally:
    # Each is closed even where another raises, in reverse order: the SIGTERM handler last, so
    # that it still guards the final saves.
    with contextlib.ExitStack() as closing:
      if watch is not None:
        closing.callback(watch.close)
      if writer is not None:
        closing.callback(writer.close)  # the event file complete, however the run ends
      closing.callback(ckpts.close)
  return _summary(setup, state, status, loop, teacher_eval, start_time, writer)


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What a run is, known before anything is written."""
  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  info: data.DatasetInfo
  task: task_lib.Task
  steps_per_epoch: int
  total_steps: int          # the method's own stage included
  fingerprint: Dict[str, Any]
  own_checkpoints: bool     # the workdir has checkpoints of this run: resume from them
  teacher_vars: Any         # None unless distilling
  eval_batches: EvalBatches
  abstract_state: Any       # the TrainState's shapes, dtypes and shardings

  @property
  def distil(self) -> bool:
    return self.teacher_vars is not None


def _prepare(config, workdir: str) -> _Setup:
  """The mesh, the data, the Task and the teacher's weights. Everything that can refuse does so
  here, before anything is written or compiled."""
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
  total_steps += task.pretrain_steps  # the method's own stage comes first
  fingerprint = checkpoint.fingerprint(config, info.num_classes, distil)
  own = _check_resumable(config, workdir, fingerprint)
  teacher_vars = None
  if distil:
    teacher_vars = task_lib.cast_floats(weights.load_teacher(
        config, task.teacher, info.num_classes, info.image_shape), task.param_dtype)
    teacher_vars = jax.device_put(teacher_vars, _teacher_placement(config, teacher_vars, mesh))
  return _Setup(config, workdir, mesh, info, task, steps_per_epoch, total_steps, fingerprint,
                own, teacher_vars, EvalBatches(config, info),
                _abstract_state(config, task, mesh, info.image_shape, teacher_vars))


def _abstract_state(config, task, mesh, image_shape, teacher_vars):
  """The TrainState's shapes and dtypes, placed replicated, or split over the model axis with
  `config.student.shard` (`sharding.fsdp`: parameters, optimizer state, statistics, EMA)."""
  teacher = None if teacher_vars is None else jax.eval_shape(lambda: teacher_vars)
  shapes = step.abstract_state(task, image_shape, teacher)
  placement = (sharding.fsdp(shapes, mesh, "the student's train state")
               if config.student.get('shard', False)
               else jax.tree.map(lambda _: sharding.replicated(mesh), shapes))
  return jax.tree.map(lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p),
                      shapes, placement)


def _teacher_placement(config, teacher_vars, mesh):
  """Each teacher's weights replicated, or split over the model axis where its section sets
  `shard` (`sharding.fsdp`); with several teachers, per teacher (its variables' label)."""
  def placed(tree, section):
    return (sharding.fsdp(tree, mesh) if getattr(section, 'shard', False)
            else jax.tree.map(lambda _: sharding.replicated(mesh), tree))

  if not config.get('teachers'):
    return placed(teacher_vars, config.teacher)
  out = {col: {} for col in teacher_vars}
  for label, section in task_lib.teacher_sections(config):
    for col, tree in teacher_vars.items():
      if label in tree:
        out[col][label] = placed(tree[label], section)
  return out


def _placement(variables):
  """The shardings of placed (or abstract) arrays: replicated, or split (`config.*.shard`)."""
  return None if variables is None else jax.tree.map(lambda x: x.sharding, variables)


def _check_resumable(config, workdir: str, fingerprint: Dict[str, Any]) -> bool:
  """Refuses the checkpoints to resume from (the workdir's own, else `resume_from`'s) where
  they belong to another run; returns whether the workdir has its own."""
  own = checkpoint.has_checkpoints(workdir)
  if own:
    checkpoint.check_compatible(checkpoint.Checkpoints(workdir, create=False).latest_meta(),
                                fingerprint, workdir)
  elif config.resume_from:
    if not checkpoint.has_checkpoints(config.resume_from):
      raise UserError(f'resume_from={config.resume_from} has no checkpoints.')
    checkpoint.check_compatible(
        checkpoint.Checkpoints(config.resume_from, create=False).latest_meta(), fingerprint,
        config.resume_from)
  return own


def _restore_or_init(s: _Setup, ckpts: checkpoint.Checkpoints,
                     writer: metrics.Writer) -> Tuple[Any, float]:
  """The state to start from: the workdir's latest checkpoint, else `resume_from`'s, else a new
  one (its student from `student.init_checkpoint` where set); and the training time of the
  runs that led to a restored state (0 for a new one)."""
  config, abstract = s.config, s.abstract_state
  init_fn = step.jit_init_state(s.task, s.mesh, s.info.image_shape,
                                jax.eval_shape(lambda: s.teacher_vars) if s.distil else None,
                                _placement(abstract))
  rng = jax.random.PRNGKey(config.seed)
  restored = ckpts.restore_latest(abstract) if s.own_checkpoints else None
  source = f'{s.workdir} (own checkpoint)'
  if restored is None and config.resume_from:
    restored = checkpoint.Checkpoints(config.resume_from, create=False).restore_latest(abstract)
    source = f'{config.resume_from} (resume_from)'
  if restored is not None:
    state, restored_meta = restored
    writer.console(f'resumed from {source} at step {int(state.step)}')
    return state, float(restored_meta.get('train_time_sec', 0.0))
  state = init_fn(rng)
  if config.student.init_checkpoint:
    state = _with_initial_student(s, state)
    writer.console(f'student initialised from {config.student.init_checkpoint}')
  return state, 0.0


def _with_initial_student(s: _Setup, state):
  """`state` with the student's parameters and statistics from `student.init_checkpoint`; a
  moving average of the student starts from them too."""
  config, placed = s.config, _placement(s.abstract_state)
  initial = weights.load_model_variables(
      config.student.init_checkpoint, config.student.name, s.task.student, s.info.num_classes,
      s.info.image_shape, 'student.init_checkpoint', new_head_ok=True)
  initial = task_lib.cast_floats(initial, s.task.param_dtype)
  state = state.replace(
      params={**state.params,
              'student': jax.device_put(initial['params'], placed.params['student'])},
      batch_stats={**state.batch_stats, 'student': jax.device_put(
          initial['batch_stats'], placed.batch_stats['student'])})
  if state.ema:
    state = state.replace(ema=student_variables(state))
  return state


def _describe(s: _Setup) -> str:
  """The run's first console line: the models, the data, the devices, the steps."""
  c, info = s.config, s.info
  pair = f' <- {task_lib.teacher_title(c)} ({c.method}, kd {c.loss.kd_weight})'
  return (f'{c.name}: {c.student.name}' + (pair if s.distil else '')
          + f' on {info.name} ({info.num_train} train / {info.num_eval} eval, '
          f'{info.num_classes} classes), {jax.device_count()} devices x {jax.process_count()} '
          f'processes, {s.steps_per_epoch} steps/epoch, {s.total_steps} steps')


def _evaluate_teacher(s: _Setup, writer: metrics.Writer,
                      start_step: int) -> Optional[Dict[str, float]]:
  """The teacher's eval metrics (None without a teacher), logged at `start_step`; with
  several teachers each one's, by its label."""
  if not s.distil:
    return None
  teacher, placement = s.task.teacher, _placement(s.teacher_vars)
  if not models.is_ensemble(teacher):
    out = evaluate(step.jit_eval_step(teacher, s.mesh, placement), s.teacher_vars,
                   s.eval_batches, s.mesh)
    key = evaluation.headline(out)
    writer.console(f'teacher {s.config.teacher.name}: {evaluation.describe(out, loss=False)}')
    writer.scalars(start_step, {f'teacher/{key}': out[key]})
    return out
  outs = {}
  for k, label in enumerate(teacher.labels):
    out = outs[label] = evaluate(step.jit_eval_step(teacher.member(k), s.mesh, placement),
                                 s.teacher_vars, s.eval_batches, s.mesh)
    writer.console(f'teacher {label}: {evaluation.describe(out, loss=False)}')
    writer.scalars(start_step, {f'teacher/{label}/top1': out['top1']})
  return outs


class _StepLoop:
  """The steps, and after each the periodic actions (clu's, called once a step): a log of the
  step metrics' means every `log_every_steps`, at epoch ends, checkpoint steps and where a
  method's own stage ends, which first checks them (the NaN guard); eval every
  `eval_every_epochs` epochs and at the last step; a checkpoint at epoch ends and every
  `checkpoint_every_steps`. A preemption notice forces a log and a save at whatever step it
  comes, which no schedule knows: our own code. (clu's ReportProgress would repeat the
  throughput and ETA that metrics.Progress puts in the log line.)"""

  def __init__(self, s: _Setup, ckpts: checkpoint.Checkpoints, writer: metrics.Writer,
               earlier_train_time: float):
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top (TensorFlow)
    self.setup, self.ckpts, self.writer = s, ckpts, writer
    self.earlier_train_time = earlier_train_time
    task, mesh, config = s.task, s.mesh, s.config
    teacher, placed = _placement(s.teacher_vars), _placement(s.abstract_state)
    self.train_step = step.jit_train_step(task, mesh, teacher, placed)
    self.pretrain_step = (step.jit_pretrain_step(task, mesh, teacher, placed)
                          if task.pretrain is not None else None)
    self.eval_student = step.jit_eval_step(task.student, mesh, student_variables(placed))
    epoch_ends = set(range(s.steps_per_epoch, s.total_steps, s.steps_per_epoch)) | {s.total_steps}
    every_save = config.checkpoint_every_steps if config.checkpoint_every_steps > 0 else None
    saves = set(range(every_save, s.total_steps + 1, every_save)) if every_save else set()
    action = periodic_actions.PeriodicCallback
    self.log = action(every_steps=config.log_every_steps, callback_fn=self._log,
                      on_steps=epoch_ends | saves | {task.pretrain_steps})
    self.evaluate = action(every_steps=s.steps_per_epoch * config.eval_every_epochs,
                           on_steps={s.total_steps}, callback_fn=self._evaluate)
    self.save = action(every_steps=every_save, on_steps=epoch_ends, callback_fn=self._save)
    self.history, self.history_start, self.attention = [], 0, []
    self.eval_metrics: Optional[Dict[str, float]] = None
    self.evaluated_at = -1
    self.train_metrics: Dict[str, float] = {}
    self.progress: Optional[metrics.Progress] = None

  def run(self, state, watch: run_guard.PreemptionWatch) -> Tuple[Any, str]:
    """Steps from `state` to the last step, or to a preemption notice: (state, status). With
    `config.prefetch` the next global batch is made and sent to the devices while a step runs
    (dispatch is asynchronous), before the periodic actions that may wait for the step."""
    s, start = self.setup, int(state.step)
    prefetch = s.config.get('prefetch', True)
    train_iter = data.train_iterator(s.config, s.info, start_step=start,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
    self.progress = metrics.Progress(s.total_steps, s.config.batch_size, start)
    self.history_start = start
    try:
      batch = None
      if prefetch and start < s.total_steps:
        batch = sharding.global_batch(next(train_iter), s.mesh)
      for index in range(start, s.total_steps):
        if not prefetch:
          batch = sharding.global_batch(next(train_iter), s.mesh)
        stage = self.pretrain_step if index < s.task.pretrain_steps else self.train_step
        state, step_metrics = stage(state, s.teacher_vars, batch)
        if prefetch and index + 1 < s.total_steps:
          batch = sharding.global_batch(next(train_iter), s.mesh)
        self.history.append(step_metrics)
        if self._after_step(index + 1, state, watch.reached(index + 1)):
          return state, 'preempted'
    finally:
      train_iter = batch = None  # Close the input pipeline now, not at interpreter exit.
    if self.eval_metrics is None:  # resumed at the end: evaluate once
      self.eval_metrics = evaluate_student(self.eval_student, state, s.eval_batches, s.mesh)
    return state, 'finished'

  def _after_step(self, done: int, state, preempted: bool) -> bool:
    """The periodic actions after step `done`; True where a preemption notice stops the run."""
    if not self.log(done) and preempted:  # the NaN guard runs before any save
      self._log(done)
    self.evaluate(done, state=state)
    if not self.save(done, state=state) and preempted:
      self._save(done, state=state)
    if preempted and done < self.setup.total_steps:
      self.writer.console(f'preemption notice: saved step {done}; rerun the same command to '
                          'resume.')
      return True
    return False

  # The actions' callbacks: clu passes the step as `step` and the time as `t`.
  # pylint: disable=redefined-outer-name
  def _log(self, step: int, t: Optional[float] = None) -> None:
    """Fetches the step metrics since the last log and checks them (a non-finite term stops the
    run before a checkpoint of its state is written); logs their means and the throughput."""
    del t
    fetched = jax.device_get(self.history)
    problem = metrics.first_non_finite(fetched, self.history_start + 1)
    if problem:
      last = self.ckpts.steps()
      raise TrainingDiverged(
          f'{problem}. Stopped; no checkpoint of this state was written'
          + (f'; the last good checkpoint is step {last[-1]} in {self.ckpts.directory}.' if last
             else '.'))
    self.attention += [m['attention'] for m in fetched if 'attention' in m]
    means = metrics.mean_metrics([{k: v for k, v in m.items() if k != 'attention'}
                                  for m in fetched])
    self.train_metrics = {k: float(v) for k, v in means.items()}
    speed = self.progress.update(step)
    self.writer.scalars(step, {**{f'train/{k}': float(v) for k, v in means.items()}, **speed})
    s = self.setup
    accuracy = 'pixel_accuracy' if 'pixel_accuracy' in means else 'top1'
    self.writer.console(
        f'step {step}/{s.total_steps} (epoch {step / s.steps_per_epoch:.2f}) '
        f'{metrics.format_terms(means, ["loss", "pretrain", "ce", "kd", s.config.method])} '
        f'{accuracy} {100 * means[accuracy]:.1f} lr {means["learning_rate"]:.4g} | '
        f'{speed["images_per_sec"]:.0f} img/s, {1000 * speed["step_time"]:.0f} ms/step, '
        f'ETA {metrics.format_duration(speed["eta_sec"])}')
    self.history, self.history_start = [], step

  def _evaluate(self, step: int, t: Optional[float] = None, *, state) -> None:
    """Evaluates the student (and its moving average), logs it, and writes the mean attention
    of the steps logged since the last eval."""
    del t
    s = self.setup
    m = self.eval_metrics = evaluate_student(self.eval_student, state, s.eval_batches, s.mesh)
    self.evaluated_at = step
    self.writer.scalars(step, {f'eval/{k}': v for k, v in evaluation.scalars(m).items()})
    key = evaluation.headline(m)
    self.writer.console(f'eval at step {step}: {evaluation.describe(m)}'
                        + (f' (ema {key} {m["ema_" + key]:.2f})' if state.ema else ''))
    if self.attention:
      save_attention(s.workdir, step, np.mean(self.attention, axis=0), s.task.student,
                     s.task.teacher, s.config, s.task.distiller)
      self.attention = []

  def _save(self, step: int, t: Optional[float] = None, *, state) -> None:
    """A checkpoint of `state`, ranked by its eval top-1 (segmentation: mIoU) where it was
    evaluated at this step."""
    del t
    s = self.setup
    meta = {'fingerprint': s.fingerprint, 'step': step, 'config_name': s.config.name,
            'train_time_sec': self.train_time(), 'eval': self.eval_metrics}
    key = evaluation.headline(self.eval_metrics or {})
    ranked = {key: self.eval_metrics[key]} if self.evaluated_at == step else None
    self.ckpts.save(step, state, meta, metrics=ranked)
  # pylint: enable=redefined-outer-name

  def train_time(self) -> float:
    """Seconds of training over every run that led here: each earlier one up to its last
    checkpoint, and this one."""
    return self.earlier_train_time + time.time() - self.progress.start_time


def _summary(s: _Setup, state, status: str, loop: _StepLoop, teacher_eval, start_time: float,
             writer: metrics.Writer) -> Dict[str, Any]:
  """The run's summary; a finished run writes it to `workdir/summary.json` and says so."""
  wall = time.time() - loop.progress.start_time
  summary = {'config_name': s.config.name, 'status': status, 'final_step': int(state.step),
             'total_steps': s.total_steps, 'eval': loop.eval_metrics,
             'teacher_eval': teacher_eval, 'train': loop.train_metrics,
             'wall_time_sec': wall, 'total_time_sec': time.time() - start_time,
             # Over every run that led here: each earlier run up to its last checkpoint.
             'train_time_sec': loop.earlier_train_time + wall,
             'params_sha256': params_sha256(state.params),
             # The whole state: step, params, batch_stats, opt_state and rng (exact resume).
             'state_sha256': params_sha256(state)}
  if status == 'finished':
    checkpoint.write_json(os.path.join(s.workdir, 'summary.json'), summary)
    if s.info.dense and s.config.get('plot_predictions', True):
      predictions.write(s.workdir, s.eval_batches, s.info.num_classes, s.task.student,
                        student_variables(state), s.task.teacher, s.teacher_vars,
                        lambda x: step.teacher_images(s.task, x))
    key = evaluation.headline(loop.eval_metrics or {})
    writer.console(f'done: step {summary["final_step"]}, eval {key} '
                   f'{(loop.eval_metrics or {}).get(key, float("nan")):.2f}, '
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
    task = task_lib.task_from_config(config, info.num_classes, steps_per_epoch,
                                     DTYPES[config.dtype], info.image_shape,
                                     num_train_examples=info.num_train,
                                     train_labels=train_labels, dense=info.dense)
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
                       title=f'{task_lib.teacher_title(config)} -> {config.student.name}, '
                       f'step {step_count}')
