"""Knowledge review (Chen, Liu, Zhao and Jia, CVPR 2021), ReviewKD, on CIFAR.

The student's features, deepest first, are fused by attention-based fusion (ABF) modules into
maps that each "review" all deeper levels, and every fused map is compared with the teacher's
map of its own level by the hierarchical context loss:

  ABF_k(x_k, r_{k+1}):  x = BN(conv1x1(x_k))                         (mid channels)
                        y = nearest(r_{k+1}, size of x)                (the deeper residual)
                        [a, b] = sigmoid(conv1x1([x, y]))              (two per-position weights)
                        r_k = nearest(a x + b y, size of teacher map k) (the next residual)
                        o_k = BN(conv3x3(r_k))                         (teacher's channels)
  The deepest level (the embedding) has no residual: r = BN(conv1x1(x)).
  hcl(o, t) = [mse(o, t) + sum_{l in 4, 2, 1; l < H} 2^-n(l) mse(pool_l(o), pool_l(t))] / (1 +
              sum 2^-n(l)), n(l) = 1, 2, 3 for the levels actually used; pool_l: adaptive
              average pooling to l x l; mse: mean over all elements.
  loss = min(1, (epoch - 1) / warmup) * sum_k hcl(o_k, t_k).

The warm-up is the original's `min(1, epoch / kd_warm_up)` with its 0-based epoch
(train.py:210, 225), our `epoch` being 1-based: the first epoch has no review loss.

Taps: the student's feature list is the last tap of every stage (`stage_final`) followed by
its pooled embedding (`student_embedding`, as a 1 x 1 map), and likewise for the teacher: for
the CIFAR ResNets and WRNs the layers of the original's lists (student `feat[1:]` = [f1, f2, f3, f4]
of `is_feat=True`, teacher `t_features[1:]` = [f1, f2, f3, f4]). Stage k of the student is
paired with stage k of the teacher; the two models must have equal stage counts (otherwise
the builder refuses). One difference: for the ResNets the original takes the teacher's
stage outputs *before* the last ReLU (`preact=True`, train.py:222); our taps are after it
(for WRNs, whose stage outputs have no ReLU, they are the same). For VGG our first stage is
block 0, which the original's VGG list (not in the repository) appears to skip.

ABF layout: mid channels `min(512, embedding width)`, output channels the teacher map's. The
residual is resized to the current student map's size and the output to the teacher map's
size (the original's hard-coded `shapes` and `out_shapes`, which are exactly those sizes for
its CIFAR pairs), with PyTorch's legacy 'nearest' rule; maps need not be square here.

Matches model/reviewkd.py (`ABF`, `ReviewKD`, `hcl`) and train.py of
dvlab-research/ReviewKD @ cede6ea, CIFAR-100. Defaults: loss weight 5 (script/reviewKD.sh:1
wrn-40-2 -> wrn-16-2, :7 resnet32x4 -> resnet8x4; 0.6 for resnet56 -> resnet20, :13; 1.0 for
resnet110 -> resnet32, :15; set `config.loss.feature_weight`), warm-up 20 epochs
(train.py:50), CE 1 (train.py:59), no KD on logits (`--use-kl` off).

On WRNs the maps are afd_jax's taps, ReLU(BN(.)) of the original's raw block outputs; this
and every other departure: docs/methods.md.
"""
from typing import List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from afd_jax.distill import registry
from afd_jax.distill.at import pool_nhwc
from afd_jax.layers import (BatchNorm, at_least_f32, check_feature_pair, conv, linear_bias_init,
                            linear_kernel_init)
from afd_jax.taps import stage_final

WARMUP = 20.0        # train.py:50 (--kd-warm-up 20.0)
LOSS_WEIGHT = 5.0    # script/reviewKD.sh:1 and :7 (--kd-loss-weight 5.0)
# nn.init.kaiming_uniform_(w, a=1): bound sqrt(3 / fan_in), variance 1 / fan_in.
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch's legacy 'nearest' source indices: min(floor(i * (in / out)), in - 1), float32."""
  if in_size == out_size:
    return np.arange(out_size)
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, in_size - 1)


def resize_nearest(x: jax.Array, hw: Tuple[int, int]) -> jax.Array:
  """`F.interpolate(x, hw, mode='nearest')` of a `B x H x W x C` map."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(hw):
    return x
  x = jnp.take(x, jnp.asarray(nearest_indices(h, hw[0])), axis=1)
  return jnp.take(x, jnp.asarray(nearest_indices(w, hw[1])), axis=2)


class ABF(nn.Module):
  """Attention-based fusion: returns `(output, residual)` as the original's `ABF.forward`."""
  mid_channels: int
  out_channels: int
  fuse: bool

  @nn.compact
  def __call__(self, x: jax.Array, residual: Optional[jax.Array], out_hw: Tuple[int, int],
               train: bool):
    x = conv(self.mid_channels, 1, padding=0, kernel_init=kaiming_uniform_a1, name='conv1')(x)
    x = BatchNorm(name='bn1')(x, train)
    if self.fuse:
      y = resize_nearest(residual, x.shape[1:3])
      fan_in = 2 * self.mid_channels
      z = nn.Conv(2, (1, 1), padding='VALID', use_bias=True, kernel_init=linear_kernel_init,
                  bias_init=linear_bias_init(fan_in), name='att_conv')(
                      jnp.concatenate([x, y], axis=-1))
      z = jax.nn.sigmoid(z)
      x = x * z[..., 0:1] + y * z[..., 1:2]
    x = resize_nearest(x, out_hw)
    out = conv(self.out_channels, 3, padding=1, kernel_init=kaiming_uniform_a1, name='conv2')(x)
    return BatchNorm(name='bn2')(out, train), x


def hcl_term(fs: jax.Array, ft: jax.Array) -> jax.Array:
  """The original's `hcl` for one pair of `B x H x W x C` maps of one shape."""
  loss = jnp.mean(jnp.square(fs - ft))
  cnt, tot = 1.0, 1.0
  for level in (4, 2, 1):
    if level >= fs.shape[1]:
      continue
    cnt /= 2.0
    diff = pool_nhwc(fs, (level, level)) - pool_nhwc(ft, (level, level))
    loss = loss + jnp.mean(jnp.square(diff)) * cnt
    tot += cnt
  return loss / tot


class ReviewKD(nn.Module):
  """The ReviewKD loss, warm-up included. `apply(variables, student_features, teacher_features,
  train, student_embedding=..., teacher_embedding=..., epoch=..., mutable=['batch_stats'])`
  returns `((loss, per_level), updates)`: `per_level` holds the hcl terms (shallowest first,
  the embedding last) before the warm-up. Teacher inputs are constants.

  Attributes:
    student_layers, teacher_layers: tap indices of the levels, shallowest first, one per level
      (None: every feature given).
    warmup: epochs of the linear warm-up (`min(1, (epoch - 1) / warmup)`; 0: none).
  """
  student_layers: Optional[Tuple[int, ...]] = None
  teacher_layers: Optional[Tuple[int, ...]] = None
  warmup: float = WARMUP

  @nn.compact
  def __call__(self, student_features: Sequence[jax.Array],
               teacher_features: Sequence[jax.Array], train: bool, *,
               student_embedding: jax.Array, teacher_embedding: jax.Array,
               epoch: Optional[jax.Array] = None):
    check_feature_pair(student_features, teacher_features)
    s_idx = self.student_layers or tuple(range(len(student_features)))
    t_idx = self.teacher_layers or tuple(range(len(teacher_features)))
    if len(s_idx) != len(t_idx):
      raise ValueError(f'reviewkd pairs student and teacher levels one to one: '
                       f'{len(s_idx)} student vs {len(t_idx)} teacher levels.')
    as_map = lambda e: at_least_f32(e).reshape(e.shape[0], 1, 1, -1)
    s: List[jax.Array] = ([at_least_f32(student_features[i]) for i in s_idx] +
                          [as_map(student_embedding)])
    t: List[jax.Array] = [jax.lax.stop_gradient(x) for x in
                          [at_least_f32(teacher_features[j]) for j in t_idx] +
                          [as_map(teacher_embedding)]]
    mid = min(512, s[-1].shape[-1])
    levels = len(s)
    outputs: List[Optional[jax.Array]] = [None] * levels
    residual = None
    for k in range(levels):  # deepest first; abf{k} is the original's abfs[k]
      level = levels - 1 - k
      outputs[level], residual = ABF(mid, t[level].shape[-1], fuse=k > 0, name=f'abf{k}')(
          s[level], residual, t[level].shape[1:3], train)
    per_level = jnp.stack([hcl_term(o, x) for o, x in zip(outputs, t)])
    loss = jnp.sum(per_level)
    if epoch is not None and self.warmup > 0:
      wide = jnp.promote_types(loss.dtype, jnp.float32)
      loss = loss * jnp.minimum((jnp.asarray(epoch, wide) - 1.0) / self.warmup, 1.0)
    return loss, per_level


def _build(config, setting: registry.Setting) -> ReviewKD:
  s_layers = tuple(stage_final(setting.student_taps))
  t_layers = tuple(stage_final(setting.teacher_taps))
  if len(s_layers) != len(t_layers):
    raise ValueError(f'reviewkd pairs stage k of the student with stage k of the teacher, but '
                     f'the student has {len(s_layers)} stages and the teacher {len(t_layers)}.')
  return ReviewKD(student_layers=s_layers, teacher_layers=t_layers,
                  warmup=float(registry.option(config, 'reviewkd', 'warmup')))


registry.register(registry.Method(
    'reviewkd', build=_build, feature_weight=LOSS_WEIGHT, logit_weights=(1.0, 0.0),
    taps="the last tap of every stage plus the pooled embedding, of both models, stage k with "
         "stage k",
    inputs=('student_embedding', 'teacher_embedding', 'epoch'),
    source='ReviewKD CIFAR-100: script/reviewKD.sh:1,7 (--kd-loss-weight 5.0; 0.6 for '
           'resnet56->resnet20 :13, 1.0 for resnet110->resnet32 :15), train.py:50 (warm-up 20 '
           'epochs), train.py:59 (CE 1), no KL',
    options={'warmup': WARMUP},  # epochs; 0: no warm-up
    recipes={'cifar100': {('resnet56', 'resnet20'): {'loss.feature_weight': 0.6},
                          ('resnet110', 'resnet32'): {'loss.feature_weight': 1.0}}}))
