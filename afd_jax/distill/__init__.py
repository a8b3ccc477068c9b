"""Distillation losses. Distillers take lists of feature maps and know nothing of models.

Every distiller is a linen module called as `(student_features, teacher_features, train,
**inputs)` that returns `(loss, aux)`; `inputs` are what the method declares beyond features
(logits, labels, embeddings, example indices, ...: `registry.INPUTS`). Each method's file
registers it (`registry.register`: name, builder, default loss weights, the taps it uses);
`create(method, ...)` builds one by name for the engine. Every module of this package is
imported, so a new method is one new file.
Parameter-free distillers (AT, SP) are modules whose variables are empty.
"""
import importlib
import pkgutil
from typing import Optional, Sequence

import flax.linen as nn

from afd_jax.distill import registry
from afd_jax.distill.afd import AFD
from afd_jax.distill.at import AT, stage_pairs
from afd_jax.distill.fitnet import FitNet, default_tap
from afd_jax.distill.kd import (KD_OVER_TEACHERS, cross_entropy, ensemble_kd_loss, kd_loss,
                               soft_cross_entropy)
from afd_jax.distill.sp import SP

for _module in pkgutil.iter_modules(__path__):  # methods in files of their own register here
  importlib.import_module(f'{__name__}.{_module.name}')


def __getattr__(name: str):
  """`METHODS` ('none' and every method) and `DEFAULT_FEATURE_WEIGHT` (each method's
  `config.loss.feature_weight`), read from the registry when asked for, so that methods
  registered after import (a research fork's own file) are in them too."""
  if name == 'METHODS':
    return registry.names()
  if name == 'DEFAULT_FEATURE_WEIGHT':
    return {m: registry.get(m).feature_weight for m in registry.registered()}
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def create(method: str, config, student_taps: Sequence, teacher_taps: Sequence,
           **data) -> Optional[nn.Module]:
  """The distiller `method` ('none' -> None), configured from `config`.

  `student_taps`/`teacher_taps` are the models' `taps()`; layer choices are derived from them.
  `data`: the other fields of `registry.Setting` (num_classes, num_train_examples, ...).
  """
  if method == 'none':
    return None
  setting = registry.Setting(tuple(student_taps), tuple(teacher_taps), **data)
  return registry.get(method).build(config, setting)


__all__ = ['AFD', 'AT', 'DEFAULT_FEATURE_WEIGHT', 'FitNet', 'KD_OVER_TEACHERS', 'METHODS', 'SP',
           'create', 'cross_entropy', 'default_tap', 'ensemble_kd_loss', 'kd_loss', 'registry',
           'soft_cross_entropy', 'stage_pairs']
