"""Distillation losses. Feature distillers take lists of feature maps and know nothing of models.

Every feature distiller is a linen module called as `(student_features, teacher_features,
train)` that returns `(loss, aux)`; `create(method, ...)` builds one by name for the engine.
Parameter-free distillers (AT, SP) are modules whose variables are empty.
"""
from typing import Optional, Sequence

import flax.linen as nn

from afd_jax.distill.afd import AFD
from afd_jax.distill.at import AT, stage_pairs
from afd_jax.distill.fitnet import FitNet, default_tap, resolve_tap
from afd_jax.distill.kd import cross_entropy, kd_loss
from afd_jax.distill.sp import SP

METHODS = ('none', 'afd', 'fitnet', 'at', 'sp')

# The weight of each method's feature loss (`config.loss.feature_weight`): the CRD benchmark's
# (scripts/run_cifar_distill.sh: FitNet -b 100, AT -b 1000, SP -b 3000) and AFD's official beta.
DEFAULT_FEATURE_WEIGHT = {'afd': 200.0, 'fitnet': 100.0, 'at': 1000.0, 'sp': 3000.0}


def _option(config, section: str, key: str, default):
  """`config.section.key`, or `default` where the config (e.g. the benchmark's) lacks it."""
  return getattr(getattr(config, section, None), key, default)


def create(method: str, config, student_taps: Sequence, teacher_taps: Sequence) -> Optional[nn.Module]:
  """The feature distiller `method` ('none' -> None), configured from `config`.

  `student_taps`/`teacher_taps` are the models' `taps()`; layer choices are derived from them.
  """
  if method == 'none':
    return None
  if method == 'afd':
    return AFD(qk_dim=config.afd.qk_dim)
  if method == 'fitnet':
    return FitNet(
        student_tap=resolve_tap(_option(config, 'fitnet', 'student_tap', -1), student_taps,
                                'fitnet.student_tap'),
        teacher_tap=resolve_tap(_option(config, 'fitnet', 'teacher_tap', -1), teacher_taps,
                                'fitnet.teacher_tap'),
        relu=bool(_option(config, 'fitnet', 'relu', True)))
  if method == 'at':
    return AT(pairs=stage_pairs(student_taps, teacher_taps))
  if method == 'sp':
    return SP(student_tap=len(student_taps) - 1, teacher_tap=len(teacher_taps) - 1)
  raise ValueError(f'Unknown method {method!r}. Known methods: {", ".join(METHODS)}.')


__all__ = ['AFD', 'AT', 'DEFAULT_FEATURE_WEIGHT', 'FitNet', 'METHODS', 'SP', 'create',
           'cross_entropy', 'default_tap', 'kd_loss', 'stage_pairs']
