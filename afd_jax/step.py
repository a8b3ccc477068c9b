"""Pure train/eval step builders, shared by the trainer and the benchmark.

One train step is one XLA program: frozen teacher forward (inference-mode batch norm), student
forward and backward (training batch norms over the global batch, or over groups of
`bn_group_size` examples: `layers.batch_norm_groups`), the feature distiller, the objective
`ce_weight * CE + kd_weight * KD(T) + feature_weight * feature_loss`, and the optimizer update.
"""
import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from afd_jax import distill, layers, models, optim, sharding
from afd_jax.distill import cross_entropy, kd_loss
from afd_jax.state import TrainState

Batch = Dict[str, jax.Array]
# Activation dtypes by their config names (`config.dtype`, `config.teacher.dtype`).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
Metrics = Dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything static about a training run's step.

  `teacher` and `distiller` are None when training a model alone; `feature_name` names the
  feature-loss metric (e.g. 'afd').
  """
  student: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  teacher: Optional[nn.Module] = None
  distiller: Optional[nn.Module] = None
  feature_name: str = 'feature'
  ce_weight: float = 1.0
  kd_weight: float = 0.0
  kd_temperature: float = 4.0
  feature_weight: float = 0.0
  bn_group_size: int = 0  # training batch norms of student and distiller: 0 = global batch
  nan_at_step: int = -1  # Fault injection (tests of the divergence guard): CE is NaN at this step.

  @property
  def needs_teacher(self) -> bool:
    return self.distiller is not None or self.kd_weight > 0


def is_distillation(config) -> bool:
  """A teacher is needed for a feature loss or for KD on logits."""
  return config.method != 'none' or config.loss.kd_weight > 0


def task_from_config(config, num_classes: int, steps_per_epoch: int, dtype=jnp.float32,
                     image_shape=None) -> Task:
  """The Task a config describes (models, distiller, objective, optimizer and schedule).

  `config` needs attribute access only (an ml_collections ConfigDict, or namespaces in the
  benchmark, which runs without ml_collections). `image_shape` (H, W, C) is needed for models
  whose taps are found by tracing (`models.from_config`). The teacher computes in
  `config.teacher.dtype` where that is set ('float32' or 'bfloat16'), else in `dtype`."""
  distil = is_distillation(config)
  student = models.from_config(config.student, num_classes, dtype, image_shape)
  teacher_dtype = getattr(config.teacher, 'dtype', '')
  teacher_dtype = DTYPES[teacher_dtype] if teacher_dtype else dtype
  teacher = (models.from_config(config.teacher, num_classes, teacher_dtype, image_shape)
             if distil else None)
  distiller = distill.create(config.method, config, student.taps(),
                             teacher.taps() if teacher else ())
  schedule = optim.learning_rate_schedule(config.optimizer, steps_per_epoch, config.num_epochs)
  return Task(student=student, teacher=teacher, distiller=distiller,
              tx=optim.make_optimizer(config.optimizer, schedule), schedule=schedule,
              feature_name=config.method, ce_weight=config.loss.ce_weight,
              kd_weight=config.loss.kd_weight, kd_temperature=config.loss.kd_temperature,
              feature_weight=config.loss.feature_weight if distiller else 0.0,
              bn_group_size=getattr(config, 'bn_group_size', 0))


def check_batch_norm_groups(task: Task, image_shape) -> None:
  """With `bn_group_size` > 0, a ValueError if the student normalises with flax's own
  `nn.BatchNorm`, which the grouping does not reach (it would silently stay global). Found by
  one abstract trace of the student in training mode; afd_jax's models use `layers.BatchNorm`."""
  if not task.bn_group_size:
    return
  found = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      found.append('/'.join(context.module.path) or type(context.module).__name__)
    return next_fun(*args, **kwargs)

  def forward(images):
    variables = task.student.init(jax.random.PRNGKey(0), images, train=False)
    return task.student.apply(variables, images, train=True, mutable=True)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(forward, jax.ShapeDtypeStruct((2,) + tuple(image_shape), jnp.float32))
  if found:
    raise ValueError(
        f'bn_group_size={task.bn_group_size} applies to afd_jax.layers.BatchNorm, but the student '
        f'normalises with flax.linen.BatchNorm at {", ".join(sorted(set(found))[:3])}; use '
        f'afd_jax.layers.BatchNorm in the model, or bn_group_size=0.')


def init_state(task: Task, rng: jax.Array, image_shape, teacher_abstract=None) -> TrainState:
  """A fresh state (call under `jit`, or `jax.eval_shape` for the abstract one)."""
  student_rng, distiller_rng, base_rng = jax.random.split(rng, 3)
  images = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
  student_vars = task.student.init(student_rng, images, train=False)
  params = {'student': student_vars['params'], 'distiller': {}}
  stats = {'student': student_vars.get('batch_stats', {}), 'distiller': {}}
  if task.distiller is not None:
    zeros = lambda shapes: [jnp.zeros(s.shape, jnp.float32) for s in shapes]
    _, s_feats = jax.eval_shape(lambda v: task.student.apply(v, images, train=False), student_vars)
    _, t_feats = jax.eval_shape(lambda v: task.teacher.apply(v, images, train=False),
                                teacher_abstract)
    distiller_vars = task.distiller.init(distiller_rng, zeros(s_feats), zeros(t_feats), train=False)
    params['distiller'] = distiller_vars.get('params', {})
    stats['distiller'] = distiller_vars.get('batch_stats', {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                    opt_state=task.tx.init(params), rng=base_rng)


def make_train_step(task: Task) -> Callable[[TrainState, Any, Batch], Tuple[TrainState, Metrics]]:
  """`train_step(state, teacher_variables, batch) -> (state, metrics)`; pure."""

  def train_step(state: TrainState, teacher_vars, batch: Batch):
    images, labels = batch['image'], batch['label']
    rng = jax.random.fold_in(state.rng, state.step)
    t_logits = t_feats = None
    if task.needs_teacher:
      t_logits, t_feats = jax.lax.stop_gradient(task.teacher.apply(teacher_vars, images, train=False))

    def loss_fn(params):
      with layers.batch_norm_groups(task.bn_group_size):
        (logits, s_feats), s_updates = task.student.apply(
            {'params': params['student'], 'batch_stats': state.batch_stats['student']}, images,
            train=True, mutable=['batch_stats'], rngs={'dropout': rng})
      terms = {'ce': cross_entropy(logits, labels)}
      if task.nan_at_step > 0:
        terms['ce'] = jnp.where(state.step + 1 == task.nan_at_step, jnp.nan, terms['ce'])
      loss = task.ce_weight * terms['ce']
      if task.kd_weight > 0:
        terms['kd'] = kd_loss(logits, t_logits, task.kd_temperature)
        loss += task.kd_weight * terms['kd']
      stats = {'student': s_updates['batch_stats'], 'distiller': state.batch_stats['distiller']}
      aux = None
      if task.distiller is not None:
        with layers.batch_norm_groups(task.bn_group_size):
          (feature_loss, aux), d_updates = task.distiller.apply(
              {'params': params['distiller'], 'batch_stats': state.batch_stats['distiller']},
              s_feats, t_feats, train=True, mutable=['batch_stats'])
        stats['distiller'] = d_updates.get('batch_stats', {})
        terms[task.feature_name] = feature_loss
        loss += task.feature_weight * feature_loss
      return loss, (terms, stats, logits, aux)

    (loss, (terms, stats, logits, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = task.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**terms, 'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'top1': jnp.mean(jnp.argmax(logits, -1) == labels),
               'learning_rate': task.schedule(state.step)}
    if isinstance(aux, jax.Array) and aux.ndim == 3:  # AFD: B x T x S attention
      metrics['attention'] = jnp.mean(aux, axis=0)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], Metrics]:
  """`eval_step(variables, batch) -> sums` of correct top-1/top-5, loss and count, over the
  examples whose `mask` is 1 (padding is masked out, so any batch size gives exact accuracy)."""

  def eval_step(variables, batch: Batch) -> Metrics:
    logits, _ = model.apply(variables, batch['image'], train=False)
    labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
    k = min(5, logits.shape[-1])
    top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return {'correct1': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            'correct5': jnp.sum(top5 * mask), 'loss_sum': jnp.sum(nll * mask),
            'count': jnp.sum(mask)}

  return eval_step


def jit_train_step(task: Task, mesh: Mesh):
  """The train step compiled for `mesh`: batch split on `data`, state replicated and donated.

  Teacher variables are replicated and never donated."""
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(make_train_step(task), in_shardings=(rep, rep, data),
                 out_shardings=(rep, rep), donate_argnums=(0,))


def jit_eval_step(model: nn.Module, mesh: Mesh):
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(make_eval_step(model), in_shardings=(rep, data), out_shardings=rep)


def jit_init_state(task: Task, mesh: Mesh, image_shape, teacher_abstract=None):
  """`init(rng) -> TrainState`, created directly replicated on `mesh`."""
  return jax.jit(lambda rng: init_state(task, rng, image_shape, teacher_abstract),
                 out_shardings=sharding.replicated(mesh))
