"""The registry of distillation methods: each method's file registers itself.

  register(Method('at', build=..., feature_weight=1000.0, taps='...', source='...'))

`build(config, setting)` returns the method's linen module, called as
`(student_features, teacher_features, train, **inputs) -> (loss, aux)`. `setting` (a
`Setting`) holds the models' `taps()`, from which a method derives the layers it uses, and
what the data is (classes, training examples, steps per epoch). `inputs` are the extra
keyword inputs the method declares (`Method.inputs`, names from `INPUTS`); the step passes
exactly those. `feature_weight` and `logit_weights` (CE, KD) are its defaults in
`configs/methods.py`. A method with a stage of its own before the main training (the CRD
benchmark's `init_epochs`) declares a `Pretrain`. A new method is one file in
afd_jax/distill/ that calls `register` (the package imports every module in it).
"""
import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn

# The extra inputs a method may declare, each passed by the step as a keyword argument:
INPUTS = {
    'student_logits': 'B x classes float32 logits of the student (training mode); '
                      'B x H x W x classes for segmentation',
    'student_dist_logits': "B x classes float32 logits of the student's distillation-token head "
                           "(DeiT students: models whose class names it, `distillation_head`)",
    'teacher_logits': 'B x classes float32 logits of the teacher (constants); '
                      'B x H x W x classes for segmentation',
    'labels': 'B int32 labels',
    'index': "B int32 indices of the examples in the training split (the data's 'index')",
    'epoch': 'int32 scalar: the 1-based epoch of the main stage, after any pre-training stage '
             '((step - pretrain_steps) // steps_per_epoch + 1)',
    'rng': 'a PRNG key for this step, for sampling inside the method',
    'student_embedding': "B x D: the input of the student's classifier (penultimate features)",
    'teacher_embedding': "B x D: the input of the teacher's classifier (constants)",
}


TASKS = ('classification', 'segmentation')  # B x classes logits | B x H x W x classes logits


@dataclasses.dataclass(frozen=True)
class Setting:
  """What a method's builder may derive its layout from."""
  student_taps: Sequence[Any] = ()
  teacher_taps: Sequence[Any] = ()
  num_classes: int = 0
  num_train_examples: int = 0  # 0 where unknown (e.g. the benchmark's synthetic data)
  steps_per_epoch: int = 1
  # Each training example's label at its `index` (int32 [num_train_examples]), for methods
  # that declare `needs_train_labels`; None where unknown (the benchmark's synthetic data).
  train_labels: Optional[Any] = None


@dataclasses.dataclass(frozen=True)
class Pretrain:
  """A stage before the main training in which only the method's loss is minimised, as the
  CRD benchmark's `init()` does for AB, FT and FSP (`init_epochs`, SGD with momentum).

  Attributes:
    trains: what the stage updates: 'distiller' (the method's own parameters) and/or
      'student_body' (the student without its classifier).
    method: the name of the module's method that returns `(loss, aux)` in this stage (same
      arguments as `__call__`).
    epochs, learning_rate, momentum, weight_decay: defaults of `config.pretrain.*`.
    distiller_params: which of the distiller's top-level parameter groups the stage trains
      (empty: all of them).
    frozen_after: the distiller's parameter groups that stay as the stage left them in the main
      training (no update, no weight decay), e.g. FT's paraphraser.
  """
  trains: Tuple[str, ...]
  method: str = 'pretrain_loss'
  epochs: int = 30
  learning_rate: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 5e-4
  distiller_params: Tuple[str, ...] = ()
  frozen_after: Tuple[str, ...] = ()


Builder = Callable[[Any, Setting], nn.Module]


@dataclasses.dataclass(frozen=True)
class OlderLayout:
  """How a method's distiller variables were laid out before, for checkpoints saved then.

  `matches(names)`: whether a saved distiller collection with these top-level names is in the
  older layout. `older(collection)`: today's collection (arrays, or their shapes through
  `jax.eval_shape`) in the older layout. `current(older, like)`: an older-layout collection
  (or a tree mirroring `params`, such as an optimizer's momentum) in today's layout, `like`
  being today's tree or its shapes."""
  matches: Callable[[Sequence[str]], bool]
  older: Callable[[Mapping[str, Any]], Dict[str, Any]]
  current: Callable[[Mapping[str, Any], Mapping[str, Any]], Dict[str, Any]]


def older_layout_of(names: Sequence[str]) -> Optional[OlderLayout]:
  """The registered older layout that a saved distiller collection with `names` is in."""
  for method in _METHODS.values():
    if method.older_layout is not None and method.older_layout.matches(names):
      return method.older_layout
  return None


@dataclasses.dataclass(frozen=True)
class Method:
  """A feature-distillation method: its name (`config.method`), how to build its module, its
  default loss weights, which taps it uses and where its defaults come from."""
  name: str
  build: Builder
  feature_weight: float
  logit_weights: Tuple[float, float] = (1.0, 0.0)  # (CE, KD) by default, without `+kd`
  taps: str = ''
  source: str = ''
  inputs: Tuple[str, ...] = ()  # extra keyword inputs of the module's call (keys of INPUTS)
  pretrain: Optional[Pretrain] = None
  # The method's settings and their defaults: `config.<name>.<key>` (configs/base.py makes the
  # section, so that `--config.<name>.<key>=...` works); read with `option(config, name, key)`.
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # Its `aux` is a `B x T x S` attention over (teacher layer, student layer): recorded during
  # training and drawn by `python -m afd_jax.visualize` (AFD, SemCKD).
  attention: bool = False
  # The builder gets `Setting.train_labels` (the trainer reads the split's labels once, before
  # training): per-example state that must know every label from the first step (CRD).
  needs_train_labels: bool = False
  # Settings of the method's own recipe for an experiment family that differ from its defaults,
  # per (teacher, student) pair ('*' matches any model): {family: {(teacher, student):
  # {'dotted.config.key': value}}}; applied by the family's config (`configs.methods.
  # apply_recipe`), e.g. DKD's beta per CIFAR-100 pair.
  recipes: Mapping[str, Mapping[Tuple[str, str], Mapping[str, Any]]] = dataclasses.field(
      default_factory=dict)
  # A parameter layout that checkpoints of earlier versions hold, read into today's at restore.
  older_layout: Optional['OlderLayout'] = None
  # Its loss is defined over any list of teacher taps, so it takes several teachers' taps as
  # one list (`config.teachers`; AFD's attention over every teacher layer). A method that
  # pairs layers, stages, logits or embeddings of one teacher with the student leaves it False
  # and is refused with several teachers.
  several_teachers: bool = False
  # The tasks it distils ('classification', 'segmentation'); empty: derived from its inputs (a
  # loss over feature maps alone serves both, one that reads logits, labels, embeddings or
  # example indices classification alone). CWD, over per-pixel logits, is segmentation's alone.
  tasks: Tuple[str, ...] = ()

  @property
  def applies_to(self) -> Tuple[str, ...]:
    """The tasks it distils (`tasks`, or what its inputs allow)."""
    if self.tasks:
      return self.tasks
    if set(self.inputs) - {'rng', 'epoch'}:
      return ('classification',)
    return TASKS

  @property
  def needs_distillation_token(self) -> bool:
    """Does the method read the student's distillation-token head (DeiT's `deit_hard`,
    `deit_soft`)? Such a method runs only with a student that has one; the trainer refuses
    any other (this package knows no models)."""
    return 'student_dist_logits' in self.inputs

  def recipe(self, family: str, teacher: str, student: str) -> Dict[str, Any]:
    """The settings of `recipes[family]` that apply to (teacher, student); exact pairs win over
    '*' ones."""
    pairs = self.recipes.get(family, {})
    found: Dict[str, Any] = {}
    for (t, s), values in sorted(pairs.items(), key=lambda kv: kv[0].count('*'), reverse=True):
      if t in ('*', teacher) and s in ('*', student):
        found.update(values)
    return found

  def __post_init__(self):
    if any(t not in TASKS for t in self.tasks):
      raise ValueError(f'method {self.name!r}: tasks takes {", ".join(TASKS)}, not '
                       f'{list(self.tasks)}.')
    unknown = [i for i in self.inputs if i not in INPUTS]
    if unknown:
      raise ValueError(f'method {self.name!r} declares unknown inputs {unknown}; known: '
                       f'{", ".join(INPUTS)}.')
    if self.pretrain is not None:
      bad = [t for t in self.pretrain.trains if t not in ('distiller', 'student_body')]
      if bad or not self.pretrain.trains:
        raise ValueError(f"method {self.name!r}: Pretrain.trains takes 'distiller' and/or "
                         f"'student_body', not {list(self.pretrain.trains)}.")


_METHODS: Dict[str, Method] = {}


RESERVED = {'none': 'the student alone (no feature loss)', 'kd': 'Hinton KD on logits alone'}


def register(method: Method) -> Method:
  """Adds `method`; a second method of the same name, or a reserved name, is an error."""
  if method.name in RESERVED:
    raise ValueError(f'{method.name!r} is a reserved method name ({RESERVED[method.name]}); '
                     'register the method under another name.')
  if method.name in _METHODS:
    raise ValueError(f'a distillation method named {method.name!r} is already registered.')
  _METHODS[method.name] = method
  return method


def with_attention() -> Tuple[str, ...]:
  """The methods whose distiller returns a layer-link attention (`Method.attention`)."""
  return tuple(name for name, m in _METHODS.items() if m.attention)


def for_task(task: str) -> Tuple[str, ...]:
  """'none' and the registered methods that distil `task` (`Method.applies_to`)."""
  return ('none',) + tuple(n for n, m in _METHODS.items() if task in m.applies_to)


def registered() -> Tuple[str, ...]:
  """Every registered method (each has a feature loss), in registration order."""
  return tuple(_METHODS)


def names() -> Tuple[str, ...]:
  """'none' (no feature loss) and every registered method, in registration order."""
  return ('none',) + registered()


def get(name: str) -> Method:
  if name not in _METHODS:
    raise ValueError(f'Unknown method {name!r}. Known methods: {", ".join(names())}.')
  return _METHODS[name]


_NO_DEFAULT = object()


def option(config, section: str, key: str, default=_NO_DEFAULT):
  """`config.section.key`, or the default where the config (e.g. the benchmark's) lacks it:
  `default`, else the registered method `section`'s `options[key]`."""
  if default is _NO_DEFAULT:
    default = get(section).options[key]
  return getattr(getattr(config, section, None), key, default)
