"""Correlation congruence (Peng et al., ICCV 2019), as the CRD benchmark runs it.

The pooled embeddings (the classifiers' inputs, `B x D_s` and `B x D_t`; the benchmark's
`feat[-1]`, helper/loops.py:162-165) first pass through a linear head each, to `feat_dim` = 128
(train_student.py:81, 211-218: `LinearEmbed` of models/util.py:185, a plain `nn.Linear`, no
normalisation). With `delta = |head_s(e_s) - head_t(e_t)|` (`B x feat_dim`),
  loss = mean_{i < B-1} sum_k delta[i, k] * delta[i+1, k],
the correlation of consecutive examples of the batch (the authors' code, as the benchmark
restructured it). Both heads are the method's parameters and both learn (the benchmark trains
`embed_t` as well; only the teacher's embedding is a constant). Under `jit` the batch is the
global one, so consecutive examples may lie on different devices.

Matches HobbitLong/RepDistiller `distiller_zoo/CC.py` (`Correlation`) with the heads of
`models/util.py` (`LinearEmbed`), PyTorch's default `nn.Linear` init. A batch of one example,
for which the original's mean is NaN, is refused (ValueError).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.pkt import check_embeddings
from afd_jax.layers import linear

FEAT_DIM = 128  # train_student.py:81 (--feat_dim)


def correlation_loss(f_s: jax.Array, f_t: jax.Array) -> jax.Array:
  """`mean_i sum_k |f_s - f_t|[i, k] * |f_s - f_t|[i + 1, k]` over the `B - 1` neighbours."""
  delta = jnp.abs(f_s - f_t)
  return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))


class CC(nn.Module):
  """The CC loss with its two linear heads (params `embed_s`, `embed_t`: Dense, PyTorch init).

  `apply(variables, student_features, teacher_features, train, student_embedding=...,
  teacher_embedding=...)` returns `(loss, None)`, `loss` before the feature weight. The feature
  maps are not used.

  Attributes:
    feat_dim: the heads' output width.
  """
  feat_dim: int = FEAT_DIM

  @nn.compact
  def __call__(self, student_features, teacher_features, train: bool, *,
               student_embedding: jax.Array, teacher_embedding: jax.Array):
    del student_features, teacher_features, train  # No batch statistics.
    s, t = check_embeddings(student_embedding, teacher_embedding, 'cc', min_batch=2)
    f_s = linear(self.feat_dim, s.shape[1], name='embed_s')(s)
    f_t = linear(self.feat_dim, t.shape[1], name='embed_t')(t)
    return correlation_loss(f_s, f_t), None


def _build(config, setting: registry.Setting) -> CC:
  del setting
  feat_dim = int(registry.option(config, 'cc', 'feat_dim'))
  if feat_dim < 1:
    raise ValueError(f'cc.feat_dim must be a positive width, got {feat_dim}.')
  return CC(feat_dim=feat_dim)


# Weights: scripts/run_cifar_distill.sh:13 (`--distill correlation -a 0 -b 0.02`; `-r` keeps its
# default 1, train_student.py:73). Heads: train_student.py:211-218, feat_dim 128 at line 81.
# Inputs: the heads applied to feat_s[-1], feat_t[-1] (helper/loops.py:162-165).
registry.register(registry.Method(
    'cc', build=_build, feature_weight=0.02, logit_weights=(1.0, 0.0),
    taps="none: the student's and teacher's pooled embeddings (the classifiers' inputs), "
         'each through a linear head of its own',
    inputs=('student_embedding', 'teacher_embedding'),
    source='CRD benchmark, scripts/run_cifar_distill.sh:13: --distill correlation -a 0 -b 0.02 '
           '(-r 1: train_student.py:73); LinearEmbed heads to feat_dim 128: '
           'train_student.py:81,211-218; embeddings feat[-1]: helper/loops.py:162-165',
    options={'feat_dim': FEAT_DIM}))
