"""Logit losses: cross-entropy and Hinton's knowledge distillation."""
from typing import Optional

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
  s = at_least_f32(student_logits) / temperature
  p_t = jax.nn.softmax(t, axis=-1)
  kl = xlogy(p_t, p_t) - p_t * jax.nn.log_softmax(s, axis=-1)
  return jnp.sum(kl) * temperature ** 2 / student_logits.shape[0]
