"""Pure train/eval step builders, shared by the trainer and the benchmark.

One train step is one XLA program: frozen teacher forward (inference-mode batch norm), student
forward and backward (training batch norms over the global batch, or over groups of
`bn_group_size` examples: `layers.batch_norm_groups`), the feature distiller, the objective
`ce_weight * CE + kd_weight * KD(T) + feature_weight * feature_loss`, and the optimizer update.
Several teachers (`Task.teacher_weights`) are one `models.Ensemble`: KD over their stacked
logits (`distill.ensemble_kd_loss`), the distiller over the union of their taps.
The distiller gets the extra inputs its method declares (`distill.registry.INPUTS`: logits,
labels, example indices, embeddings, ...). A method with a pre-training stage
(`registry.Pretrain`, the CRD benchmark's `init_epochs`) trains first with a step of its own
(`make_pretrain_step`): only the method's loss, only the parts it names, its own optimizer
state (`opt_state` is then `(pretrain, main)`).
"""
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from afd_jax import dense_metrics, layers, models, sharding
from afd_jax.distill import cross_entropy, ensemble_kd_loss, kd_loss, soft_cross_entropy
from afd_jax.distill.dense import pixel_cross_entropy, pixel_kd_loss, pixel_nll
from afd_jax.pixels import IGNORE_INDEX
from afd_jax.mixing import mix_batch
from afd_jax.state import TrainState, variables_of
from afd_jax.task import Task, cast_floats

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]
Step = Callable[[TrainState, Any, Batch], Tuple[TrainState, Metrics]]


def _wants(task: Task, role: str) -> Tuple[str, ...]:
  """What the distiller needs of `role`'s forward pass beyond logits and taps."""
  wants = ('embedding',) if task.needs('student_embedding', 'teacher_embedding') else ()
  if role == 'student' and task.needs('student_dist_logits'):
    wants += ('dist_logits',)
  return wants


def _forward(model, variables, images, train: bool, wants: Tuple[str, ...], **kwargs):
  """`model.apply` -> `(logits, features, extra)` (and the state where mutable); `extra` holds
  what `wants` names: 'embedding' (the classifier's input), 'dist_logits' (a DeiT's second
  head)."""
  mutable = kwargs.get('mutable', False) is not False
  embedding = 'embedding' in wants
  dist_logits = None
  if 'dist_logits' in wants:
    result, dist_logits = models.apply_with_dist_logits(model, variables, images, train,
                                                        embedding=embedding, **kwargs)
  elif embedding:
    result = models.apply_with_embedding(model, variables, images, train, **kwargs)
  else:
    result = model.apply(variables, images, train=train, **kwargs)
  out, state = result if mutable else (result, None)
  extra = {'embedding': out[2]} if embedding else {}
  if dist_logits is not None:
    extra['dist_logits'] = dist_logits
  out = (out[0], out[1], extra)
  return (out, state) if mutable else out


def distiller_inputs(task: Task, *, student_logits=None, teacher_logits=None,
                     student_extra=None, teacher_extra=None, batch=None,
                     step=None, rng=None) -> Dict[str, Any]:
  """The extra inputs of the distiller's call that its method declares (`task.distiller_inputs`);
  `*_extra` are `_forward`'s."""
  available = {
      'student_logits': lambda: student_logits, 'teacher_logits': lambda: teacher_logits,
      'student_embedding': lambda: student_extra['embedding'],
      'teacher_embedding': lambda: teacher_extra['embedding'],
      'student_dist_logits': lambda: student_extra['dist_logits'],
      'labels': lambda: batch['label'], 'index': lambda: batch['index'],
      'epoch': lambda: (jnp.maximum(step - task.pretrain_steps, 0) // task.steps_per_epoch
                        + 1).astype(jnp.int32),
      'rng': lambda: rng,
  }
  return {name: available[name]() for name in task.distiller_inputs}


def init_state(task: Task, rng: jax.Array, image_shape, teacher_abstract=None) -> TrainState:
  """A fresh state (call under `jit`, or `jax.eval_shape` for the abstract one)."""
  student_rng, distiller_rng, base_rng = jax.random.split(rng, 3)
  images = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
  student_vars = task.student.init(student_rng, images, train=False)
  params = {'student': student_vars['params'], 'distiller': {}}
  stats = {'student': student_vars.get('batch_stats', {}), 'distiller': {}}
  if task.distiller is not None:
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    s_out = zeros(jax.eval_shape(
        lambda v: _forward(task.student, v, images, False, _wants(task, 'student')),
        student_vars))
    t_out = zeros(jax.eval_shape(
        lambda v: _forward(task.teacher, v, images, False, _wants(task, 'teacher')),
        teacher_abstract))
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    batch = {'label': jnp.zeros((2,), jnp.int32), 'index': jnp.arange(2, dtype=jnp.int32)}
    inputs = distiller_inputs(task, student_logits=s_out[0], teacher_logits=t_out[0],
                              student_extra=s_out[2], teacher_extra=t_out[2],
                              batch=batch, step=jnp.zeros((), jnp.int32),
                              rng=jax.random.PRNGKey(0))
    distiller_vars = task.distiller.init(distiller_rng, f32(s_out[1]), f32(t_out[1]),
                                         train=False, **inputs)
    params['distiller'] = distiller_vars.get('params', {})
    stats['distiller'] = distiller_vars.get('batch_stats', {})
    if task.pretrain is not None:
      named = task.pretrain.distiller_params + task.pretrain.frozen_after
      unknown = sorted(set(g for g in named if g not in params['distiller']))
      if unknown:
        raise ValueError(f'the pre-training stage names distiller parameter groups {unknown}; '
                         f'the distiller has {sorted(params["distiller"])}.')
  params, stats = cast_floats((params, stats), task.param_dtype)
  opt_state = task.tx.init(params)
  if task.pretrain is not None:
    opt_state = (task.pretrain.tx.init(params), opt_state)
  ema = variables_of('student', params, stats) if task.ema_decay > 0 else {}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                    opt_state=opt_state, rng=base_rng, ema=ema)


def teacher_images(task: Task, images: jax.Array) -> jax.Array:
  """The student's normalised images as the teacher expects them (`Task.teacher_input`)."""
  if task.teacher_input is None:
    return images
  scale, shift = (jnp.asarray(v, images.dtype) for v in task.teacher_input)
  return images * scale + shift


def _teacher_forward(task: Task, teacher_vars, images: jax.Array):
  """The frozen teacher's `(logits, features, extra)` on the student's `images`: inference-mode
  batch norm, no gradient."""
  return jax.lax.stop_gradient(_forward(task.teacher, teacher_vars, teacher_images(task, images),
                                        False, _wants(task, 'teacher')))


def _student_and_distiller(task: Task, params, batch_stats, teacher, images: jax.Array,
                           batch: Batch, step: jax.Array, rng: jax.Array, *,
                           student_train: bool = True, method=None):
  """A step's differentiated forward: the student (training batch norms where `student_train`,
  dropout keyed by `rng`), then, where the step distils (`method` given, or
  `task.distils_features`), the distiller's `method` (`__call__` by default) on both models'
  outputs (`teacher`: `_teacher_forward`'s, or None). -> `(logits, the distiller's (loss, aux)
  or None, batch_stats)`."""
  t_logits, t_feats, t_extra = (None, None, None) if teacher is None else teacher
  with layers.batch_norm_groups(task.bn_group_size):
    (logits, s_feats, s_extra), s_updates = _forward(
        task.student, variables_of('student', params, batch_stats), images, student_train,
        _wants(task, 'student'), mutable=['batch_stats'], rngs={'dropout': rng})
  stats = {'student': s_updates['batch_stats'] if student_train else batch_stats['student'],
           'distiller': batch_stats['distiller']}
  if method is None and not task.distils_features:
    return logits, None, stats
  inputs = distiller_inputs(task, student_logits=logits, teacher_logits=t_logits,
                            student_extra=s_extra, teacher_extra=t_extra, batch=batch,
                            step=step, rng=jax.random.fold_in(rng, 1))
  with layers.batch_norm_groups(task.bn_group_size):
    distilled, d_updates = task.distiller.apply(
        variables_of('distiller', params, batch_stats), s_feats, t_feats, train=True,
        mutable=['batch_stats'], method=method, **inputs)
  stats['distiller'] = d_updates.get('batch_stats', {})
  return logits, distilled, stats


def _step_metrics(terms: Metrics, loss, grads, logits, labels, learning_rate) -> Metrics:
  """What every step logs: its loss terms, their total, the gradient norm, the rate, and top-1
  (per-pixel logits: 'pixel_accuracy', ignored pixels left out)."""
  correct = jnp.argmax(logits, -1) == labels
  if logits.ndim == 4:
    counted = labels != IGNORE_INDEX
    accuracy = {'pixel_accuracy': jnp.sum(correct & counted) / jnp.maximum(jnp.sum(counted), 1)}
  else:
    accuracy = {'top1': jnp.mean(correct)}
  return {**terms, 'loss': loss, 'grad_norm': optax.tree.norm(grads), **accuracy,
          'learning_rate': learning_rate}


def _main_loss(task: Task, step: jax.Array, logits, labels, targets, teacher, distilled):
  """`(loss, terms)`: `ce_weight * CE + kd_weight * KD(T) + feature_weight * feature_loss`,
  CE against the soft `targets` where the batch has them."""
  if task.dense:  # per pixel, ignored pixels left out of CE
    terms = {'ce': pixel_cross_entropy(logits, labels)}
  else:
    terms = {'ce': cross_entropy(logits, labels) if targets is None
             else soft_cross_entropy(logits, targets)}
  if task.nan_at_step > 0:
    terms['ce'] = jnp.where(step + 1 == task.nan_at_step, jnp.nan, terms['ce'])
  loss = task.ce_weight * terms['ce']
  if task.kd_weight > 0:
    terms['kd'] = _kd(task, logits, teacher[0])
    loss += task.kd_weight * terms['kd']
  if distilled is not None:
    terms[task.feature_name] = distilled[0]
    loss += task.feature_weight * distilled[0]
  return loss, terms


def _kd(task: Task, logits, teacher_logits):
  """KD on logits: per pixel for segmentation, over the teachers where there are several."""
  if task.dense:
    return pixel_kd_loss(logits, teacher_logits, task.kd_temperature)
  if task.teacher_weights:
    return ensemble_kd_loss(logits, teacher_logits, task.teacher_weights, task.kd_temperature,
                            task.kd_over_teachers)
  return kd_loss(logits, teacher_logits, task.kd_temperature)


def _zero_groups(updates, groups: Tuple[str, ...]):
  """`updates` with the distiller's parameter groups `groups` set to zero."""
  distiller = {k: jax.tree.map(jnp.zeros_like, v) if k in groups else v
               for k, v in updates['distiller'].items()}
  return {**updates, 'distiller': distiller}


def _main_update(task: Task, state: TrainState, grads):
  """`(params, opt_state)` after the main optimizer's update (the pre-training stage's
  `frozen_after` groups kept as the stage left them)."""
  main_opt_state = state.opt_state[1] if task.pretrain is not None else state.opt_state
  updates, main_opt_state = task.tx.update(grads, main_opt_state, state.params)
  if task.pretrain is not None and task.pretrain.frozen_after:
    updates = _zero_groups(updates, task.pretrain.frozen_after)
  params = optax.apply_updates(state.params, updates)
  opt_state = ((state.opt_state[0], main_opt_state) if task.pretrain is not None
               else main_opt_state)
  return params, opt_state


def moving_average(task: Task, ema, params, batch_stats):
  """timm's ModelEmaV2 on the student's variables: `decay * ema + (1 - decay) * new`, batch
  statistics included; `ema` as it is where the run keeps none."""
  if task.ema_decay <= 0:
    return ema
  new = variables_of('student', params, batch_stats)
  return optax.incremental_update(new, ema, step_size=1.0 - task.ema_decay)


def make_train_step(task: Task) -> Step:
  """`train_step(state, teacher_variables, batch) -> (state, metrics)`; pure."""

  def train_step(state: TrainState, teacher_vars, batch: Batch):
    images, labels = cast_floats(batch['image'], task.param_dtype), batch['label']
    rng = jax.random.fold_in(state.rng, state.step)
    targets = None
    if task.mixing.soft_targets:  # the teacher sees the mixed images too
      images, targets = mix_batch(images, labels, jax.random.fold_in(rng, 2), task.mixing,
                                  task.num_classes)
    teacher = _teacher_forward(task, teacher_vars, images) if task.needs_teacher else None

    def loss_fn(params):
      logits, distilled, stats = _student_and_distiller(
          task, params, state.batch_stats, teacher, images, batch, state.step, rng)
      loss, terms = _main_loss(task, state.step, logits, labels, targets, teacher, distilled)
      return loss, (terms, stats, logits, None if distilled is None else distilled[1])

    (loss, (terms, stats, logits, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    params, opt_state = _main_update(task, state, grads)
    metrics = _step_metrics(terms, loss, grads, logits, labels, task.schedule(state.step))
    if task.attention and aux is not None:  # B x T x S: its batch mean is logged and plotted
      metrics['attention'] = jnp.mean(aux, axis=0)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt_state,
                              ema=moving_average(task, state.ema, params, stats))
    return new_state, metrics

  return train_step


def _trainable_mask(task: Task, params) -> Dict[str, Any]:
  """True for the parameters the pre-training stage updates (`PretrainTask.trains`, and of
  the distiller's, `distiller_params` where given)."""
  trains, only = task.pretrain.trains, task.pretrain.distiller_params
  distiller = {k: jax.tree.map(lambda _, k=k: 'distiller' in trains and (not only or k in only), v)
               for k, v in params['distiller'].items()}
  student = jax.tree.map(lambda _: 'student_body' in trains, params['student'])
  if 'student_body' in trains and task.pretrain.classifier:
    node = student
    for key in task.pretrain.classifier[:-1]:
      node = node[key]
    node[task.pretrain.classifier[-1]] = jax.tree.map(
        lambda _: False, node[task.pretrain.classifier[-1]])
  return {'student': student, 'distiller': distiller}


def make_pretrain_step(task: Task) -> Step:
  """`pretrain_step(state, teacher_variables, batch) -> (state, metrics)`: one step of the
  method's own stage. Its loss is the distiller's `PretrainTask.method`; only the parts in
  `trains` change (their gradients only reach the pre-training optimizer; the rest are
  frozen). The student runs in training mode (batch statistics updated) when its body trains,
  else in inference mode."""
  pre = task.pretrain
  train_student = 'student_body' in pre.trains

  def pretrain_step(state: TrainState, teacher_vars, batch: Batch):
    images = cast_floats(batch['image'], task.param_dtype)
    rng = jax.random.fold_in(state.rng, state.step)
    teacher = _teacher_forward(task, teacher_vars, images)

    def loss_fn(params):
      logits, (loss, _), stats = _student_and_distiller(
          task, params, state.batch_stats, teacher, images, batch, state.step, rng,
          student_train=train_student, method=pre.method)
      return loss, (stats, logits)

    (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    mask = _trainable_mask(task, grads)
    grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
    updates, pre_opt_state = pre.tx.update(grads, state.opt_state[0], state.params)
    updates = jax.tree.map(lambda u, m: u if m else jnp.zeros_like(u), updates, mask)
    params = optax.apply_updates(state.params, updates)
    metrics = _step_metrics({'pretrain': loss}, loss, grads, logits, batch['label'],
                            jnp.asarray(pre.learning_rate, jnp.float32))
    return state.replace(step=state.step + 1, params=params, batch_stats=stats,
                         opt_state=(pre_opt_state, state.opt_state[1])), metrics

  return pretrain_step


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], Metrics]:
  """`eval_step(variables, batch) -> sums` of correct top-1/top-5, loss and count, over the
  examples whose `mask` is 1 (padding is masked out, so any batch size gives exact accuracy).
  A model with per-pixel logits sums a confusion matrix, the pixels' CE and their count
  instead (`dense_sums`)."""

  def eval_step(variables, batch: Batch) -> Metrics:
    logits, _ = model.apply(variables, batch['image'], train=False)
    if logits.ndim == 4:
      return dense_sums(logits, batch['label'], batch['mask'])
    labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
    k = min(5, logits.shape[-1])
    top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return {'correct1': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            'correct5': jnp.sum(top5 * mask), 'loss_sum': jnp.sum(nll * mask),
            'count': jnp.sum(mask)}

  return eval_step


def dense_sums(logits, labels, mask) -> Metrics:
  """Segmentation's eval sums over the examples whose `mask` is 1: the confusion matrix
  (`dense_metrics.confusion_matrix`), the CE summed over counted pixels, their count, the
  examples' count."""
  nll, counted = pixel_nll(logits, labels)
  counted &= mask.reshape(-1, 1, 1) > 0
  return {'confusion': dense_metrics.confusion_matrix(jnp.argmax(logits, -1), labels,
                                                      logits.shape[-1], mask=mask),
          'loss_sum': jnp.sum(jnp.where(counted, nll, 0.0)),
          'pixels': jnp.sum(counted.astype(jnp.int32)), 'count': jnp.sum(mask)}


def jit_step(make: Callable[[Task], Step], task: Task, mesh: Mesh, teacher_sharding=None,
             state_sharding=None):
  """`make(task)`'s step compiled for `mesh`: batch split on `data`, state donated. The state is
  replicated, or placed as `state_sharding` says (`config.student.shard`: `sharding.fsdp`);
  teacher variables are never donated and replicated, or placed as `teacher_sharding` says
  (`config.teacher.shard`). The metrics are replicated."""
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  teacher = rep if teacher_sharding is None else teacher_sharding
  state = rep if state_sharding is None else state_sharding
  return jax.jit(make(task), in_shardings=(state, teacher, data), out_shardings=(state, rep),
                 donate_argnums=(0,))


def jit_train_step(task: Task, mesh: Mesh, teacher_sharding=None, state_sharding=None):
  return jit_step(make_train_step, task, mesh, teacher_sharding, state_sharding)


def jit_pretrain_step(task: Task, mesh: Mesh, teacher_sharding=None, state_sharding=None):
  return jit_step(make_pretrain_step, task, mesh, teacher_sharding, state_sharding)


def jit_eval_step(model: nn.Module, mesh: Mesh, variables_sharding=None):
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  variables = rep if variables_sharding is None else variables_sharding
  return jax.jit(make_eval_step(model), in_shardings=(variables, data), out_shardings=rep)


def abstract_state(task: Task, image_shape, teacher_abstract=None):
  """The TrainState's shapes and dtypes, computed without running anything."""
  return jax.eval_shape(lambda rng: init_state(task, rng, image_shape, teacher_abstract),
                        jax.random.PRNGKey(0))


def jit_init_state(task: Task, mesh: Mesh, image_shape, teacher_abstract=None,
                   state_sharding=None):
  """`init(rng) -> TrainState`, created directly on `mesh`: replicated, or placed as
  `state_sharding` says."""
  return jax.jit(lambda rng: init_state(task, rng, image_shape, teacher_abstract),
                 out_shardings=sharding.replicated(mesh) if state_sharding is None
                 else state_sharding)
