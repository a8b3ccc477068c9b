"""Logit losses: cross-entropy and Hinton's knowledge distillation, from one teacher or several."""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from afd_jax.layers import at_least_f32


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  mask: Optional[jax.Array] = None) -> jax.Array:
  """Mean softmax cross-entropy of integer `labels` (over examples where `mask` is set)."""
  logp = jax.nn.log_softmax(at_least_f32(logits), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if mask is None:
    return jnp.mean(nll)
  mask = mask.astype(nll.dtype)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy of soft `targets` (B x classes, rows summing to 1): mixup/cutmix and
  label-smoothed targets (timm's SoftTargetCrossEntropy)."""
  logp = jax.nn.log_softmax(at_least_f32(logits), axis=-1)
  return jnp.mean(-jnp.sum(targets.astype(logp.dtype) * logp, axis=-1))


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
            temperature: float = 4.0) -> jax.Array:
  """Hinton KD: `T**2 * KL(softmax(t / T) || softmax(s / T))`, summed over classes, batch mean.

  The teacher logits are constants (no gradient flows into them).
  """
  t = jax.lax.stop_gradient(at_least_f32(teacher_logits)) / temperature
  p_t = jax.nn.softmax(t, axis=-1)
  return kl_to_probabilities(p_t, student_logits, temperature)


def kl_to_probabilities(p_t: jax.Array, student_logits: jax.Array,
                        temperature: float) -> jax.Array:
  """`T**2 * KL(p_t || softmax(s / T))`, summed over classes, batch mean."""
  s = at_least_f32(student_logits) / temperature
  kl = xlogy(p_t, p_t) - p_t * jax.nn.log_softmax(s, axis=-1)
  return jnp.sum(kl) * temperature ** 2 / student_logits.shape[0]


# How KD combines several teachers (`config.loss.kd_over_teachers`).
KD_OVER_TEACHERS = ('average', 'sum')


def ensemble_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                     weights: Sequence[float], temperature: float = 4.0,
                     over_teachers: str = 'average') -> jax.Array:
  """KD from `K x B x C` teacher logits with one weight per teacher (normalised to sum 1).

  'average': KL to the weighted average of the teachers' tempered probabilities (an ensemble
  in probability space); 'sum': the weighted sum of each teacher's own KD (big_vision's
  distillation of several teachers sums their KLs). With one teacher both are `kd_loss`.
  """
  if over_teachers not in KD_OVER_TEACHERS:
    raise ValueError(f'kd_over_teachers must be one of {", ".join(KD_OVER_TEACHERS)}, '
                     f'got {over_teachers!r}.')
  w = jnp.asarray(weights, jnp.float32)
  w = w / jnp.sum(w)
  t = jax.lax.stop_gradient(at_least_f32(teacher_logits)) / temperature
  p_t = jax.nn.softmax(t, axis=-1)                                   # K x B x C
  if over_teachers == 'average':
    return kl_to_probabilities(jnp.einsum('k,kbc->bc', w, p_t), student_logits, temperature)
  each = jnp.stack([kl_to_probabilities(p_t[k], student_logits, temperature)
                    for k in range(p_t.shape[0])])
  return jnp.sum(w * each)
