"""DeiT's distillation through a distillation token (Touvron et al., ICML 2021), as
facebookresearch/deit's `DistillationLoss`.

Two logit methods that read the student's distillation-token head `z_d` (`student_dist_logits`,
B x K) and the teacher's logits `z_t` (constants); the feature taps are not used:

  deit_hard:  CE(z_d, argmax_k z_t)
  deit_soft:  tau^2 * sum_{b,k} KL(softmax(z_t / tau) || softmax(z_d / tau)) / (B * K)

The soft term divides by the number of logits `B * K`, not by the batch size (DeiT's "legacy
PyTorch behaviour" of `outputs_kd.numel()`), and reads the teacher as log-probabilities
(`log_target=True`), as the original does.

DeiT's loss is `(1 - alpha) * base(z_cls, labels) + alpha * distill` with alpha 0.5 and the
base criterion on the class-token head. Both methods are registered with logit weights (CE 0.5,
KD 0) and feature weight 0.5, so afd_jax's objective `0.5 * CE + 0.5 * distill` (the CE on the
student's class-token logits) is DeiT's `DistillationLoss` with base criterion CE; for another
alpha set `loss.ce_weight = 1 - alpha` and `loss.feature_weight = alpha`.

Matches losses.py (facebookresearch/deit @ ae4dba9). Defaults from its main.py:131-133
(`--distillation-alpha 0.5`, `--distillation-tau 1.0`). Option (`config.deit_soft.tau`): tau.
Both need a student with a distillation token (`Method.needs_distillation_token`).
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.distill import registry
from afd_jax.distill.kd import cross_entropy
from afd_jax.layers import at_least_f32

ALPHA, TAU = 0.5, 1.0  # DeiT main.py:132-133
SOURCE = 'facebookresearch/deit: losses.py (DistillationLoss), main.py:131-133 (alpha 0.5, tau 1)'


def hard_distillation(dist_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Per-example CE of the distillation head against the teacher's top class (B,)."""
  targets = jnp.argmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
  logp = jax.nn.log_softmax(at_least_f32(dist_logits), axis=-1)
  return -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


def soft_distillation(dist_logits: jax.Array, teacher_logits: jax.Array,
                      tau: float) -> jax.Array:
  """Per-example `tau^2 * KL(p_t || p_s) / K` at temperature tau (B,); its batch mean is DeiT's
  `kl_div(..., reduction='sum', log_target=True) * tau^2 / numel`."""
  log_t = jax.nn.log_softmax(jax.lax.stop_gradient(at_least_f32(teacher_logits)) / tau, axis=-1)
  log_s = jax.nn.log_softmax(at_least_f32(dist_logits) / tau, axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  return kl * (tau * tau) / dist_logits.shape[-1]


class DeiTDistillation(nn.Module):
  """DeiT's distillation term; no parameters, no state.

  `apply({}, student_features, teacher_features, train, student_dist_logits=...,
  teacher_logits=...)` returns `(loss, per_example)`: `loss` the batch mean of `per_example`
  (B,). Feature maps are ignored (they may be empty); teacher logits are constants.

  Attributes:
    kind: 'hard' (CE against the teacher's argmax) or 'soft' (KL at temperature `tau`).
    tau: the soft term's temperature (unused by 'hard').
  """
  kind: str = 'hard'
  tau: float = TAU

  @nn.compact
  def __call__(self, student_features: Sequence[jax.Array],
               teacher_features: Sequence[jax.Array], train: bool, *,
               student_dist_logits: jax.Array, teacher_logits: jax.Array):
    del student_features, teacher_features, train  # a logit method
    if student_dist_logits is None:
      raise ValueError(f'deit_{self.kind} needs the logits of a distillation-token head; the '
                       'student has none.')
    if student_dist_logits.shape != teacher_logits.shape or student_dist_logits.ndim != 2:
      raise ValueError(f'deit_{self.kind} needs B x classes distillation-head and teacher '
                       f'logits of one shape, got {student_dist_logits.shape} and '
                       f'{teacher_logits.shape}.')
    if self.kind == 'hard':
      per_example = hard_distillation(student_dist_logits, teacher_logits)
    else:
      per_example = soft_distillation(student_dist_logits, teacher_logits, self.tau)
    return jnp.mean(per_example), per_example


def _build_hard(config, setting: registry.Setting) -> DeiTDistillation:
  del config, setting
  return DeiTDistillation(kind='hard')


def _build_soft(config, setting: registry.Setting) -> DeiTDistillation:
  del setting
  tau = float(registry.option(config, 'deit_soft', 'tau'))
  if not tau > 0:
    raise ValueError(f'deit_soft.tau must be positive, got {tau}.')
  return DeiTDistillation(kind='soft', tau=tau)


_INPUTS = ('student_dist_logits', 'teacher_logits')

registry.register(registry.Method(
    'deit_hard', build=_build_hard, feature_weight=ALPHA, logit_weights=(1.0 - ALPHA, 0.0),
    taps="none: the logits only (the student's distillation-token head, the teacher's logits)",
    inputs=_INPUTS,
    source=SOURCE + "; 'hard': CE(dist head, argmax teacher); (1 - alpha) CE + alpha distill"))

registry.register(registry.Method(
    'deit_soft', build=_build_soft, feature_weight=ALPHA, logit_weights=(1.0 - ALPHA, 0.0),
    taps="none: the logits only (the student's distillation-token head, the teacher's logits)",
    inputs=_INPUTS, options={'tau': TAU},
    source=SOURCE + "; 'soft': tau^2 KL / (B * K); (1 - alpha) CE + alpha distill"))
