"""FitNet hints (Romero et al., ICLR 2015), single stage, as the CRD benchmark runs it.

One student tap (the guided layer) is regressed onto one teacher tap (the hint) through CRD's
`ConvReg` (HobbitLong/RepDistiller `models/util.py`): a convolution to the teacher's channels and
size, batch norm, ReLU; the loss is the mean squared error over every element (`nn.MSELoss`,
`distiller_zoo/FitNet.py`). tests/test_parity_classic.py checks it against that code.

On WRNs the maps are afd_jax's taps, ReLU(BN(.)) of the original's raw block outputs; this
and every other departure: docs/methods.md.
"""
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.at import check_index, pool_nhwc
from afd_jax.layers import BatchNorm, at_least_f32, check_feature_pair, linear_kernel_init
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


# PyTorch's ConvTranspose2d init on its equivalent convolution's HWIO kernel: the fan is out*K*K.
transposed_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')


def conv_reg(s_hw: Tuple[int, int], t_hw: Tuple[int, int]) -> Optional[dict]:
  """The convolution of CRD's `ConvReg(s_shape, t_shape)` as `nn.Conv` keyword arguments, chosen
  by the heights as there; None where ConvReg has none (it raises) or where its output would not
  have the teacher's size.

  `s_H = 2 t_H`: 3x3, stride 2, padding 1. `2 s_H = t_H`: a 4x4, stride 2, padding 1
  ConvTranspose2d, computed as its equivalent convolution (input dilated by 2, padded by 2, the
  kernel stored spatially flipped in HWIO, as `layers.TorchConvTranspose`). Otherwise, if
  `s >= t`: a valid convolution of kernel `(1 + s_H - t_H, 1 + s_W - t_W)` (1x1 for equal sizes).
  PyTorch's default inits; no bias (see `FitNet`).
  """
  (s_h, s_w), (t_h, t_w) = s_hw, t_hw
  if s_h == 2 * t_h:
    out = ((s_h - 1) // 2 + 1, (s_w - 1) // 2 + 1)
    spec = dict(kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                kernel_init=linear_kernel_init)
  elif 2 * s_h == t_h:
    out = (2 * s_h, 2 * s_w)
    spec = dict(kernel_size=(4, 4), padding=((2, 2), (2, 2)), input_dilation=(2, 2),
                kernel_init=transposed_kernel_init)
  elif s_h >= t_h and s_w >= t_w:
    out = (t_h, t_w)
    spec = dict(kernel_size=(1 + s_h - t_h, 1 + s_w - t_w), padding=((0, 0), (0, 0)),
                kernel_init=linear_kernel_init)
  else:
    return None
  return spec if out == (t_h, t_w) else None


class FitNet(nn.Module):
  """The hint loss: `mean((ReLU(BN(conv(s))) - t) ** 2)` over batch, positions and channels.

  `apply(variables, student_features, teacher_features, train, mutable=['batch_stats'])`
  returns `((loss, None), updates)`; `loss` is before the feature weight. Teacher features are
  constants. Statistics and loss are computed in float32 (or wider).

  `conv` is ConvReg's (`conv_reg`), except in two ways:
  - No bias. A train-mode batch norm subtracts the batch mean, so the loss and every gradient
    are those of ConvReg with any bias (the bias's own gradient is zero). The one trace a bias
    leaves is in the running mean, read in eval mode only: ConvReg's tracks the bias too (one
    step from the same state, it is `momentum * bias` larger), so that in eval mode the bias
    is subtracted again. Without it the parameters of equal-size maps (`conv/kernel`, 1x1, and
    `bn`) are those of earlier versions.
  - Where ConvReg has no convolution (a student map smaller than the teacher's but not half its
    size, or sizes whose widths do not follow the heights' rule), the student map is
    adaptive-average-pooled to the teacher's size and a 1x1 convolution follows.

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
    f_s = at_least_f32(student_features[self.student_tap])
    t_hw = tuple(f_t.shape[1:3])
    spec = conv_reg(tuple(f_s.shape[1:3]), t_hw)
    if spec is None:
      f_s = pool_nhwc(f_s, t_hw)
      spec = conv_reg(t_hw, t_hw)  # 1x1
    x = nn.Conv(f_t.shape[-1], use_bias=False, name='conv', **spec)(f_s)
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
