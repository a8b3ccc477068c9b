"""Neuron selectivity transfer (Huang and Wang, 2017), polynomial kernel, as the CRD benchmark
runs it.

For each matched pair of stage-final taps (the benchmark's `feat[1:-1]`, the three stage
outputs, helper/loops.py:139-143: stage k of the student with stage k of the teacher), the
larger map is adaptive-average-pooled to the smaller size; each channel's `H*W` activations are
L2-normalised (`F.normalize`, eps 1e-12), `s_i` (C_s of them) and `t_j` (C_t); with the
polynomial kernel `k(x, y) = (x . y) ** 2`,
  loss_pair = mean_ij k(t_i, t_j) + mean_ij k(s_i, s_j) - 2 mean_ij k(s_i, t_j),
the squared MMD between the two sets of channel activations (means over batch and channel
pairs); the loss is the sum over pairs. The channel counts may differ.

Matches HobbitLong/RepDistiller `distiller_zoo/NST.py` (`NSTLoss`, `full_loss = True`). The
original compares heights only and pools to a square; here each axis is pooled to the smaller of
the two (the same on square maps, as at.py does). The kernels are computed as `B x C x C`
products instead of the original's `B x C x C x HW` broadcast (same values, summed in another
order).

On WRNs the maps are afd_jax's taps, ReLU(BN(.)) of the original's raw block outputs; this
and every other departure: docs/methods.md.
"""
from typing import List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.afd import l2_normalize
from afd_jax.distill.at import Pairs, paired_features, pool_nhwc, stage_pairs


def channel_activations(f: jax.Array) -> jax.Array:
  """`B x H x W x C` -> `B x C x HW`, each channel's activations L2-normalised."""
  x = jnp.swapaxes(f.reshape(f.shape[0], -1, f.shape[-1]), 1, 2)
  return l2_normalize(x, axis=2)


def poly_kernel_mean(a: jax.Array, b: jax.Array) -> jax.Array:
  """`mean_{batch, i, j} (a_i . b_j) ** 2` of `B x C_a x N` and `B x C_b x N`."""
  dots = jnp.einsum('bin,bjn->bij', a, b, precision=jax.lax.Precision.HIGHEST)
  return jnp.mean(jnp.square(dots))


def nst_pair_loss(f_s: jax.Array, f_t: jax.Array) -> jax.Array:
  """The NST loss of one pair of maps (the teacher's a constant)."""
  hw = (min(f_s.shape[1], f_t.shape[1]), min(f_s.shape[2], f_t.shape[2]))
  s = channel_activations(pool_nhwc(f_s, hw))
  t = channel_activations(pool_nhwc(f_t, hw))
  return (jax.lax.stop_gradient(poly_kernel_mean(t, t)) + poly_kernel_mean(s, s)
          - 2.0 * poly_kernel_mean(s, t))


class NST(nn.Module):
  """The NST loss; no parameters, no state.

  `apply({}, student_features, teacher_features, train)` returns `(loss, per_pair)`: `loss` is
  the sum over pairs before the feature weight, `per_pair` the pairs' losses (shape `P`).

  Attributes:
    pairs: `(student index, teacher index)` into the feature lists; None pairs feature i of
      the student with feature i of the teacher for every i both lists have.
  """
  pairs: Optional[Pairs] = None

  @nn.compact
  def __call__(self, student_features, teacher_features, train: bool):
    del train  # No parameters or statistics.
    losses: List[jax.Array] = [
        nst_pair_loss(f_s, f_t)
        for f_s, f_t in paired_features(self.pairs, student_features, teacher_features)]
    per_pair = jnp.stack(losses)
    return jnp.sum(per_pair), per_pair


# Weights: scripts/run_cifar_distill.sh:27 (`--distill nst -a 0 -b 50`; `-r` keeps its default
# 1, train_student.py:73). Inputs: feat_s[1:-1], feat_t[1:-1], the losses summed
# (helper/loops.py:139-143).
registry.register(registry.Method(
    'nst', build=lambda config, setting: NST(
        pairs=stage_pairs(setting.student_taps, setting.teacher_taps)),
    feature_weight=50.0, logit_weights=(1.0, 0.0),
    taps="the last tap of each stage, the student's stages paired with the teacher's",
    source='CRD benchmark, scripts/run_cifar_distill.sh:27: --distill nst -a 0 -b 50 '
           '(-r 1: train_student.py:73); stage outputs feat[1:-1]: helper/loops.py:139-143'))
