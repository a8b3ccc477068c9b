"""Variational information distillation (Ahn et al., CVPR 2019), as the CRD benchmark runs it.

For each matched pair of stage-final taps (the benchmark's `feat[1:-1]`, the three stage
outputs, helper/loops.py:166-170: stage k of the student with stage k of the teacher), the larger
map is adaptive-average-pooled to the smaller size; a regressor of three bias-free 1x1
convolutions (C_s -> C_t -> C_t -> C_t, ReLU between) predicts the teacher map's mean `mu` from
the student's, and a learned per-channel variance `var_c = softplus(log_scale_c) + 1e-5`
(initialised to 5) gives the Gaussian negative log-likelihood
  loss_pair = mean_{b,h,w,c} 0.5 * ((mu - t) ** 2 / var_c + log var_c),
the loss is the sum over pairs. Each pair has its own regressor and variances (one `VIDLoss`
per pair, train_student.py:219-226), the method's parameters; no batch statistics.

Matches HobbitLong/RepDistiller `distiller_zoo/VID.py` (`VIDLoss(s, t, t)`, init_pred_var 5,
eps 1e-5, PyTorch's default conv init). The original compares heights only and pools to a
square; here each axis is pooled to the smaller of the two (the same on square maps, as at.py
does). The variance is `jax.nn.softplus`, equal to the original's `log(1 + exp(x))` but finite
where that overflows (x > 88).

On WRNs the maps are afd_jax's taps, ReLU(BN(.)) of the original's raw block outputs; this
and every other departure: docs/methods.md.
"""
from typing import List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from afd_jax.distill import registry
from afd_jax.distill.at import Pairs, paired_features, pool_nhwc, stage_pairs
from afd_jax.layers import at_least_f32, conv, linear_kernel_init

INIT_PRED_VAR = 5.0  # VID.py:16 (init_pred_var=5.0)
EPS = 1e-5  # VID.py:17 (eps=1e-5)


class VIDPair(nn.Module):
  """One pair's regressor (`conv1`, `conv2`, `conv3`: 1x1, no bias) and `log_scale` (C_t)."""
  init_pred_var: float = INIT_PRED_VAR
  eps: float = EPS

  @nn.compact
  def __call__(self, f_s: jax.Array, f_t: jax.Array) -> jax.Array:
    hw = (min(f_s.shape[1], f_t.shape[1]), min(f_s.shape[2], f_t.shape[2]))
    f_s, f_t = pool_nhwc(f_s, hw), pool_nhwc(f_t, hw)
    channels = f_t.shape[-1]
    x = f_s
    for k in (1, 2, 3):  # PyTorch's default Conv2d init: U(+-1/sqrt(fan_in))
      x = conv(channels, 1, padding=0, kernel_init=linear_kernel_init, name=f'conv{k}')(x)
      if k < 3:
        x = nn.relu(x)
    start = float(np.log(np.exp(self.init_pred_var - self.eps) - 1.0))  # softplus^-1(var - eps)
    log_scale = self.param('log_scale', nn.initializers.constant(start), (channels,),
                           jnp.float32)
    var = jax.nn.softplus(log_scale) + self.eps
    nll = 0.5 * (jnp.square(at_least_f32(x) - f_t) / var + jnp.log(var))
    return jnp.mean(nll)


class VID(nn.Module):
  """The VID loss over pairs of maps (params `pair0`, `pair1`, ...: `VIDPair`).

  `apply(variables, student_features, teacher_features, train)` returns `(loss, per_pair)`:
  `loss` is the sum over pairs before the feature weight, `per_pair` the pairs' losses.

  Attributes:
    pairs: `(student index, teacher index)` into the feature lists; None pairs feature i of
      the student with feature i of the teacher for every i both lists have.
    init_pred_var: the variances' initial value.
  """
  pairs: Optional[Pairs] = None
  init_pred_var: float = INIT_PRED_VAR

  @nn.compact
  def __call__(self, student_features, teacher_features, train: bool):
    del train  # No batch statistics.
    losses: List[jax.Array] = []
    pairs = paired_features(self.pairs, student_features, teacher_features)
    for k, (f_s, f_t) in enumerate(pairs):
      losses.append(VIDPair(self.init_pred_var, name=f'pair{k}')(f_s, f_t))
    per_pair = jnp.stack(losses)
    return jnp.sum(per_pair), per_pair


def _build(config, setting: registry.Setting) -> VID:
  init_pred_var = float(registry.option(config, 'vid', 'init_pred_var'))
  if not init_pred_var > EPS:
    raise ValueError(f'vid.init_pred_var must exceed {EPS}, got {init_pred_var}.')
  return VID(pairs=stage_pairs(setting.student_taps, setting.teacher_taps),
             init_pred_var=init_pred_var)


# Weights: scripts/run_cifar_distill.sh:15 (`--distill vid -a 0 -b 1`; `-r` keeps its default 1,
# train_student.py:73). One VIDLoss(s, t, t) per pair of feat[1:-1] (train_student.py:219-226),
# the losses summed (helper/loops.py:166-170).
registry.register(registry.Method(
    'vid', build=_build, feature_weight=1.0, logit_weights=(1.0, 0.0),
    taps="the last tap of each stage, the student's stages paired with the teacher's",
    source='CRD benchmark, scripts/run_cifar_distill.sh:15: --distill vid -a 0 -b 1 '
           '(-r 1: train_student.py:73); one VIDLoss per pair of feat[1:-1]: '
           'train_student.py:219-226, helper/loops.py:166-170',
    options={'init_pred_var': INIT_PRED_VAR}))
