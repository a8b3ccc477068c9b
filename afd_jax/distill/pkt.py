"""Probabilistic knowledge transfer (Passalis and Tefas, ECCV 2018), as the CRD benchmark runs it.

On the pooled embeddings (the classifiers' inputs, `B x D_s` and `B x D_t`; the benchmark's
`feat[-1]`, helper/loops.py:153-156), each row is scaled to unit length,
`x_i <- x_i / (||x_i|| + 1e-7)`, and the cosine similarities are turned into conditional
probabilities over the batch:
  K_ij = (x_i . x_j + 1) / 2,   P_ij = K_ij / sum_j K_ij   (student: Q, teacher: P),
  loss = mean_ij P_ij * log((P_ij + 1e-7) / (Q_ij + 1e-7))      (mean over all B x B entries).
The embeddings may have different widths; under `jit` the batch is the global one.

Matches HobbitLong/RepDistiller `distiller_zoo/PKT.py` (`PKT.cosine_similarity_loss`), which
takes the code of the authors (github.com/passalis/probabilistic_kt). The one difference: an
all-zero embedding row gets a zero gradient here, where the original's gradient is NaN (the
derivative of its `sqrt` at 0); values agree. The original also zeroes NaNs after the
normalisation (`x[x != x] = 0`); they can only come from NaN inputs, and are zeroed here too.
"""
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.layers import at_least_f32

EPS = 1e-7  # PKT.cosine_similarity_loss(eps=0.0000001)


def check_embeddings(student_embedding, teacher_embedding, method: str,
                     min_batch: int = 1) -> Tuple[jax.Array, jax.Array]:
  """The two embeddings as float32 (or wider) `B x D` arrays, the teacher's a constant; a clear
  ValueError for a wrong rank, different batch sizes, or a batch under `min_batch`."""
  for what, e in (('student_embedding', student_embedding),
                  ('teacher_embedding', teacher_embedding)):
    if getattr(e, 'ndim', None) != 2:
      raise ValueError(f'{method}: {what} must be B x D, got shape {getattr(e, "shape", None)}.')
  if student_embedding.shape[0] != teacher_embedding.shape[0]:
    raise ValueError(f'{method}: student and teacher embeddings have different batch sizes: '
                     f'{student_embedding.shape[0]} vs {teacher_embedding.shape[0]}.')
  if student_embedding.shape[0] < min_batch:
    raise ValueError(f'{method} compares the examples of a batch and needs at least '
                     f'{min_batch} of them, got {student_embedding.shape[0]}.')
  return (at_least_f32(student_embedding),
          jax.lax.stop_gradient(at_least_f32(teacher_embedding)))


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """`||x||_2` along `axis` (keepdims), with a zero gradient where the norm is 0."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def conditional_probabilities(x: jax.Array) -> jax.Array:
  """`B x D` -> `B x B`: each row of `(cos + 1) / 2`, divided by its sum."""
  x = x / (safe_norm(x, axis=1) + EPS)
  x = jnp.where(jnp.isnan(x), 0.0, x)
  k = (jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST) + 1.0) / 2.0
  return k / jnp.sum(k, axis=1, keepdims=True)


def pkt_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """The PKT loss of two `B x D` embeddings (the teacher's gets no gradient)."""
  q = conditional_probabilities(student)
  p = jax.lax.stop_gradient(conditional_probabilities(teacher))
  return jnp.mean(p * jnp.log((p + EPS) / (q + EPS)))


class PKT(nn.Module):
  """The PKT loss; no parameters, no state.

  `apply({}, student_features, teacher_features, train, student_embedding=...,
  teacher_embedding=...)` returns `(loss, None)`, `loss` before the feature weight. The feature
  maps are not used (the method works on the embeddings).
  """

  @nn.compact
  def __call__(self, student_features, teacher_features, train: bool, *,
               student_embedding: jax.Array, teacher_embedding: jax.Array):
    del student_features, teacher_features, train  # Only the embeddings; no parameters.
    s, t = check_embeddings(student_embedding, teacher_embedding, 'pkt')
    return pkt_loss(s, t), None


# Weights: scripts/run_cifar_distill.sh:19 (`--distill pkt -a 0 -b 30000`; CE weight `-r` keeps
# its default 1, train_student.py:73). Inputs: feat_s[-1], feat_t[-1] (helper/loops.py:153-156).
registry.register(registry.Method(
    'pkt', build=lambda config, setting: PKT(),
    feature_weight=30000.0, logit_weights=(1.0, 0.0),
    taps="none: the student's and teacher's pooled embeddings (the classifiers' inputs)",
    inputs=('student_embedding', 'teacher_embedding'),
    source='CRD benchmark, scripts/run_cifar_distill.sh:19: --distill pkt -a 0 -b 30000 '
           '(-r 1: train_student.py:73); embeddings feat[-1]: helper/loops.py:153-156'))
