"""Distillation losses. Feature distillers take lists of feature maps and know nothing of models.

Every feature distiller is a linen module called as `(student_features, teacher_features,
train)` that returns `(loss, aux)`; `create(method, ...)` builds one by name for the engine.
"""
from typing import Optional, Sequence

import flax.linen as nn

from afd_jax.distill.afd import AFD
from afd_jax.distill.kd import cross_entropy, kd_loss

METHODS = ('none', 'afd')


def create(method: str, config, student_taps: Sequence, teacher_taps: Sequence) -> Optional[nn.Module]:
  """The feature distiller `method` ('none' -> None), configured from `config`.

  `student_taps`/`teacher_taps` are the models' `taps()`, for distillers that pick layers.
  """
  del student_taps, teacher_taps  # Used by distillers that pick layers.
  if method == 'none':
    return None
  if method == 'afd':
    return AFD(qk_dim=config.afd.qk_dim)
  raise ValueError(f'Unknown method {method!r}. Known methods: {", ".join(METHODS)}.')


__all__ = ['AFD', 'METHODS', 'create', 'cross_entropy', 'kd_loss']
