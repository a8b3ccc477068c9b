"""Semantic calibration for cross-layer KD (Chen, Mei, Wang, Feng and Chen, AAAI 2021), SemCKD.

Every student layer i is regressed onto every teacher layer j, and a learned per-sample
attention over teacher layers weighs the pairs:

  G^s_i = F^s_i F^s_i^T,  G^t_j = F^t_j F^t_j^T          (B x B Gram matrices, F flattened)
  q_i = l2norm(MLP^q_i(G^s_i)),  k_j = l2norm(MLP^k_j(G^t_j))   (per sample: a row of G)
  alpha[b, i, :] = softmax_j(<q_i[b], k_j[b]>)
  d[b, i, j] = mean((AAEmbed_ij(s_i)[b] - t_j[b]) ** 2)  (over channels and positions)
  loss = sum_{b, i, j} alpha[b, i, j] d[b, i, j] / (B * S).

MLP (the original's `MLPEmbed`): Linear(N, 2 (N // 4)) -> ReLU -> Linear(-, N // 4) -> L2
normalisation, with N the (global) training batch size. AAEmbed: conv1x1(c_s -> 2 c_t) -> BN ->
ReLU -> conv3x3 -> BN -> ReLU -> conv1x1(-> c_t). Per pair, the map with the larger height is
adaptive-average-pooled to the other's size before the regressor (the student) or as the
target (the teacher), as the original.

Taps: the last tap of every stage of each model (`stage_final`): for the CIFAR ResNets and WRNs
the layers of the benchmark's `feat[1:-1]` (the stage outputs; its `feat[0]` is the stem, not a tap
here). For VGG, whose first tap is block 0, this includes block 0, which `feat[1:-1]` does not.
The student and teacher may have different numbers of stages.

The attention is returned as `aux`, `B x T x S` (teacher layer x student layer, as AFD's; the
original's `B x S x T` transposed: each column sums to 1), so the engine records and plots it.

Differences from the original (models/util.py `SelfA`, `MLPEmbed`, `AAEmbed` and
distiller_zoo/SemCKD.py of DefangChen/SemCKD @ ebe5db1), with the reasons:
- The MLPs' input width is the batch size N fixed at build time (`config.semckd.batch_size`;
  its default -1 takes `config.batch_size`, else 64), as the original builds `SelfA` with
  `opt.batch_size` (train_student.py:271) and skips every batch smaller than N
  (helper/loops.py:105); here a batch of B < N examples uses the first B input rows of the
  first Linear (the Gram rows zero-padded to N), so initialising with a small batch and
  computing on a last, smaller batch both work. A batch larger than N is a ValueError.
- The L2 normalisation divides by max(norm, 1e-12) (the original divides by the norm): the
  same numbers except at an all-zero vector.
- Maps that are not square are pooled per axis (the original pools to `(H, H)`).
Default weight: beta 400 with CE 1 and KD 1 (T 4): scripts/run_cifar_distill.sh:25
(`--distill semckd -r 1 -a 1 -b 400`), train_student.py:78-83 (`-r` gamma, `-a` alpha, `-b`
beta, `--kd_T 4`), helper/loops.py:182 (`gamma * CE + alpha * KD + beta * SemCKD`).

On WRNs the maps are afd_jax's taps, ReLU(BN(.)) of the original's raw block outputs; this
and every other departure: docs/methods.md.
"""
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.afd import l2_normalize
from afd_jax.distill.at import pool_nhwc
from afd_jax.layers import (BatchNorm, at_least_f32, check_feature_pair, conv, linear_bias_init,
                            linear_kernel_init)
from afd_jax.taps import stage_final

DEFAULT_BATCH_SIZE = 64  # train_student.py:47 (--batch_size 64), one GPU


class MLPEmbed(nn.Module):
  """Linear(N, 2h) -> ReLU -> Linear(2h, h) -> L2 normalisation, h = N // 4 (`MLPEmbed`).

  The input may have fewer than N columns (a smaller batch): the first Linear then uses its
  first rows only, as if the input were zero-padded to N.
  """
  batch_size: int

  @nn.compact
  def __call__(self, gram: jax.Array) -> jax.Array:
    n, width = self.batch_size, gram.shape[-1]
    if width > n:
      raise ValueError(f'semckd was built for batches of at most {n} examples '
                       f'(config.semckd.batch_size or config.batch_size), got {width}.')
    hidden = n // 4
    k1 = self.param('linear1_kernel', linear_kernel_init, (n, 2 * hidden), jnp.float32)
    b1 = self.param('linear1_bias', linear_bias_init(n), (2 * hidden,), jnp.float32)
    k2 = self.param('linear2_kernel', linear_kernel_init, (2 * hidden, hidden), jnp.float32)
    b2 = self.param('linear2_bias', linear_bias_init(2 * hidden), (hidden,), jnp.float32)
    x = nn.relu(gram @ k1[:width] + b1)
    return l2_normalize(x @ k2 + b2)


class AAEmbed(nn.Module):
  """conv1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv1x1, no biases (`AAEmbed`)."""
  out_channels: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    mid = 2 * self.out_channels
    init = linear_kernel_init  # PyTorch's default Conv2d init (kaiming_uniform, a = sqrt 5)
    x = conv(mid, 1, padding=0, kernel_init=init, name='conv0')(x)
    x = nn.relu(BatchNorm(name='bn1')(x, train))
    x = conv(mid, 3, padding=1, kernel_init=init, name='conv3')(x)
    x = nn.relu(BatchNorm(name='bn4')(x, train))
    return conv(self.out_channels, 1, padding=0, kernel_init=init, name='conv6')(x)


def gram(f: jax.Array) -> jax.Array:
  """`F F^T` of the flattened map: `B x ...` -> `B x B` (the flattening order does not matter)."""
  x = at_least_f32(f).reshape(f.shape[0], -1)
  return jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)


class SemCKD(nn.Module):
  """The SemCKD loss. `apply(variables, student_features, teacher_features, train,
  mutable=['batch_stats'])` returns `((loss, attention), updates)`: `loss` before the feature
  weight, `attention` `B x T x S` (teacher layer x student layer).

  Attributes:
    student_layers, teacher_layers: tap indices of the layers used (None: every feature given).
    batch_size: N, the width of the attention MLPs' input (the training batch size).
  """
  student_layers: Optional[Tuple[int, ...]] = None
  teacher_layers: Optional[Tuple[int, ...]] = None
  batch_size: int = DEFAULT_BATCH_SIZE

  def attention_layers(self, num_teacher: int, num_student: int):
    """(teacher tap indices, student tap indices) of the attention's rows and columns."""
    return (tuple(range(num_teacher)) if self.teacher_layers is None else self.teacher_layers,
            tuple(range(num_student)) if self.student_layers is None else self.student_layers)

  @nn.compact
  def __call__(self, student_features: Sequence[jax.Array],
               teacher_features: Sequence[jax.Array], train: bool):
    check_feature_pair(student_features, teacher_features)
    t_idx, s_idx = self.attention_layers(len(teacher_features), len(student_features))
    f_s = [at_least_f32(student_features[i]) for i in s_idx]
    f_t = [jax.lax.stop_gradient(at_least_f32(teacher_features[j])) for j in t_idx]
    batch = f_s[0].shape[0]

    query = jnp.stack([MLPEmbed(self.batch_size, name=f'query_weight{i}')(gram(f))
                       for i, f in enumerate(f_s)], 1)                       # B x S x d
    key = jnp.stack([MLPEmbed(self.batch_size, name=f'key_weight{j}')(gram(f))
                     for j, f in enumerate(f_t)], 1)                         # B x T x d
    energy = jnp.einsum('bsd,btd->bst', query, key)
    weight = jax.nn.softmax(energy, axis=-1)                                 # B x S x T

    rows = []
    for i, s in enumerate(f_s):
      row = []
      for j, t in enumerate(f_t):
        if s.shape[1] > t.shape[1]:  # the original compares heights
          s_in, target = pool_nhwc(s, t.shape[1:3]), t
        else:
          s_in, target = s, pool_nhwc(t, s.shape[1:3])
        value = AAEmbed(t.shape[-1], name=f'regressor{i}_{j}')(s_in, train)
        row.append(jnp.mean(jnp.square(value - target).reshape(batch, -1), axis=1))
      rows.append(jnp.stack(row, 1))
    distances = jnp.stack(rows, 1)                                            # B x S x T
    loss = jnp.sum(weight * distances) / (batch * len(f_s))
    return loss, jnp.swapaxes(weight, 1, 2)


def _build(config, setting: registry.Setting) -> SemCKD:
  batch = registry.option(config, 'semckd', 'batch_size')
  if batch == -1:  # the run's (global) batch size; the benchmark's config has none
    batch = getattr(config, 'batch_size', DEFAULT_BATCH_SIZE)
  if int(batch) < 4:
    raise ValueError(f'semckd needs a batch size of at least 4 (its MLPs have batch // 4 '
                     f'outputs), got {batch}.')
  return SemCKD(student_layers=tuple(stage_final(setting.student_taps)),
                teacher_layers=tuple(stage_final(setting.teacher_taps)),
                batch_size=int(batch))


registry.register(registry.Method(
    'semckd', build=_build, feature_weight=400.0, logit_weights=(1.0, 1.0),
    taps='the last tap of every stage of each model (all student x teacher stage pairs)',
    source='SemCKD: scripts/run_cifar_distill.sh:25 (--distill semckd -r 1 -a 1 -b 400), '
           'train_student.py:78-83 (KD at T 4), helper/loops.py:182',
    options={'batch_size': -1},  # -1: config.batch_size
    attention=True))
