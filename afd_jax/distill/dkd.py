"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu and Liang, CVPR 2022), as mdistiller.

A logit method: it uses no feature maps, only the student's and the teacher's logits and the
labels. With `p = softmax(z / T)` and `g` the label's class:

  TCKD = T^2 KL([p_t[g], 1 - p_t[g]] || [p_s[g], 1 - p_s[g]])         (target class, binary)
  NCKD = T^2 KL(softmax(z_t / T - 1000 [k = g]) || softmax(z_s / T - 1000 [k = g]))  (others)
  DKD  = min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD),

each KL summed over classes and averaged over the batch; the binary probabilities are the
masked sums of `p` (`cat_mask`) and the non-target distributions mask the label's logit with
-1000, as the original does. `epoch` is the 1-based epoch (mdistiller's trainer counts from 1).

Registered with feature weight 1.0 and logit weights (CE 1.0, KD 0.0): the objective is
`CE + DKD`, DKD's own alpha, beta and warm-up inside this loss, as mdistiller's
`DKD.forward_train` (`loss_ce = CE_WEIGHT * CE`, `loss_kd = warm-up * dkd_loss`).

Matches mdistiller/distillers/DKD.py (megvii-research/mdistiller @ a08d46f). Defaults from
mdistiller/engine/cfg.py:163-167 (CE_WEIGHT 1.0, ALPHA 1.0, BETA 8.0, T 4.0, WARMUP 20); BETA
is overridden per pair in mdistiller's configs/cifar100/dkd/*.yaml; configs/cifar100.py sets
those values for its pairs. Options (`config.dkd.*`): alpha, beta, temperature, warmup.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from afd_jax.distill import registry
from afd_jax.layers import at_least_f32

# mdistiller/engine/cfg.py:163-167.
CE_WEIGHT, ALPHA, BETA, TEMPERATURE, WARMUP = 1.0, 1.0, 8.0, 4.0, 20


def _kl_sum(p_target: jax.Array, log_q: jax.Array) -> jax.Array:
  """`sum(p log p - p log q)`, PyTorch's `kl_div(log_q, p, reduction='sum')` (0 log 0 = 0)."""
  return jnp.sum(xlogy(p_target, p_target) - p_target * log_q)


def dkd_parts(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
              temperature: float):
  """(TCKD, NCKD): each `T^2 * KL` summed over classes, divided by the batch size."""
  s = at_least_f32(student_logits) / temperature
  t = jax.lax.stop_gradient(at_least_f32(teacher_logits)) / temperature
  gt = jax.nn.one_hot(labels, s.shape[-1], dtype=s.dtype)
  other = 1.0 - gt
  batch = s.shape[0]

  def binary(p):  # the original's cat_mask: [p of the label, sum of the others]
    return jnp.stack([jnp.sum(p * gt, axis=1), jnp.sum(p * other, axis=1)], axis=1)

  b_s = binary(jax.nn.softmax(s, axis=1))
  b_t = binary(jax.nn.softmax(t, axis=1))
  tckd = _kl_sum(b_t, jnp.log(b_s)) * temperature ** 2 / batch
  p_t2 = jax.nn.softmax(t - 1000.0 * gt, axis=1)
  log_p_s2 = jax.nn.log_softmax(s - 1000.0 * gt, axis=1)
  nckd = _kl_sum(p_t2, log_p_s2) * temperature ** 2 / batch
  return tckd, nckd


class DKD(nn.Module):
  """The DKD loss (warm-up included); no parameters, no state.

  `apply({}, student_features, teacher_features, train, student_logits=..., teacher_logits=...,
  labels=..., epoch=...)` returns `(loss, parts)`: `loss` is `warm-up * (alpha * TCKD + beta *
  NCKD)`, `parts` is `[TCKD, NCKD]` before alpha, beta and the warm-up. Feature maps are
  ignored; teacher logits are constants.

  Attributes:
    alpha, beta: weights of the target-class and non-target-class terms.
    temperature: the softmax temperature T.
    warmup: epochs over which the loss weight rises linearly to 1 (`min(epoch / warmup, 1)`).
  """
  alpha: float = ALPHA
  beta: float = BETA
  temperature: float = TEMPERATURE
  warmup: float = WARMUP

  @nn.compact
  def __call__(self, student_features: Sequence[jax.Array],
               teacher_features: Sequence[jax.Array], train: bool, *,
               student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
               epoch: Optional[jax.Array] = None):
    del student_features, teacher_features, train  # a logit method
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
      raise ValueError(f'DKD needs B x classes student and teacher logits of one shape, got '
                       f'{student_logits.shape} and {teacher_logits.shape}.')
    tckd, nckd = dkd_parts(student_logits, teacher_logits, labels, self.temperature)
    warm = 1.0 if epoch is None else jnp.minimum(
        jnp.asarray(epoch, jnp.promote_types(tckd.dtype, jnp.float32)) / self.warmup, 1.0)
    return warm * (self.alpha * tckd + self.beta * nckd), jnp.stack([tckd, nckd])


def _build(config, setting: registry.Setting) -> DKD:
  if setting.num_classes == 1:
    raise ValueError('dkd needs at least 2 classes (its non-target term is over the others).')
  option = lambda key: float(registry.option(config, 'dkd', key))
  warmup = option('warmup')
  if warmup <= 0:
    raise ValueError(f'dkd.warmup must be positive (epochs), got {warmup}.')
  return DKD(alpha=option('alpha'),
             beta=option('beta'),
             temperature=option('temperature'), warmup=warmup)


registry.register(registry.Method(
    'dkd', build=_build, feature_weight=1.0, logit_weights=(CE_WEIGHT, 0.0),
    taps='none: the logits only (TCKD + NCKD on student/teacher logits and labels)',
    inputs=('student_logits', 'teacher_logits', 'labels', 'epoch'),
    source='mdistiller: mdistiller/engine/cfg.py:163-167 (CE 1, alpha 1, beta 8, T 4, warm-up '
           '20 epochs), beta per pair in configs/cifar100/dkd/*.yaml:19 (configs/cifar100.py); '
           'CE + DKD, the warm-up inside the DKD term',
    options={'alpha': ALPHA, 'beta': BETA, 'temperature': TEMPERATURE, 'warmup': float(WARMUP)},
    # beta per CIFAR-100 pair: mdistiller configs/cifar100/dkd/<pair>.yaml:19 (others keep 8).
    recipes={'cifar100': {(t, s): {'dkd.beta': beta} for (t, s), beta in {
        ('wrn40x2', 'wrn16x2'): 6.0, ('wrn40x2', 'wrn40x1'): 6.0, ('resnet56', 'resnet20'): 2.0,
        ('resnet110', 'resnet32'): 2.0, ('vgg13', 'vgg8'): 6.0}.items()}}))
