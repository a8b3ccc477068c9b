"""FitNet hints (Romero et al., ICLR 2015), single stage, as the CRD benchmark runs it.

One student tap (the guided layer) is regressed onto one teacher tap (the hint) through a
learned 1x1 convolution + batch norm (+ ReLU, as CRD's `ConvReg`); the loss is the mean squared
error over every element (`nn.MSELoss`).
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.at import check_index, pool_nhwc
from afd_jax.layers import BatchNorm, at_least_f32, check_feature_pair, conv, linear_kernel_init
from afd_jax.taps import Tap, stage_final


def hint_stage(taps: Sequence[Tap]) -> int:
  """The default hint stage: the middle stage, the lower one for an even count.

  2 for the 3-stage CIFAR ResNets and WRNs and for the 4-stage ResNets, 3 for the 5-block VGGs:
  in every family this is the map CRD's default `hint_layer=2` picks (its feature lists start
  with the stem for ResNets and WRNs, but with the first conv block for VGG).
  """
  stages = sorted({t.stage for t in taps})
  return stages[(len(stages) - 1) // 2]


def default_tap(taps: Sequence[Tap]) -> int:
  """Index of the last tap of the hint stage (derived from the model's `taps()`)."""
  stage = hint_stage(taps)
  return next(i for i in stage_final(taps) if taps[i].stage == stage)


def resolve_tap(index: int, taps: Sequence[Tap], what: str) -> int:
  """A config's tap choice: -1 -> `default_tap(taps)`, otherwise a tap index (checked)."""
  if index == -1:
    return default_tap(taps)
  if not 0 <= index < len(taps):
    raise ValueError(f'{what} must be -1 (the default) or a tap index in [0, {len(taps) - 1}], '
                     f'got {index}.')
  return int(index)


class FitNet(nn.Module):
  """The hint loss: `mean((BN(conv1x1(s)) - t) ** 2)` over batch, positions and channels.

  `apply(variables, student_features, teacher_features, train, mutable=['batch_stats'])`
  returns `((loss, None), updates)`; `loss` is before the feature weight. Teacher features are
  constants. When the two maps' spatial sizes differ, the student map is adaptive-average-pooled
  to the teacher's size before the regressor (CRD uses a strided or transposed convolution
  instead). Statistics and loss are computed in float32 (or wider).

  Attributes:
    student_tap, teacher_tap: indices into the feature lists.
    relu: apply ReLU after the batch norm, as CRD's `ConvReg` (the tapped teacher maps are
      post-ReLU, i.e. non-negative).
  """
  student_tap: int
  teacher_tap: int
  relu: bool = True

  @nn.compact
  def __call__(self, student_features: Sequence[jax.Array],
               teacher_features: Sequence[jax.Array], train: bool):
    check_feature_pair(student_features, teacher_features)
    check_index(self.student_tap, student_features, 'student_tap')
    check_index(self.teacher_tap, teacher_features, 'teacher_tap')
    f_t = jax.lax.stop_gradient(at_least_f32(teacher_features[self.teacher_tap]))
    f_s = pool_nhwc(at_least_f32(student_features[self.student_tap]), f_t.shape[1:3])
    # A bias before batch norm would be cancelled by it; PyTorch's default conv init.
    x = conv(f_t.shape[-1], 1, padding=0, kernel_init=linear_kernel_init, name='conv')(f_s)
    x = BatchNorm(name='bn')(x, train)
    if self.relu:
      x = nn.relu(x)
    return jnp.mean(jnp.square(x - f_t)), None


def _build(config, setting: registry.Setting) -> FitNet:
  option = registry.option
  return FitNet(
      student_tap=resolve_tap(option(config, 'fitnet', 'student_tap', -1), setting.student_taps,
                              'fitnet.student_tap'),
      teacher_tap=resolve_tap(option(config, 'fitnet', 'teacher_tap', -1), setting.teacher_taps,
                              'fitnet.teacher_tap'),
      relu=bool(option(config, 'fitnet', 'relu', True)))


registry.register(registry.Method(
    'fitnet', build=_build, feature_weight=100.0,
    taps='one hint: the middle stage of each model by default (config.fitnet.*_tap)',
    source='CRD benchmark, scripts/run_cifar_distill.sh: --distill hint -a 0 -b 100'))
