"""How a module from anywhere is called: its train flag, and the pmap axes its layers name.

afd_jax calls every model as `apply(variables, images, train)`. A module written elsewhere may
declare the flag otherwise; `Calling.of(module)` reads its `__call__` signature:
- a parameter `train`, `training` or `is_training` (keyword-only too) gets `train`;
  `deterministic` gets `not train`;
- else a required second positional parameter gets `train` positionally;
- an optional second positional parameter of another name (`mask=None`; NNX's `rngs` aside)
  is refused: whether it is the flag cannot be told, and `train_arg` says;
- else (e.g. `__call__(self, x)`) nothing is passed.
`train_arg` overrides the reading: a parameter name, `'!name'` for one that means *not*
training, or `'none'`. An NNX module through `flax.nnx.bridge.to_linen` is read the same way on
its own `__call__`, and is also put in train or eval mode (`model.train()` / `model.eval()`).

Layers that name a pmap axis (`nn.BatchNorm(axis_name='batch')`, written for `pmap`, where
each device held a slice of the batch and the statistics were averaged over the axis) run with
that name set aside for the call: under `jit` the batch a layer sees is already the global
batch, so its own statistics are the global batch's, as the pmap average was.
"""
import contextlib
import dataclasses
import inspect
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn

TRAIN_NAMES = ('train', 'training', 'is_training')
INVERSE_NAMES = ('deterministic', 'use_running_average')


@dataclasses.dataclass(frozen=True)
class Calling:
  """Where `train` goes: `name` (a keyword), `positional`, or nowhere; `invert` for flags
  meaning eval; `nnx` for a bridged NNX module (set its mode too); `axis_names`: the pmap
  axes its layers name (set aside while it runs)."""
  name: Optional[str] = None
  positional: bool = False
  invert: bool = False
  nnx: bool = False
  axis_names: Tuple[str, ...] = ()

  @classmethod
  def of(cls, module, train_arg: str = '') -> 'Calling':
    """The convention of `module`'s `__call__` (or its NNX class's), or `train_arg`'s."""
    nnx_class = _nnx_class(module)
    target = nnx_class if nnx_class is not None else type(module)
    params = _call_params(target)
    if train_arg:
      return cls(*_named(train_arg, params, target), nnx=nnx_class is not None)
    for name in TRAIN_NAMES + INVERSE_NAMES:
      if params and name in params and params[name].kind != params[name].POSITIONAL_ONLY:
        return cls(name, invert=name in INVERSE_NAMES, nnx=nnx_class is not None)
    rest = list((params or {}).values())[1:]  # after the images
    second = rest[0] if rest and rest[0].kind in (rest[0].POSITIONAL_ONLY,
                                                   rest[0].POSITIONAL_OR_KEYWORD) else None
    if second is not None and second.default is not second.empty and second.name != 'rngs':
      raise ValueError(
          f'{target.__name__}.__call__ takes an optional {second.name!r} after the images: '
          'whether it is the train flag cannot be told. Set config.student.train_arg (or '
          f"config.teacher.train_arg) to {second.name!r}, '!{second.name}' if it means not "
          "training, or 'none'.")
    takes_train = params is None or any(p.kind == p.VAR_POSITIONAL for p in rest) or (
        second is not None)
    return cls(positional=bool(takes_train), nnx=nnx_class is not None)

  def method(self, train: bool) -> Callable[..., Any]:
    """The function `module.apply(..., method=...)` calls: `fn(module, images)`."""
    flag = (not train) if self.invert else bool(train)
    args, kwargs = ((flag,), {}) if self.positional else ((), {self.name: flag} if self.name
                                                            else {})

    def call(module, images):
      if not self.nnx:
        return module(images, *args, **kwargs)

      def nnx_call(nnx_module, images):
        if train:
          nnx_module.train()
        else:
          nnx_module.eval()
        return nnx_module(images, *args, **kwargs)
      return module(images, nnx_method=nnx_call)
    return call

  def unbound_axes(self):
    """A context in which the layers naming one of `axis_names` run with `axis_name=None`."""
    if not self.axis_names:
      return contextlib.nullcontext()
    names = set(self.axis_names)

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      declared = getattr(module, 'axis_name', None)
      if context.method_name != '__call__' or not _names(declared) & names:
        return next_fun(*args, **kwargs)
      object.__setattr__(module, 'axis_name', None)  # for this call only
      try:
        return next_fun(*args, **kwargs)
      finally:
        object.__setattr__(module, 'axis_name', declared)
    return nn.intercept_methods(interceptor)


def _nnx_class(module):
  try:
    from flax.nnx import bridge  # pylint: disable=g-import-not-at-top
  except ImportError:  # an older flax without NNX
    return None
  cls = getattr(module, 'nnx_class', None) if isinstance(module, bridge.ToLinen) else None
  return cls if isinstance(cls, type) else None


def _call_params(target):
  """`target.__call__`'s parameters after `self`, or None when they cannot be read."""
  try:
    params = list(inspect.signature(target.__call__).parameters.values())
  except (TypeError, ValueError):
    return None
  return {p.name: p for p in params[1:]} if params and params[0].name == 'self' else (
      {p.name: p for p in params})


def _named(train_arg: str, params, target) -> Tuple[Optional[str], bool, bool]:
  """(name, positional, invert) for an explicit `train_arg`."""
  if train_arg == 'none':
    return None, False, False
  invert, name = train_arg.startswith('!'), train_arg.lstrip('!')
  takes_any = params is None or any(p.kind == p.VAR_KEYWORD for p in params.values())
  if not name.isidentifier() or not (takes_any or name in params):
    known = ', '.join(list(params or {})[1:]) or 'none'
    raise ValueError(
        f"train_arg {train_arg!r}: {target.__name__}.__call__ has no parameter {name!r} "
        f"(its parameters after the images: {known}); give one of them, '!name' for a flag "
        "that means not training, or 'none' (config.student.train_arg / "
        "config.teacher.train_arg).")
  return name, False, invert


def axis_names_of(modules) -> Tuple[str, ...]:
  """The pmap axis names that `modules`' layers declare (`axis_name`, e.g. BatchNorm's)."""
  names = []
  for module in modules:
    names += [n for n in sorted(_names(getattr(module, 'axis_name', None))) if n not in names]
  return tuple(names)


def _names(value) -> set:
  return {n for n in (value if isinstance(value, (tuple, list)) else (value,))
          if isinstance(n, str)}
