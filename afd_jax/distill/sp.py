"""Similarity-preserving distillation (Tung and Mori, ICCV 2019), as CRD's `Similarity`.

On one tap of each model (by default the last), `G = flatten(f) @ flatten(f).T` (`B x B`),
each row L2-normalised; the loss is `sum((G_t - G_s) ** 2) / B ** 2`. Under `jit` the batch is
the global one (over every device and host), so G compares every pair of the global batch.

On WRNs the maps are afd_jax's taps, ReLU(BN(.)) of the original's raw block outputs; this
and every other departure: docs/methods.md.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.afd import l2_normalize
from afd_jax.distill.at import check_index
from afd_jax.layers import at_least_f32, check_feature_pair


def similarity(f: jax.Array) -> jax.Array:
  """The row-normalised batch Gram matrix of `f` (`B x ...` -> `B x B`, float32 or wider)."""
  x = at_least_f32(f).reshape(f.shape[0], -1)
  gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)  # no TF32: B x B is cheap
  return l2_normalize(gram, axis=1)


class SP(nn.Module):
  """The SP loss; no parameters, no state.

  `apply({}, student_features, teacher_features, train)` returns `(loss, None)`, `loss` before
  the feature weight. Teacher features are constants. The two taps may differ in every axis but
  the batch.

  Attributes:
    student_tap, teacher_tap: indices into the feature lists (default: the last).
  """
  student_tap: int = -1
  teacher_tap: int = -1

  @nn.compact
  def __call__(self, student_features: Sequence[jax.Array],
               teacher_features: Sequence[jax.Array], train: bool):
    del train  # No parameters or statistics.
    check_feature_pair(student_features, teacher_features)
    check_index(self.student_tap, student_features, 'student_tap')
    check_index(self.teacher_tap, teacher_features, 'teacher_tap')
    g_s = similarity(student_features[self.student_tap])
    g_t = similarity(jax.lax.stop_gradient(teacher_features[self.teacher_tap]))
    batch = g_s.shape[0]
    return jnp.sum(jnp.square(g_t - g_s)) / batch ** 2, None


registry.register(registry.Method(
    'sp', build=lambda config, setting: SP(
        student_tap=len(setting.student_taps) - 1, teacher_tap=len(setting.teacher_taps) - 1),
    feature_weight=3000.0, taps='the last tap of each model',
    source='CRD benchmark, scripts/run_cifar_distill.sh: --distill similarity -a 0 -b 3000'))
