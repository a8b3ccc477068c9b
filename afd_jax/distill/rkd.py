"""Relational knowledge distillation (Park et al., CVPR 2019), distance and angle terms, as the
CRD benchmark runs it.

On the pooled embeddings (the classifiers' inputs, `B x D_s` and `B x D_t`; the benchmark's
`feat[-1]`, helper/loops.py:149-152):
  distance: d_ij = sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i . e_j, 1e-12)) for i != j, d_ii = 0;
            each model's d divided by the mean of its positive entries;
            L_d = smooth_l1(d_s, d_t)                       (mean over the B x B entries)
  angle:    a_ijk = <n(e_j - e_i), n(e_k - e_i)>, n(v) = v / max(|v|, 1e-12);
            L_a = smooth_l1(a_s, a_t)                       (mean over the B x B x B entries)
  loss = w_d L_d + w_a L_a, w_d = 25, w_a = 50 (RKD.py:10).
`smooth_l1` is PyTorch's with beta 1. The embeddings may have different widths; under `jit` the
batch is the global one. The angle term holds `B x B x D` differences, as the original does.

Matches HobbitLong/RepDistiller `distiller_zoo/RKD.py` (`RKDLoss`). Differences, all in
degenerate batches where the original gives NaN: a batch whose embeddings of one model are all
equal (no positive distance) leaves that model's distances unscaled instead of dividing 0 by 0;
a batch of one example is refused (ValueError).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.afd import l2_normalize
from afd_jax.distill.pkt import check_embeddings

HIGHEST = jax.lax.Precision.HIGHEST


def pairwise_distances(e: jax.Array) -> jax.Array:
  """`B x D` -> `B x B` Euclidean distances, by the original's expansion (zero diagonal)."""
  sq = jnp.sum(e * e, axis=1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(e, e.T, precision=HIGHEST)
  d = jnp.sqrt(jnp.maximum(d2, 1e-12))
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def normalized_distances(e: jax.Array) -> jax.Array:
  """`pairwise_distances(e)` over the mean of its positive entries."""
  d = pairwise_distances(e)
  positive = d > 0
  mean = jnp.sum(jnp.where(positive, d, 0.0)) / jnp.maximum(jnp.sum(positive), 1)
  return d / jnp.where(mean > 0, mean, 1.0)


def angles(e: jax.Array) -> jax.Array:
  """`B x D` -> `B x B x B`: `a[i, j, k]` the cosine of the angle (e_j - e_i, e_k - e_i)."""
  diff = l2_normalize(e[None, :, :] - e[:, None, :], axis=2)
  return jnp.einsum('ijd,ikd->ijk', diff, diff, precision=HIGHEST)


def smooth_l1(x: jax.Array, y: jax.Array) -> jax.Array:
  """PyTorch's F.smooth_l1_loss(x, y) (beta 1, mean over every entry)."""
  z = jnp.abs(x - y)
  return jnp.mean(jnp.where(z < 1.0, 0.5 * z * z, z - 0.5))


class RKD(nn.Module):
  """The RKD loss; no parameters, no state.

  `apply({}, student_features, teacher_features, train, student_embedding=...,
  teacher_embedding=...)` returns `(loss, (distance, angle))`: `loss` is `w_d * distance +
  w_a * angle`, before the feature weight. The feature maps are not used.

  Attributes:
    distance_weight, angle_weight: w_d and w_a.
  """
  distance_weight: float = 25.0
  angle_weight: float = 50.0

  @nn.compact
  def __call__(self, student_features, teacher_features, train: bool, *,
               student_embedding: jax.Array, teacher_embedding: jax.Array):
    del student_features, teacher_features, train  # Only the embeddings; no parameters.
    s, t = check_embeddings(student_embedding, teacher_embedding, 'rkd', min_batch=2)
    loss_d = smooth_l1(normalized_distances(s), normalized_distances(t))
    loss_a = smooth_l1(angles(s), angles(t))
    loss = self.distance_weight * loss_d + self.angle_weight * loss_a
    return loss, (loss_d, loss_a)


def _build(config, setting: registry.Setting) -> RKD:
  del setting
  return RKD(distance_weight=float(registry.option(config, 'rkd', 'distance_weight')),
             angle_weight=float(registry.option(config, 'rkd', 'angle_weight')))


# Weights: scripts/run_cifar_distill.sh:17 (`--distill rkd -a 0 -b 1`; `-r` keeps its default 1,
# train_student.py:73); w_d = 25, w_a = 50 inside the loss (distiller_zoo/RKD.py:10, the
# defaults train_student.py:206 keeps). Inputs: feat_s[-1], feat_t[-1] (helper/loops.py:149-152).
registry.register(registry.Method(
    'rkd', build=_build, feature_weight=1.0, logit_weights=(1.0, 0.0),
    taps="none: the student's and teacher's pooled embeddings (the classifiers' inputs)",
    inputs=('student_embedding', 'teacher_embedding'),
    source='CRD benchmark, scripts/run_cifar_distill.sh:17: --distill rkd -a 0 -b 1 '
           '(-r 1: train_student.py:73); w_d=25, w_a=50: distiller_zoo/RKD.py:10; '
           'embeddings feat[-1]: helper/loops.py:149-152',
    options={'distance_weight': 25.0, 'angle_weight': 50.0}))  # RKD.py:10: w_d=25, w_a=50
