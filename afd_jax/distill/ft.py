"""Factor transfer (Kim et al., NeurIPS 2018), as the CRD benchmark runs it (`--distill factor`).

Matches HobbitLong/RepDistiller `distiller_zoo/FT.py` (`FactorTransfer(p1=2, p2=1)`),
`models/util.py` (`Paraphraser(t_shape, k=0.5, use_bn=False)`, `Translator(s_shape, t_shape,
k=0.5, use_bn=True)`) and the `factor` branches of `helper/pretrain.py`, `train_student.py` and
`helper/loops.py`.

Both work on one tap of each model, by default the last (the benchmark's `feat[-2]`, the last
stage's output). With `c = int(k * C_t)` channels of factors (rate k = 0.5), all convolutions
3x3, stride 1, padding 1, with bias, and LeakyReLU slope 0.1 (`lrelu`):
- paraphraser encoder `E`: conv(C_t -> C_t), lrelu, conv(C_t -> c), lrelu, conv(c -> c), lrelu;
  decoder `D`: conv-transpose(c -> c), lrelu, conv-transpose(c -> C_t), lrelu,
  conv-transpose(C_t -> C_t), lrelu (no batch norm: `use_bn=False`).
- translator `T` (on the student): conv(C_s -> C_s), BN, lrelu, conv(C_s -> c), BN, lrelu,
  conv(c -> c), BN, lrelu.

Pre-training stage (`pretrain_loss`, helper/pretrain.py): `mean((D(E(f_t)) - f_t)^2)`
(`nn.MSELoss`), which trains the paraphraser only, for 30 epochs with SGD lr 0.01 (CRD's rate
for ResNet and WRN students; 0.05 for VGG and ResNet50 students: set `config.pretrain.
learning_rate`), momentum 0.9, weight decay 5e-4.

Main stage (`__call__`): with `F(x) = l2normalize(flatten_hw(mean_c(x^2)))` (CRD's `factor`,
p1 = 2: AT's attention map, `at.attention_map`), the loss is `mean(|F(T(f_s)) - F(E(f_t))|)`
(p2 = 1) over batch and positions; when the maps' sizes differ, the larger factor map is
adaptive-average-pooled to the smaller size (CRD pools to a square of the smaller height; here
each axis is pooled to the smaller of the two, the same for square maps). Weight 200
(scripts/run_cifar_distill.sh:23). The translator trains with the student; the paraphraser is
frozen (train_student.py:251-253 leave it out of the optimizer).

Freezing the paraphraser: the stage trains only the paraphraser
(`Pretrain.distiller_params`), and the main stage leaves it as the stage left it
(`Pretrain.frozen_after`: no update, no weight decay), as the benchmark keeps it out of the main
optimizer. Its factor of the teacher is a constant (no gradient reaches it; the benchmark
computes one and never applies it).

On WRNs the maps are afd_jax's taps, ReLU(BN(.)) of the original's raw block outputs; this
and every other departure: docs/methods.md.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.at import attention_map, check_index, pool_nhwc
from afd_jax.layers import (BatchNorm, TorchConv, TorchConvTranspose, at_least_f32,
                            check_feature_pair)

LEAK = 0.1


class Encoder(nn.Module):
  """Three 3x3 convolutions (to `channels[i]`), each followed by LeakyReLU(0.1), and by batch
  norm before it when `batch_norm` (the translator) - the paraphraser's encoder has none."""
  channels: tuple
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, c in enumerate(self.channels):
      x = TorchConv(c, (3, 3), padding=1, name=f'conv{i}')(x)
      if self.batch_norm:
        x = BatchNorm(name=f'bn{i}')(x, train)
      x = nn.leaky_relu(x, LEAK)
    return x


class Decoder(nn.Module):
  """The paraphraser's decoder: three 3x3 stride-1 transposed convolutions, each + LeakyReLU."""
  channels: tuple

  @nn.compact
  def __call__(self, x):
    for i, c in enumerate(self.channels):
      x = nn.leaky_relu(TorchConvTranspose(c, 3, stride=1, padding=1, name=f'conv{i}')(x), LEAK)
    return x


class FT(nn.Module):
  """Factor transfer: `(loss, None)` before the feature weight (see the module docstring).

  Variables: params `paraphraser_encoder`, `paraphraser_decoder` and `translator`; batch_stats the
  translator's batch norms.

  Attributes:
    student_tap, teacher_tap: indices into the feature lists (default: the last).
    rate: k, the factor's channels per teacher channel (CRD 0.5).
    p: the exponent of the factor distance (CRD's p2 = 1: mean absolute difference).
  """
  student_tap: int = -1
  teacher_tap: int = -1
  rate: float = 0.5
  p: int = 1

  def _taps(self, student_features, teacher_features):
    check_feature_pair(student_features, teacher_features)
    check_index(self.student_tap, student_features, 'student_tap')
    check_index(self.teacher_tap, teacher_features, 'teacher_tap')
    f_s = at_least_f32(student_features[self.student_tap])
    f_t = jax.lax.stop_gradient(at_least_f32(teacher_features[self.teacher_tap]))
    return f_s, f_t

  @nn.compact
  def __call__(self, student_features, teacher_features, train: bool, pretrain: bool = False):
    f_s, f_t = self._taps(student_features, teacher_features)
    c_t = f_t.shape[-1]
    c = int(c_t * self.rate)
    if c < 1:
      raise ValueError(f'FT: rate {self.rate} leaves no factor channels of {c_t}.')
    encoder = Encoder((c_t, c, c), name='paraphraser_encoder')
    initializing = self.is_initializing()
    loss: Optional[jax.Array] = None
    if pretrain or initializing:  # the paraphraser reconstructs the teacher's map
      rec = Decoder((c, c_t, c_t), name='paraphraser_decoder')(encoder(f_t))
      loss = jnp.mean(jnp.square(rec - f_t))
      if pretrain:
        return loss, None
    # Main stage: the frozen paraphraser's factor of the teacher, the translator's of the student.
    factor_t = jax.lax.stop_gradient(encoder(f_t))
    factor_s = Encoder((f_s.shape[-1], c, c), batch_norm=True, name='translator')(f_s, train)
    hw = (min(factor_s.shape[1], factor_t.shape[1]), min(factor_s.shape[2], factor_t.shape[2]))
    diff = attention_map(pool_nhwc(factor_s, hw)) - attention_map(pool_nhwc(factor_t, hw))
    return jnp.mean(jnp.abs(diff) if self.p == 1 else diff ** self.p), None

  def pretrain_loss(self, student_features, teacher_features, train: bool):
    """The paraphraser's reconstruction loss, `mean((D(E(f_t)) - f_t)^2)`."""
    return self(student_features, teacher_features, train, pretrain=True)


def _build(config, setting: registry.Setting) -> FT:
  option = registry.option
  return FT(student_tap=len(setting.student_taps) - 1, teacher_tap=len(setting.teacher_taps) - 1,
            rate=float(option(config, 'ft', 'rate')), p=int(option(config, 'ft', 'p')))


registry.register(registry.Method(
    'ft', build=_build, feature_weight=200.0,  # scripts/run_cifar_distill.sh:23: -a 0 -b 200
    taps="the last tap of each model (the benchmark's feat[-2], the last stage's output)",
    source='CRD benchmark, scripts/run_cifar_distill.sh:23 --distill factor -a 0 -b 200; '
           'helper/pretrain.py init() (30 epochs, lr 0.01, the paraphraser only)',
    # helper/pretrain.py: lr 0.01 for ResNet/WRN students with 'factor' (else opt.learning_rate),
    # momentum 0.9, weight decay 5e-4, opt.init_epochs = 30 (train_student.py:47); only the
    # paraphraser is in init_trainable_list (train_student.py:244-248).
    pretrain=registry.Pretrain(trains=('distiller',), method='pretrain_loss', epochs=30,
                               learning_rate=0.01, momentum=0.9, weight_decay=5e-4,
                               distiller_params=('paraphraser_encoder', 'paraphraser_decoder'),
                               frozen_after=('paraphraser_encoder', 'paraphraser_decoder')),
    options={'rate': 0.5, 'p': 1},  # Paraphraser/Translator k=0.5; FactorTransfer p2=1
    # The paraphraser's rate is the main one (0.05) for the benchmark's VGG students.
    recipes={'cifar100': {('*', s): {'pretrain.learning_rate': 0.05} for s in ('vgg8', 'vgg13')}}))
