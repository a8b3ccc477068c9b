"""Pure train/eval step builders, shared by the trainer and the benchmark.

One train step is one XLA program: frozen teacher forward (inference-mode batch norm), student
forward and backward (training batch norms over the global batch, or over groups of
`bn_group_size` examples: `layers.batch_norm_groups`), the feature distiller, the objective
`ce_weight * CE + kd_weight * KD(T) + feature_weight * feature_loss`, and the optimizer update.
The distiller gets the extra inputs its method declares (`distill.registry.INPUTS`: logits,
labels, example indices, embeddings, ...). A method with a pre-training stage
(`registry.Pretrain`, the CRD benchmark's `init_epochs`) trains first with a step of its own
(`make_pretrain_step`): only the method's loss, only the parts it names, its own optimizer
state (`opt_state` is then `(pretrain, main)`).
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
from afd_jax.state import TrainState, variables_of

Batch = Dict[str, jax.Array]
# Activation dtypes by their config names (`config.dtype`, `config.teacher.dtype`). 'float64'
# (with jax_enable_x64) makes the whole step float64, parameters and state included: a mode
# for checking numerics, not for speed.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}
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
  distiller_inputs: Tuple[str, ...] = ()  # extra inputs of the distiller (registry.INPUTS)
  steps_per_epoch: int = 1
  pretrain: Optional['PretrainTask'] = None
  # None: the state as the modules create it (float32); float64: every floating leaf of the
  # state, and the images, in that dtype (`cast_floats`).
  param_dtype: Optional[Any] = None

  @property
  def distils_features(self) -> bool:
    """Does the main step compute the distiller? Not at weight 0 (AB and FSP, which act in
    their own stage only)."""
    return self.distiller is not None and self.feature_weight != 0

  @property
  def needs_teacher(self) -> bool:
    return self.distils_features or self.kd_weight > 0

  @property
  def pretrain_steps(self) -> int:
    return self.pretrain.steps if self.pretrain is not None else 0

  @property
  def attention(self) -> bool:
    """Is the distiller's aux a `B x T x S` attention (`Method.attention` of `feature_name`)?"""
    registered = distill.registry.registered()
    return (self.distiller is not None and self.feature_name in registered
            and distill.registry.get(self.feature_name).attention)

  def needs(self, *inputs: str) -> bool:
    return any(i in self.distiller_inputs for i in inputs)


@dataclasses.dataclass(frozen=True)
class PretrainTask:
  """The method's own stage before the main training (`registry.Pretrain`): `steps` steps of
  `tx` on the parts in `trains`, minimising the distiller's `method`; `classifier` is the
  student classifier's module path, left out of 'student_body'."""
  steps: int
  tx: optax.GradientTransformation
  trains: Tuple[str, ...]
  method: str
  learning_rate: float
  classifier: Tuple[str, ...] = ()
  distiller_params: Tuple[str, ...] = ()  # the groups the stage trains; empty: all
  frozen_after: Tuple[str, ...] = ()  # the groups the main stage leaves unchanged


def is_distillation(config) -> bool:
  """A teacher is needed for a feature loss or for KD on logits."""
  return config.method != 'none' or config.loss.kd_weight > 0


def task_from_config(config, num_classes: int, steps_per_epoch: int, dtype=jnp.float32,
                     image_shape=None, num_train_examples: int = 0, train_labels=None) -> Task:
  """The Task a config describes (models, distiller, objective, optimizer and schedule).

  `config` needs attribute access only (an ml_collections ConfigDict, or namespaces in the
  benchmark, which runs without ml_collections). `image_shape` (H, W, C) is needed for models
  whose taps are found by tracing (`models.from_config`) and for a pre-training stage. The
  teacher computes in `config.teacher.dtype` where that is set ('float32' or 'bfloat16'), else
  in `dtype`; float64 (which needs jax_enable_x64) makes the whole state float64 too.
  `num_train_examples`: the training split's size, for methods that keep per-example state
  (0 where unknown); `train_labels`: its labels by index, for methods that declare
  `needs_train_labels` (None where unknown)."""
  distil = is_distillation(config)
  wide = dtype is not None and jnp.dtype(dtype) == jnp.dtype('float64')
  if wide and not jax.config.jax_enable_x64:
    raise ValueError("dtype float64 needs jax_enable_x64: jax.config.update('jax_enable_x64', "
                     'True), or build the task inside jax.enable_x64(True).')
  student = models.from_config(config.student, num_classes, dtype, image_shape)
  teacher_dtype = getattr(config.teacher, 'dtype', '')
  teacher_dtype = DTYPES[teacher_dtype] if teacher_dtype else dtype
  teacher = (models.from_config(config.teacher, num_classes, teacher_dtype, image_shape)
             if distil else None)
  distiller = distill.create(config.method, config, student.taps(),
                             teacher.taps() if teacher else (), num_classes=num_classes,
                             num_train_examples=num_train_examples,
                             steps_per_epoch=steps_per_epoch, train_labels=train_labels)
  method = distill.registry.get(config.method) if distiller is not None else None
  pretrain = None
  if method is not None and method.pretrain is not None:
    pretrain = pretrain_task(config, method.pretrain, student, steps_per_epoch, image_shape)
  schedule = optim.learning_rate_schedule(config.optimizer, steps_per_epoch, config.num_epochs)
  tx = optim.make_optimizer(config.optimizer, schedule)  # counts its own (main-stage) updates
  if pretrain is not None and pretrain.steps:  # the reported rate, by state.step
    main_schedule, offset = schedule, pretrain.steps
    schedule = lambda count: main_schedule(jnp.maximum(count - offset, 0))
  return Task(student=student, teacher=teacher, distiller=distiller, tx=tx, schedule=schedule,
              feature_name=config.method, ce_weight=config.loss.ce_weight,
              kd_weight=config.loss.kd_weight, kd_temperature=config.loss.kd_temperature,
              feature_weight=config.loss.feature_weight if distiller else 0.0,
              bn_group_size=getattr(config, 'bn_group_size', 0),
              distiller_inputs=method.inputs if method is not None else (),
              steps_per_epoch=steps_per_epoch, param_dtype=jnp.float64 if wide else None,
              pretrain=pretrain)  # kept at 0 steps too: the state's layout is the method's


def pretrain_task(config, spec: 'distill.registry.Pretrain', student, steps_per_epoch: int,
                  image_shape) -> PretrainTask:
  """The pre-training stage of `config` (`config.pretrain.*`, else `spec`'s defaults): SGD with
  momentum and coupled weight decay at a constant learning rate, as the CRD benchmark's
  `init()` (PyTorch's SGD: `g + wd * p` into the momentum buffer)."""
  def option(key):  # config.pretrain.<key>; negative or absent: the method's default
    value = distill.registry.option(config, 'pretrain', key, -1)
    return getattr(spec, key) if value is None or value < 0 else value

  epochs, lr = option('epochs'), option('learning_rate')
  tx = optax.chain(optax.add_decayed_weights(option('weight_decay')),
                   optax.sgd(lr, momentum=option('momentum') or None))
  classifier = ()
  if 'student_body' in spec.trains:
    if image_shape is None:
      raise ValueError('a pre-training stage of the student body needs image_shape.')
    abstract = jax.eval_shape(lambda: student.init(
        jax.random.PRNGKey(0), jnp.zeros((2,) + tuple(image_shape)), train=False))
    classifier = models.classifier_path(student, abstract, image_shape)
  return PretrainTask(steps=int(round(epochs * steps_per_epoch)), tx=tx, trains=spec.trains,
                      method=spec.method, learning_rate=float(lr), classifier=classifier,
                      distiller_params=tuple(spec.distiller_params),
                      frozen_after=tuple(spec.frozen_after))


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


def cast_floats(tree, dtype):
  """`tree` with every floating leaf in `dtype` (None: `tree` itself)."""
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def check_float64(task: Task, image_shape) -> None:
  """With `param_dtype` float64: a ValueError naming each model whose logits or taps come out
  narrower (a hard float32 cast in it), found by one abstract trace of each in inference mode."""
  if task.param_dtype is None:
    return
  images = jax.ShapeDtypeStruct((2,) + tuple(image_shape), task.param_dtype)
  for role, model in (('student', task.student), ('teacher', task.teacher)):
    if model is None:
      continue

    def forward(x, model=model):
      variables = cast_floats(model.init(jax.random.PRNGKey(0), x, train=False), task.param_dtype)
      return model.apply(variables, x, train=False)

    logits, features = jax.eval_shape(forward, images)
    narrow = sorted({str(a.dtype) for a in jax.tree.leaves((logits, features))
                     if a.dtype != task.param_dtype})
    if narrow:
      raise ValueError(f'dtype float64: the {role} model returns {"/".join(narrow)} logits or '
                       'taps (it casts them), so its step would not be float64; use dtype '
                       'float32 with it.')


def _forward(model, variables, images, train: bool, embedding: bool, **kwargs):
  """`model.apply` -> `(logits, features, embedding or None)` (and the state where mutable)."""
  if embedding:
    return models.apply_with_embedding(model, variables, images, train, **kwargs)
  result = model.apply(variables, images, train=train, **kwargs)
  if kwargs.get('mutable', False) is not False:
    (logits, features), state = result
    return (logits, features, None), state
  return result + (None,)


def distiller_inputs(task: Task, *, student_logits=None, teacher_logits=None,
                     student_embedding=None, teacher_embedding=None, batch=None,
                     step=None, rng=None) -> Dict[str, Any]:
  """The extra inputs of the distiller's call that its method declares (`task.distiller_inputs`)."""
  available = {
      'student_logits': lambda: student_logits, 'teacher_logits': lambda: teacher_logits,
      'student_embedding': lambda: student_embedding,
      'teacher_embedding': lambda: teacher_embedding,
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
    embed = task.needs('student_embedding', 'teacher_embedding')
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
    s_out = zeros(jax.eval_shape(lambda v: _forward(task.student, v, images, False, embed),
                                 student_vars))
    t_out = zeros(jax.eval_shape(lambda v: _forward(task.teacher, v, images, False, embed),
                                 teacher_abstract))
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    batch = {'label': jnp.zeros((2,), jnp.int32), 'index': jnp.arange(2, dtype=jnp.int32)}
    inputs = distiller_inputs(task, student_logits=s_out[0], teacher_logits=t_out[0],
                              student_embedding=s_out[2], teacher_embedding=t_out[2],
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
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                    opt_state=opt_state, rng=base_rng)


def _main_opt_state(task: Task, opt_state):
  return opt_state[1] if task.pretrain is not None else opt_state


def make_train_step(task: Task) -> Callable[[TrainState, Any, Batch], Tuple[TrainState, Metrics]]:
  """`train_step(state, teacher_variables, batch) -> (state, metrics)`; pure."""
  embed = task.needs('student_embedding', 'teacher_embedding')

  def train_step(state: TrainState, teacher_vars, batch: Batch):
    images, labels = cast_floats(batch['image'], task.param_dtype), batch['label']
    rng = jax.random.fold_in(state.rng, state.step)
    t_logits = t_feats = t_embedding = None
    if task.needs_teacher:
      t_logits, t_feats, t_embedding = jax.lax.stop_gradient(
          _forward(task.teacher, teacher_vars, images, False, embed))

    def loss_fn(params):
      with layers.batch_norm_groups(task.bn_group_size):
        (logits, s_feats, s_embedding), s_updates = _forward(
            task.student, variables_of('student', params, state.batch_stats),
            images, True, embed, mutable=['batch_stats'], rngs={'dropout': rng})
      terms = {'ce': cross_entropy(logits, labels)}
      if task.nan_at_step > 0:
        terms['ce'] = jnp.where(state.step + 1 == task.nan_at_step, jnp.nan, terms['ce'])
      loss = task.ce_weight * terms['ce']
      if task.kd_weight > 0:
        terms['kd'] = kd_loss(logits, t_logits, task.kd_temperature)
        loss += task.kd_weight * terms['kd']
      stats = {'student': s_updates['batch_stats'], 'distiller': state.batch_stats['distiller']}
      aux = None
      if task.distils_features:
        inputs = distiller_inputs(task, student_logits=logits, teacher_logits=t_logits,
                                  student_embedding=s_embedding, teacher_embedding=t_embedding,
                                  batch=batch, step=state.step, rng=jax.random.fold_in(rng, 1))
        with layers.batch_norm_groups(task.bn_group_size):
          (feature_loss, aux), d_updates = task.distiller.apply(
              variables_of('distiller', params, state.batch_stats),
              s_feats, t_feats, train=True, mutable=['batch_stats'], **inputs)
        stats['distiller'] = d_updates.get('batch_stats', {})
        terms[task.feature_name] = feature_loss
        loss += task.feature_weight * feature_loss
      return loss, (terms, stats, logits, aux)

    (loss, (terms, stats, logits, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    main_opt_state = _main_opt_state(task, state.opt_state)
    updates, main_opt_state = task.tx.update(grads, main_opt_state, state.params)
    if task.pretrain is not None and task.pretrain.frozen_after:  # as the stage left them
      updates = _zero_groups(updates, task.pretrain.frozen_after)
    params = optax.apply_updates(state.params, updates)
    opt_state = ((state.opt_state[0], main_opt_state) if task.pretrain is not None
                 else main_opt_state)
    metrics = {**terms, 'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'top1': jnp.mean(jnp.argmax(logits, -1) == labels),
               'learning_rate': task.schedule(state.step)}
    if task.attention and aux is not None:  # B x T x S: its batch mean is logged and plotted
      metrics['attention'] = jnp.mean(aux, axis=0)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def _zero_groups(updates, groups: Tuple[str, ...]):
  """`updates` with the distiller's parameter groups `groups` set to zero."""
  distiller = {k: jax.tree.map(jnp.zeros_like, v) if k in groups else v
               for k, v in updates['distiller'].items()}
  return {**updates, 'distiller': distiller}


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


def make_pretrain_step(task: Task) -> Callable[[TrainState, Any, Batch], Tuple[TrainState, Metrics]]:
  """`pretrain_step(state, teacher_variables, batch) -> (state, metrics)`: one step of the
  method's own stage. Its loss is the distiller's `PretrainTask.method`; only the parts in
  `trains` change (their gradients only reach the pre-training optimizer; the rest are
  frozen). The student runs in training mode (batch statistics updated) when its body trains,
  else in inference mode."""
  pre = task.pretrain
  embed = task.needs('student_embedding', 'teacher_embedding')
  train_student = 'student_body' in pre.trains

  def pretrain_step(state: TrainState, teacher_vars, batch: Batch):
    images = cast_floats(batch['image'], task.param_dtype)
    rng = jax.random.fold_in(state.rng, state.step)
    t_logits, t_feats, t_embedding = jax.lax.stop_gradient(
        _forward(task.teacher, teacher_vars, images, False, embed))

    def loss_fn(params):
      student_vars = variables_of('student', params, state.batch_stats)
      with layers.batch_norm_groups(task.bn_group_size):
        (logits, s_feats, s_embedding), s_updates = _forward(
            task.student, student_vars, images, train_student, embed, mutable=['batch_stats'],
            rngs={'dropout': rng})
        inputs = distiller_inputs(task, student_logits=logits, teacher_logits=t_logits,
                                  student_embedding=s_embedding, teacher_embedding=t_embedding,
                                  batch=batch, step=state.step, rng=jax.random.fold_in(rng, 1))
        (loss, _), d_updates = task.distiller.apply(
            variables_of('distiller', params, state.batch_stats),
            s_feats, t_feats, train=True, mutable=['batch_stats'], method=pre.method, **inputs)
      stats = {'student': s_updates['batch_stats'] if train_student else state.batch_stats['student'],
               'distiller': d_updates.get('batch_stats', {})}
      return loss, (stats, logits)

    (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    mask = _trainable_mask(task, grads)
    grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
    updates, pre_opt_state = pre.tx.update(grads, state.opt_state[0], state.params)
    updates = jax.tree.map(lambda u, m: u if m else jnp.zeros_like(u), updates, mask)
    params = optax.apply_updates(state.params, updates)
    metrics = {'pretrain': loss, 'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'top1': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
               'learning_rate': jnp.asarray(pre.learning_rate, jnp.float32)}
    return state.replace(step=state.step + 1, params=params, batch_stats=stats,
                         opt_state=(pre_opt_state, state.opt_state[1])), metrics

  return pretrain_step


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


def jit_pretrain_step(task: Task, mesh: Mesh):
  """The pre-training stage's step, compiled as `jit_train_step` is."""
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(make_pretrain_step(task), in_shardings=(rep, rep, data),
                 out_shardings=(rep, rep), donate_argnums=(0,))


def jit_eval_step(model: nn.Module, mesh: Mesh):
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(make_eval_step(model), in_shardings=(rep, data), out_shardings=rep)


def jit_init_state(task: Task, mesh: Mesh, image_shape, teacher_abstract=None):
  """`init(rng) -> TrainState`, created directly replicated on `mesh`."""
  return jax.jit(lambda rng: init_state(task, rng, image_shape, teacher_abstract),
                 out_shardings=sharding.replicated(mesh))
