"""Activation boundaries (Heo et al., AAAI 2019), as the CRD benchmark runs it (`--distill abound`).

Matches HobbitLong/RepDistiller `distiller_zoo/AB.py` (`ABLoss`), `models/util.py` (`Connector`,
`ConvReg(use_relu=False)`) and the `abound` branches of `helper/pretrain.py` and
`train_student.py`.

For each matched pair i = 0..n-1 of stage-final taps, `s_i = connector_i(f_s)` (identity when the
student and teacher maps have the same channels and height, else CRD's `ConvReg` without ReLU:
a convolution chosen by the sizes, see `ConvReg`, then batch norm), and with margin m = 1

  l_i = sum( (s_i + m)^2 * [s_i > -m and t_i <= 0] + (s_i - m)^2 * [s_i <= m and t_i > 0] )

over batch, positions and channels; the loss is `sum_i 2^(i - n + 1) * l_i / B * 3 / 1000`.

Stages. AB is a two-stage method: the benchmark trains the connectors and the student's body
(`get_feat_modules()`: everything but the classifier) on this loss alone for `init_epochs = 30`
epochs (`Pretrain`, SGD lr 0.05, momentum 0.9, weight decay 5e-4), then trains the student with
cross-entropy only: its main-stage loop sets `loss_kd = 0` for `abound` (helper/loops.py:171-173),
so the script's `-b 1` (scripts/run_cifar_distill.sh:21) multiplies zero. Hence the registered
feature weight 0; `__call__` still returns the AB loss, so a positive `feature_weight` adds it
to the main stage ("can also add loss to this stage", helper/loops.py:172).

Taps: the last tap of each stage both models have (`stage_pairs`), i.e. the benchmark's
`feat[1:-1]` for its ResNets and WRNs (the three stage outputs). For VGG the benchmark's
`feat[1:-1]` leaves out the first block, which is a stage of its own here (5 pairs, not 4).

Pre-activation. The benchmark calls its models with `preact=True` for AB, so it compares the
stage outputs *before* their last ReLU (for ResNets the residual sum, for WRNs the next BN1's
output, for VGG the last BN's output); afd_jax's taps are `ReLU(x)` of exactly those maps.
- Teacher: no change. The loss uses the teacher only through `t > 0` and `t <= 0`, and
  `ReLU(x) > 0` iff `x > 0`.
- Student: the connector sees `ReLU(x_s)`, not `x_s`. Where `x_s < 0` the student gets no
  gradient from AB and the connector sees 0 instead of the negative value. With an identity
  connector (student and teacher of equal widths, e.g. resnet56 -> resnet20, wrn_40_2 ->
  wrn_16_2, resnet32x4 -> resnet8x4, vgg13 -> vgg8) `s = ReLU(x_s) >= 0 > -m`, so every element
  whose teacher neuron is off costs at least m^2 = 1 (the original can drive it to 0 by pushing
  `x_s <= -m`); its gradient only pushes `x_s` down to 0. The margin is thus kept on the active
  side only; the learned boundary (student on iff teacher on) is the same. With a conv + BN
  connector the connector's output can still reach `-m`. Given the same inputs (a pre-activation
  tap from a model of your own) this module is the original exactly;
  tests/test_parity_pretrain_methods.py checks it on signed maps.
The student body of the stage is every parameter but the classifier (`models.classifier`).
For the WRNs the benchmark's `get_feat_modules()` also leaves out the final batch norm
(`bn1`), which its `init()` neither trains nor switches to training mode; here it trains and
its running statistics move during the stage (the WRN taps pass through it).
"""
from typing import List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.at import Pairs, check_index, stage_pairs
from afd_jax.layers import (BatchNorm, TorchConv, TorchConvTranspose, at_least_f32,
                            check_feature_pair)



class ConvReg(nn.Module):
  """CRD's `ConvReg(s_shape, t_shape, use_relu=False)`: a convolution to the teacher's channels
  and size, then batch norm. By the heights: `s = 2t`: 3x3 stride 2 pad 1; `2s = t`: a 4x4
  stride 2 pad 1 transposed convolution; `s >= t`: a valid convolution of kernel
  `(1 + s_H - t_H, 1 + s_W - t_W)` (1x1 for equal sizes). A smaller student map otherwise is an
  error, as in CRD."""
  features: int
  target_hw: Tuple[int, int]

  @nn.compact
  def __call__(self, x, train: bool):
    (s_h, s_w), (t_h, t_w) = x.shape[1:3], self.target_hw
    if s_h == 2 * t_h:
      y = TorchConv(self.features, (3, 3), stride=2, padding=1, name='conv')(x)
    elif 2 * s_h == t_h:
      y = TorchConvTranspose(self.features, 4, stride=2, padding=1, name='conv')(x)
    elif s_h >= t_h:
      y = TorchConv(self.features, (1 + s_h - t_h, 1 + s_w - t_w), name='conv')(x)
    else:
      raise ValueError(f'AB connector: a student map of {s_h} x {s_w} cannot be mapped to the '
                       f"teacher's {t_h} x {t_w} (CRD's ConvReg supports s = 2t, 2s = t, s >= t).")
    return BatchNorm(name='bn')(y, train)


def margin_loss(source: jax.Array, target: jax.Array, margin: float) -> jax.Array:
  """CRD's `criterion_alternative_l2`: the summed squared hinge on the activation boundary."""
  on = target > 0
  below = jnp.square(source + margin) * ((source > -margin) & ~on)
  above = jnp.square(source - margin) * ((source <= margin) & on)
  return jnp.sum(below + above)


class AB(nn.Module):
  """The AB loss with its connectors; `(loss, per_pair)` before the feature weight.

  `pretrain_loss` is the same loss (the benchmark's pre-training stage minimises it; the main
  stage does not use it at the default weight 0). Teacher features are constants. Connectors
  run in the mode `train` says (training: batch statistics, running estimates updated).

  Attributes:
    pairs: `(student index, teacher index)` into the feature lists, shallow to deep.
    margin: m (CRD's default 1).
  """
  pairs: Pairs
  margin: float = 1.0

  @nn.compact
  def __call__(self, student_features: Sequence[jax.Array],
               teacher_features: Sequence[jax.Array], train: bool):
    check_feature_pair(student_features, teacher_features)
    n = len(self.pairs)
    batch = student_features[0].shape[0]
    losses: List[jax.Array] = []
    for i, (s_idx, t_idx) in enumerate(self.pairs):
      check_index(s_idx, student_features, 'student index')
      check_index(t_idx, teacher_features, 'teacher index')
      f_s = at_least_f32(student_features[s_idx])
      f_t = jax.lax.stop_gradient(at_least_f32(teacher_features[t_idx]))
      if f_s.shape[-1] != f_t.shape[-1] or f_s.shape[1] != f_t.shape[1]:  # CRD: C and H
        f_s = ConvReg(f_t.shape[-1], tuple(f_t.shape[1:3]), name=f'connector_{i}')(f_s, train)
      elif f_s.shape[2] != f_t.shape[2]:
        raise ValueError(f'AB pair {i}: maps of equal height but widths {f_s.shape[2]} vs '
                         f'{f_t.shape[2]} (CRD would fail here too).')
      losses.append(2.0 ** (i - n + 1) * margin_loss(f_s, f_t, self.margin) / batch * 3 / 1000)
    per_pair = jnp.stack(losses)
    return jnp.sum(per_pair), per_pair

  def pretrain_loss(self, student_features, teacher_features, train: bool):
    return self(student_features, teacher_features, train)


def _build(config, setting: registry.Setting) -> AB:
  return AB(pairs=stage_pairs(setting.student_taps, setting.teacher_taps),
            margin=float(registry.option(config, 'ab', 'margin')))


registry.register(registry.Method(
    'ab', build=_build,
    # scripts/run_cifar_distill.sh:21 `--distill abound -a 0 -b 1`, but helper/loops.py:171-173
    # sets the main stage's AB term to 0: only CE trains after the pre-training stage.
    feature_weight=0.0,
    taps="the last tap of each stage (the benchmark's feat[1:-1]; post-ReLU here, pre-ReLU there)",
    source='CRD benchmark, scripts/run_cifar_distill.sh:21 --distill abound -a 0 -b 1; '
           'helper/loops.py:171-173 (main-stage AB term 0); helper/pretrain.py init() '
           '(30 epochs, lr 0.05, connectors + student body)',
    # helper/pretrain.py: SGD(lr=opt.learning_rate 0.05, momentum 0.9, weight_decay 5e-4) over
    # the connector and model_s.get_feat_modules() for opt.init_epochs = 30 (train_student.py:47).
    pretrain=registry.Pretrain(trains=('distiller', 'student_body'), method='pretrain_loss',
                               epochs=30, learning_rate=0.05, momentum=0.9, weight_decay=5e-4),
    options={'margin': 1.0}))  # ABLoss(feat_num, margin=1.0)
