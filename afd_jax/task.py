"""What a training run's step is, from its config: models, distiller, objective, optimizer.

`task_from_config(config, ...)` reads the config once into a static `Task`; the step builders
(`afd_jax/step.py`) and the benchmark take a Task and never read the config. The checks here
trace the models abstractly (`check_batch_norm_groups`, `check_float64`) so that a run refuses
before anything is compiled.
"""
import dataclasses
import types
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from afd_jax import distill, models, optim
from afd_jax.mixing import Mixing

# Activation dtypes by their config names (`config.dtype`, `config.teacher.dtype`). 'float64'
# (with jax_enable_x64) makes the whole step float64, parameters and state included: a mode
# for checking numerics, not for speed.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}


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
  # The ViT recipe's parts (all off by default): mixup/cutmix and label smoothing of the
  # targets; the teacher's input as `images * scale + shift` per channel (its own statistics,
  # `teacher_input`); an exponential moving average of the student's parameters.
  mixing: Mixing = Mixing()
  teacher_input: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
  ema_decay: float = 0.0
  num_classes: int = 0  # of the logits (for the soft targets of mixing and label smoothing)
  # Several teachers (`config.teachers`): `teacher` is a `models.Ensemble` (K x B x C logits,
  # each member re-normalising its own input), these are their KD weights, and
  # `kd_over_teachers` how KD combines them (`distill.ensemble_kd_loss`). Empty: one teacher.
  teacher_weights: Tuple[float, ...] = ()
  kd_over_teachers: str = 'average'
  # Segmentation: the models return B x H x W x K logits and the labels are B x H x W masks
  # (IGNORE_INDEX where a pixel counts nowhere); CE and KD are per pixel (`distill.dense`).
  dense: bool = False

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
                     image_shape=None, num_train_examples: int = 0, train_labels=None,
                     dense: bool = False) -> Task:
  """The Task a config describes (models, distiller, objective, optimizer and schedule).

  `config` needs attribute access only (an ml_collections ConfigDict, or namespaces in the
  benchmark, which runs without ml_collections). `image_shape` (H, W, C) is needed for models
  whose taps are found by tracing (`models.from_config`) and for a pre-training stage. The
  teacher computes in `config.teacher.dtype` where that is set ('float32' or 'bfloat16'), else
  in `dtype`; float64 (which needs jax_enable_x64) makes the whole state float64 too.
  `num_train_examples`: the training split's size, for methods that keep per-example state
  (0 where unknown); `train_labels`: its labels by index, for methods that declare
  `needs_train_labels` (None where unknown); `dense`: the data is segmentation masks."""
  distil = is_distillation(config)
  wide = dtype is not None and jnp.dtype(dtype) == jnp.dtype('float64')
  if wide and not jax.config.jax_enable_x64:
    raise ValueError("dtype float64 needs jax_enable_x64: jax.config.update('jax_enable_x64', "
                     'True), or build the task inside jax.enable_x64(True).')
  check_task(config, dense)
  student = models.from_config(config.student, num_classes, dtype, image_shape)
  check_distillation_token(config, student)
  several = bool(getattr(config, 'teachers', ()))  # config.teachers: a models.Ensemble
  if distil and several:
    check_several_teachers(config)
  teacher = build_teacher(config, num_classes, dtype, image_shape) if distil else None
  distiller = distill.create(config.method, config, student.taps(),
                             teacher.taps() if teacher else (), num_classes=num_classes,
                             num_train_examples=num_train_examples,
                             steps_per_epoch=steps_per_epoch, train_labels=train_labels)
  method = distill.registry.get(config.method) if distiller is not None else None
  pretrain = None
  if method is not None and method.pretrain is not None:
    pretrain = pretrain_task(config, method.pretrain, student, steps_per_epoch, image_shape)
  schedule = optim.learning_rate_schedule(config.optimizer, steps_per_epoch, config.num_epochs,
                                          batch_size=config.batch_size)
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
              pretrain=pretrain,  # kept at 0 steps too: the state's layout is the method's
              mixing=Mixing.from_config(config),
              teacher_input=None if several else teacher_input(config),
              ema_decay=float(getattr(config, 'ema_decay', 0.0)), num_classes=num_classes,
              teacher_weights=tuple(float(getattr(section, 'weight', 1.0))
                                    for _, section in teacher_sections(config)) if several
              else (),
              kd_over_teachers=getattr(config.loss, 'kd_over_teachers', 'average'),
              dense=dense)


def check_task(config, dense: bool) -> None:
  """ValueError, in one line, where the models or the method do not fit the data: segmentation
  masks need models with a segmentation head (`head`), class labels models without one, and
  the method must distil that task (`Method.applies_to`)."""
  task = 'segmentation' if dense else 'classification'
  sections = [('student', config.student)]
  if is_distillation(config):
    sections += [(f'teacher {label}'.strip(), s) for label, s in teacher_sections(config)]
  for role, section in sections:
    head = getattr(section, 'head', '') or ''
    if dense and not head:
      raise ValueError(f'the data are segmentation masks: the {role} ({section.name}) needs a '
                       f"segmentation head, e.g. --config.{role.split()[0]}.head=fpn (CNNs) or "
                       'progressive (ViTs).')
    if not dense and head:
      raise ValueError(f'the {role} has head={head!r} (per-pixel logits), but the data are '
                       "class labels; set its head to '' or use a segmentation dataset.")
  if dense and getattr(config, 'teachers', ()) and is_distillation(config):
    raise ValueError('several teachers (config.teachers) distil classification only; use one '
                     'config.teacher for segmentation.')
  if dense and Mixing.from_config(config).soft_targets:
    raise ValueError('mixup, cutmix and label smoothing act on class labels; turn them off for '
                     'segmentation.')
  if config.method != 'none' and is_distillation(config):
    method = distill.registry.get(config.method)
    if task not in method.applies_to:
      fits = ', '.join(distill.registry.for_task(task))
      raise ValueError(f'method {config.method!r} distils {" and ".join(method.applies_to)} '
                       f'only, and the data are {"segmentation masks" if dense else "class labels"}'
                       f'; methods for {task}: {fits}.')


def teacher_sections(config) -> Tuple[Tuple[str, Any], ...]:
  """`(label, section)` of every teacher: the entries of `config.teachers` where that list is
  set (label: the entry's `label`, else its `name`), else `config.teacher` (label '')."""
  entries = tuple(getattr(config, 'teachers', ()) or ())
  if not entries:
    return (('', config.teacher),)
  sections = tuple(types.SimpleNamespace(**e) if isinstance(e, dict) else e for e in entries)
  return tuple((getattr(s, 'label', '') or s.name, s) for s in sections)


def teacher_title(config) -> str:
  """The teacher's name in logs and plot titles: its name, or the teachers' labels joined."""
  return '+'.join(label or section.name for label, section in teacher_sections(config))


def build_teacher(config, num_classes: int, dtype, image_shape):
  """`config.teacher`'s model, or with `config.teachers` a `models.Ensemble` of theirs, each
  in its own dtype and re-normalising its own input (`teacher_input`)."""
  def model(section):
    own = getattr(section, 'dtype', '')
    return models.from_config(section, num_classes, DTYPES[own] if own else dtype, image_shape)

  if not getattr(config, 'teachers', ()):
    return model(config.teacher)
  sections = teacher_sections(config)
  return models.Ensemble(tuple(model(s) for _, s in sections),
                         tuple(label for label, _ in sections),
                         tuple(teacher_input(config, s) for _, s in sections))


def check_several_teachers(config) -> None:
  """ValueError, in one line, where several teachers cannot be distilled as configured: a
  method that pairs one teacher with the student, weights that are not positive, KD's
  combination unknown."""
  sections = teacher_sections(config)
  labels = ', '.join(label for label, _ in sections)
  if config.method != 'none' and not distill.registry.get(config.method).several_teachers:
    takes = ', '.join(m for m in distill.registry.registered()
                      if distill.registry.get(m).several_teachers)
    raise ValueError(f'method {config.method!r} pairs one teacher with the student, and '
                     f'config.teachers has {len(sections)} ({labels}); with several teachers '
                     f'use method {takes} or none (KD alone), or keep one teacher.')
  weights = [float(getattr(s, 'weight', 1.0)) for _, s in sections]
  if min(weights) <= 0:
    raise ValueError(f'config.teachers weights must be positive, got {weights} ({labels}).')
  over = getattr(config.loss, 'kd_over_teachers', 'average')
  if over not in distill.KD_OVER_TEACHERS:
    raise ValueError(f'loss.kd_over_teachers must be one of '
                     f'{", ".join(distill.KD_OVER_TEACHERS)}, got {over!r}.')


def teacher_input(config, section=None) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
  """`(scale, shift)` per channel that turn the student's normalised images into a teacher's
  (`section.mean/std`, its training statistics; `section` defaults to `config.teacher`):
  `x * std_s / std_t + (mean_s - mean_t) / std_t`; None where the teacher takes the dataset's
  own (unset, or equal)."""
  section = config.teacher if section is None else section
  mean_t = tuple(getattr(section, 'mean', ()) or ())
  std_t = tuple(getattr(section, 'std', ()) or ())
  dataset = getattr(config, 'dataset', None)
  mean_s, std_s = tuple(getattr(dataset, 'mean', ())), tuple(getattr(dataset, 'std', ()))
  if not mean_t and not std_t:
    return None
  if len(mean_t) != len(std_t) or len(mean_t) != len(mean_s) or min(std_t) <= 0:
    raise ValueError(f'teacher.mean {mean_t} and teacher.std {std_t} need one value per '
                     f'channel of the data ({len(mean_s)}), std > 0.')
  if (mean_t, std_t) == (mean_s, std_s):
    return None
  scale = tuple(s / t for s, t in zip(std_s, std_t))
  shift = tuple((ms - mt) / t for ms, mt, t in zip(mean_s, mean_t, std_t))
  return scale, shift


def check_distillation_token(config, student) -> None:
  """A method on the student's distillation-token head (DeiT's) needs a student that has one."""
  if config.method == 'none' or not is_distillation(config):
    return
  if (distill.registry.get(config.method).needs_distillation_token
      and not models.has_distillation_token(student)):
    raise ValueError(f'method {config.method!r} distils into a distillation token, which '
                     f'student {config.student.name!r} has not; students that have one: '
                     f'{", ".join(models.DISTILLED_NAMES)}.')


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
  if 'student_body' in spec.trains and models.is_segmenter(student):
    classifier = ('classifier',)  # the per-pixel classifier; the body is backbone and head
  elif 'student_body' in spec.trains:
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
    return task.student.apply(variables, images, train=True, mutable=True,
                              rngs={'dropout': jax.random.PRNGKey(0)})  # drop path

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


