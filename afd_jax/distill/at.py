"""Attention transfer (Zagoruyko and Komodakis, ICLR 2017), p = 2, as the CRD benchmark runs it.

For each matched pair of stage-final taps, `at(f) = l2normalize(flatten_hw(mean_c(f ** 2)))`
and the pair's loss is `mean((at(s) - at(t)) ** 2)` over batch and positions; the loss is the
sum over pairs. The attention maps are AFD's value maps (`spatial_energy`, `l2_normalize`).

On WRNs the maps are afd_jax's taps, ReLU(BN(.)) of the original's raw block outputs; this
and every other departure: docs/methods.md.
"""
from typing import List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.afd import l2_normalize, spatial_energy
from afd_jax.distill.pooling import adaptive_avg_pool2d
from afd_jax.layers import at_least_f32, check_feature_pair
from afd_jax.taps import Tap, stage_final

Pairs = Tuple[Tuple[int, int], ...]


def check_index(index: int, features: Sequence, what: str) -> None:
  if not -len(features) <= index < len(features):
    raise ValueError(f'{what} {index} is out of range for {len(features)} feature maps.')


def paired_features(pairs: Optional[Pairs], student_features: Sequence[jax.Array],
                    teacher_features: Sequence[jax.Array]) -> List[Tuple[jax.Array, jax.Array]]:
  """`(student map, teacher map)` of each pair, float32 or wider, the teacher's a constant;
  `pairs` None pairs feature i with feature i for every i both lists have. Shared by the
  methods that compare pairs of taps (AT, NST, VID)."""
  check_feature_pair(student_features, teacher_features)
  if pairs is None:
    pairs = tuple((i, i) for i in range(min(len(student_features), len(teacher_features))))
  out = []
  for s_idx, t_idx in pairs:
    check_index(s_idx, student_features, 'student index')
    check_index(t_idx, teacher_features, 'teacher index')
    out.append((at_least_f32(student_features[s_idx]),
                jax.lax.stop_gradient(at_least_f32(teacher_features[t_idx]))))
  return out


def pool_nhwc(f: jax.Array, hw: Tuple[int, int]) -> jax.Array:
  """PyTorch's adaptive average pooling of a `B x H x W x C` map to `hw`."""
  if tuple(f.shape[1:3]) == tuple(hw):
    return f
  return jnp.moveaxis(adaptive_avg_pool2d(jnp.moveaxis(f, -1, 1), hw), 1, -1)


def attention_map(f: jax.Array) -> jax.Array:
  """`l2normalize(flatten_hw(mean_c(f ** 2)))`: `B x H x W x C` -> `B x HW` (float32 or wider)."""
  return l2_normalize(spatial_energy(f).reshape(f.shape[0], -1))


def stage_pairs(student_taps: Sequence[Tap], teacher_taps: Sequence[Tap]) -> Pairs:
  """`(student index, teacher index)` of the stage-final taps of every stage both models have.

  Stage k of the student is matched with stage k of the teacher (`Tap.stage`, `stage_final`).
  """
  s_final = {student_taps[i].stage: i for i in stage_final(student_taps)}
  t_final = {teacher_taps[i].stage: i for i in stage_final(teacher_taps)}
  common = sorted(set(s_final) & set(t_final))
  if not common:
    raise ValueError('student and teacher taps share no stage: '
                     f'{sorted(s_final)} vs {sorted(t_final)}.')
  return tuple((s_final[k], t_final[k]) for k in common)


class AT(nn.Module):
  """Attention-transfer loss; no parameters, no state.

  `apply({}, student_features, teacher_features, train)` returns `(loss, per_pair)`: `loss` is
  the sum over pairs before the feature weight, `per_pair` the pairs' losses (shape `P`).
  Teacher features are constants. When a pair's maps differ in size, the larger *feature map*
  (before squaring) is adaptive-average-pooled to the smaller size, as CRD does (CRD compares
  heights only and pools to a square; here each axis is pooled to the smaller of the two).

  Attributes:
    pairs: `(student index, teacher index)` into the feature lists; None pairs feature i of
      the student with feature i of the teacher for every i both lists have.
  """
  pairs: Optional[Pairs] = None

  @nn.compact
  def __call__(self, student_features: Sequence[jax.Array],
               teacher_features: Sequence[jax.Array], train: bool):
    del train  # No parameters or statistics.
    losses: List[jax.Array] = []
    for f_s, f_t in paired_features(self.pairs, student_features, teacher_features):
      hw = (min(f_s.shape[1], f_t.shape[1]), min(f_s.shape[2], f_t.shape[2]))
      a_s, a_t = attention_map(pool_nhwc(f_s, hw)), attention_map(pool_nhwc(f_t, hw))
      losses.append(jnp.mean(jnp.square(a_s - a_t)))
    per_pair = jnp.stack(losses)
    return jnp.sum(per_pair), per_pair


registry.register(registry.Method(
    'at', build=lambda config, setting: AT(
        pairs=stage_pairs(setting.student_taps, setting.teacher_taps)),
    feature_weight=1000.0,
    taps="the last tap of each stage, the student's last stages paired with the teacher's",
    source='CRD benchmark, scripts/run_cifar_distill.sh: --distill attention -a 0 -b 1000'))
