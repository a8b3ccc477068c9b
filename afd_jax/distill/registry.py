"""The registry of feature-distillation methods: each method's file registers itself.

  register(Method('at', build=..., feature_weight=1000.0, taps='...', source='...'))

`build(config, student_taps, teacher_taps)` returns the method's linen module, called as
`(student_features, teacher_features, train) -> (loss, aux)`; the taps are the models'
`taps()`, from which a method derives the layers it uses. `feature_weight` and
`logit_weights` (CE, KD) are its defaults in `configs/methods.py`. A new method is one file in
afd_jax/distill/ that calls `register` (the package imports every module in it).
"""
import dataclasses
from typing import Any, Callable, Dict, Sequence, Tuple

import flax.linen as nn

Builder = Callable[[Any, Sequence, Sequence], nn.Module]


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


_METHODS: Dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds `method`; a second method of the same name is an error."""
  if method.name in _METHODS or method.name in ('none', 'kd'):
    raise ValueError(f'a distillation method named {method.name!r} is already registered.')
  _METHODS[method.name] = method
  return method


def names() -> Tuple[str, ...]:
  """'none' (no feature loss) and every registered method, in registration order."""
  return ('none',) + tuple(_METHODS)


def get(name: str) -> Method:
  if name not in _METHODS:
    raise ValueError(f'Unknown method {name!r}. Known methods: {", ".join(names())}.')
  return _METHODS[name]


def option(config, section: str, key: str, default):
  """`config.section.key`, or `default` where the config (e.g. the benchmark's) lacks it."""
  return getattr(getattr(config, section, None), key, default)
