"""Models: `create(name, num_classes)` -> a module returning `(logits, features)`.

`module.apply(variables, images, train)` takes `B x H x W x C` images (any size and channel
count the architecture admits) and returns float32 logits and a tuple of channels-last feature
taps (see docs/method.md); `module.taps()` names them. Variables: `{'params', 'batch_stats'}`.

`name` is a zoo name (`names()`) or `'package.module:factory'`, a callable (a function or a
module class) returning any linen module whose `__call__` returns logits; its train flag is
passed as it declares it (`calling.Calling`) and its taps are found by `tapping.tap`.
"""
import dataclasses
import functools
import importlib
import inspect
from typing import Any, Dict, List, Optional, Sequence

import flax.linen as nn

from afd_jax.models.classifier import (apply_with_dist_logits, apply_with_embedding,
                                       classifier_path, has_distillation_token)
from afd_jax.models.deit import CONFIGS as DEIT_CONFIGS
from afd_jax.models.deit import DeiT
from afd_jax.models.ensemble import Ensemble, is_ensemble, members_of
from afd_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from afd_jax.models.resnet_cifar import CifarResNet
from afd_jax.models.segmentation import HEADS as SEGMENTATION_HEADS
from afd_jax.models.segmentation import Segmenter
from afd_jax.models.taps import Tap, stage_final
from afd_jax.models.tapping import Tapped, tap
from afd_jax.models.vgg import CONFIGS as VGG_CONFIGS
from afd_jax.models.vgg import VGG
from afd_jax.models.vit import CONFIGS as VIT_CONFIGS
from afd_jax.models.vit import ViT
from afd_jax.models.wrn import WideResNet

_p = functools.partial
_REGISTRY: Dict[str, functools.partial] = {
    **{f'wrn{d}x{w}': _p(WideResNet, depth=d, widen=w) for d in (16, 28, 40) for w in (1, 2)},
    **{f'resnet{d}': _p(CifarResNet, depth=d, widths=(16, 16, 32, 64))
       for d in (8, 14, 20, 32, 44, 56)},
    'resnet110': _p(CifarResNet, depth=110, widths=(16, 16, 32, 64), tap_every=2),
    'resnet8x4': _p(CifarResNet, depth=8, widths=(32, 64, 128, 256)),
    'resnet32x4': _p(CifarResNet, depth=32, widths=(32, 64, 128, 256)),
    'resnet18': _p(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock),
    'resnet34': _p(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock),
    'resnet18im': _p(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock, imagenet_stem=True),
    'resnet34im': _p(ResNet, stage_sizes=(3, 4, 6, 3), block=BasicBlock, imagenet_stem=True),
    'resnet50im': _p(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck, imagenet_stem=True),
    'vgg8': _p(VGG, blocks=VGG_CONFIGS['S']),
    'vgg13': _p(VGG, blocks=VGG_CONFIGS['B']),
    **{name: _p(ViT, **options) for name, options in VIT_CONFIGS.items()},
    **{name: _p(DeiT, **options) for name, options in DEIT_CONFIGS.items()},
}


DISTILLED_NAMES = tuple(DEIT_CONFIGS)  # zoo models with a distillation token
VIT_NAMES = tuple(VIT_CONFIGS) + DISTILLED_NAMES  # timm's / transformers' weights (interop/vit.py)


def names() -> List[str]:
  """Every model name `create` accepts."""
  return sorted(_REGISTRY)


def is_factory(name: str) -> bool:
  """Is `name` a `'package.module:factory'` reference rather than a zoo name?"""
  return ':' in name


def load_factory(name: str):
  """The callable that `'package.module:factory'` names; ValueError if it cannot be imported."""
  module_name, _, attr = name.partition(':')
  try:
    target = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f'model {name!r}: cannot import {module_name!r} ({e}).') from None
  for part in attr.split('.'):
    if not hasattr(target, part):
      raise ValueError(f'model {name!r}: {module_name!r} has no {attr!r}.')
    target = getattr(target, part)
  if not callable(target):
    raise ValueError(f'model {name!r}: {attr!r} is not callable.')
  return target


def check_name(name: str) -> None:
  """ValueError naming the problem if `name` is neither a zoo name nor an importable factory."""
  if is_factory(name):
    load_factory(name)
  elif name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}. Known models: {", ".join(names())}, or '
                     "'package.module:factory'.")


def _parameters(fn) -> Dict[str, inspect.Parameter]:
  try:
    return dict(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return {}


def _fields(cls) -> List[str]:
  """The constructor fields of a module class (a flax module is a dataclass)."""
  return [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(
      cls) else list(_parameters(cls))


def drop_path_names() -> List[str]:
  """The zoo models with stochastic depth (a `drop_path_rate` field)."""
  return sorted(n for n, f in _REGISTRY.items() if 'drop_path_rate' in _fields(f.func))


def _no_drop_path(name: str, rate: float) -> ValueError:
  return ValueError(f'drop_path_rate={rate}: model {name!r} has no stochastic depth; the models '
                    f'with it: {", ".join(drop_path_names())}, or a factory whose module has a '
                    'drop_path_rate field.')


def _build(factory, kwargs: Dict[str, Any], num_classes: int, dtype,
           drop_path_rate: float = 0.0) -> Any:
  """`factory(**kwargs)`, given `num_classes`, `dtype` and a non-zero `drop_path_rate` each
  only where what it builds can take it: a named parameter of the factory, or a field of the
  module class (the class itself as the factory, or the class of what a `**kwargs` factory
  returns, which is then built again with them); a ValueError if `drop_path_rate` finds none."""
  kwargs = dict(kwargs)
  if isinstance(factory, type):
    named, forwards = _fields(factory), False
  else:
    params = _parameters(factory)
    named = list(params)
    forwards = any(p.kind == p.VAR_KEYWORD for p in params.values())
  offered = {k: v for k, v in (('num_classes', num_classes), ('dtype', dtype),
                               ('drop_path_rate', drop_path_rate or None))
             if v is not None and k not in kwargs}
  kwargs.update({k: v for k, v in offered.items() if k in named})
  module = factory(**kwargs)
  passed = {k for k in offered if k in named}
  forwarded = {k: v for k, v in offered.items() if k not in named}
  if forwards and forwarded and isinstance(module, nn.Module):
    fields = _fields(type(module))
    forwarded = {k: v for k, v in forwarded.items() if k in fields}
    if forwarded:
      module = factory(**kwargs, **forwarded)
      passed |= set(forwarded)
  if 'drop_path_rate' in offered and 'drop_path_rate' not in passed:
    raise _no_drop_path(getattr(factory, '__name__', repr(factory)), drop_path_rate)
  return module


def create(name: str, num_classes: int, *, dtype: Optional[Any] = None,
           taps: Optional[Any] = None, kwargs: Optional[Dict[str, Any]] = None,
           prefix_tokens: Optional[int] = None, grid: Optional[Sequence[int]] = None,
           image_shape: Optional[Sequence[int]] = None, train_arg: str = '',
           drop_path_rate: float = 0.0):
  """Builds model `name` with `num_classes` outputs.

  Args:
    name: a zoo name or `'package.module:factory'`.
    num_classes: classifier outputs (passed to a factory that takes `num_classes`).
    dtype: activation dtype (passed to a factory that takes `dtype`).
    taps: None (the zoo's own taps; `'auto'` for a factory), `'auto'`, or module-path patterns.
    kwargs: keyword arguments for a factory.
    prefix_tokens, grid: how token taps become maps (see `tapping`).
    image_shape: (H, W, C); needed to find taps by tracing (a factory, or `taps` on a zoo model).
    train_arg: how a factory's module takes the train flag ('' = from its `__call__`; a
      parameter name, '!name' for one meaning not training, or 'none'; see `calling`).
    drop_path_rate: stochastic depth, for a model with a `drop_path_rate` field (the zoo's
      ViTs and DeiTs); 0 passes nothing.
  """
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}.')
  check_name(name)
  if not 0 <= drop_path_rate < 1:
    raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate!r}.')
  if not is_factory(name):
    if kwargs:
      raise ValueError(f'model {name!r} is a zoo model: it takes no kwargs, got {dict(kwargs)}.')
    if train_arg:
      raise ValueError(f'model {name!r} is a zoo model: train_arg is for a factory\'s model.')
    if drop_path_rate and name not in drop_path_names():
      raise _no_drop_path(name, drop_path_rate)
    depth = {'drop_path_rate': float(drop_path_rate)} if drop_path_rate else {}
    module = _REGISTRY[name](num_classes=num_classes, dtype=dtype, **depth)
    if taps is None:
      return module
  else:
    module = _build(load_factory(name), dict(kwargs or {}), num_classes, dtype,
                    float(drop_path_rate))
    if not isinstance(module, nn.Module):
      raise ValueError(f'model {name!r} returned a {type(module).__name__}, not a flax.linen '
                       'Module (an NNX module enters through flax.nnx.bridge.to_linen).')
  return tap(module, 'auto' if taps is None else taps, prefix_tokens=prefix_tokens,
             grid=grid, image_shape=image_shape, train_arg=train_arg)


def from_config(section, num_classes: int, dtype=None, image_shape=None):
  """The model a config section describes (`name`, and for any model `taps`; for a factory
  `kwargs` and `train_arg`; for token taps `prefix_tokens` (-1: from the model) and
  `token_grid` (() = infer); `drop_path_rate` where the section has it). With `head` ('fpn' or
  'progressive') it is a `Segmenter` over that model (`head_width` channels, default 64;
  `head_upsamplings`: progressive upsampling's 2x steps, 0 = from the model's patch size).

  `taps` is '' (the zoo's own taps; 'auto' for a factory), 'auto', or comma-separated patterns.
  Works on ConfigDicts and on plain namespaces that have only `name`."""
  taps = getattr(section, 'taps', '') or None
  if isinstance(taps, str) and taps != 'auto':
    taps = tuple(p.strip() for p in taps.split(',') if p.strip())
  kwargs = getattr(section, 'kwargs', None)
  if kwargs is not None and not isinstance(kwargs, dict):  # ConfigDict, or a namespace
    kwargs = kwargs.to_dict() if hasattr(kwargs, 'to_dict') else vars(kwargs)
  kwargs = dict(kwargs) if kwargs else None
  prefix = getattr(section, 'prefix_tokens', -1)
  grid = tuple(getattr(section, 'token_grid', ()) or ()) or None
  if (is_factory(section.name) or taps is not None) and image_shape is None:
    raise ValueError(f'model {section.name!r} with taps found by tracing needs the image shape.')
  head = getattr(section, 'head', '') or ''
  if head and head not in SEGMENTATION_HEADS:
    raise ValueError(f'head={head!r} for model {section.name!r}; expected one of '
                     f'{", ".join(SEGMENTATION_HEADS)} (or \'\' for a classifier).')
  model = create(section.name, 1 if head else num_classes, dtype=dtype, taps=taps,
                 kwargs=kwargs, prefix_tokens=None if prefix is None or prefix < 0 else prefix,
                 grid=grid, image_shape=image_shape,
                 train_arg=getattr(section, 'train_arg', '') or '',
                 drop_path_rate=float(getattr(section, 'drop_path_rate', 0.0) or 0.0))
  if not head:
    return model
  return Segmenter(model, num_classes, head, width=int(getattr(section, 'head_width', 0) or 64),
                   upsamplings=int(getattr(section, 'head_upsamplings', 0) or 0), dtype=dtype)


def is_segmenter(model) -> bool:
  """Does `model` return per-pixel logits (a `Segmenter`)?"""
  return isinstance(model, Segmenter)


__all__ = ['apply_with_dist_logits', 'apply_with_embedding', 'classifier_path', 'from_config',
           'create', 'names', 'check_name', 'is_factory', 'has_distillation_token',
           'DISTILLED_NAMES', 'drop_path_names', 'Ensemble', 'is_ensemble', 'members_of',
           'is_segmenter', 'Segmenter', 'SEGMENTATION_HEADS', 'Tap', 'Tapped', 'stage_final',
           'tap']
