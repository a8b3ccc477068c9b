"""Optax optimizers and learning-rate schedules expressed in epochs.

SGD follows torch.optim.SGD: weight decay is added to the gradient before momentum, the
momentum buffer starts at the first gradient, and the learning rate scales the buffer.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from afd_jax.errors import UserError


def learning_rate_schedule(opt, steps_per_epoch: int, num_epochs: float) -> optax.Schedule:
  """`opt.schedule`: `step` (x decay_factor from each 1-based epoch of `decay_epochs`, as the
  official code's adjust_learning_rate), `cosine` (to 0 at the end) or `constant`; with an
  optional linear warm-up over `warmup_epochs`."""
  base = opt.learning_rate
  warmup = int(round(opt.warmup_epochs * steps_per_epoch))
  total = int(round(num_epochs * steps_per_epoch))
  if opt.schedule == 'step':
    boundaries = {int((e - 1) * steps_per_epoch): opt.decay_factor for e in opt.decay_epochs
                  if e >= 1}
    main = optax.piecewise_constant_schedule(
        base, {max(b - warmup, 0): f for b, f in boundaries.items()})
  elif opt.schedule == 'cosine':
    main = optax.cosine_decay_schedule(base, max(total - warmup, 1))
  elif opt.schedule == 'constant':
    main = optax.constant_schedule(base)
  else:
    raise UserError(f'optimizer.schedule must be step, cosine or constant, got {opt.schedule!r}.')
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def decay_mask(params, decay_bias_and_bn: bool) -> Callable:
  """Which parameters get weight decay: all (official), or only kernels/embeddings (ndim > 1)."""
  return jax.tree.map(lambda p: bool(decay_bias_and_bn or jnp.ndim(p) > 1), params)


def make_optimizer(opt, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum (optionally Nesterov) and PyTorch-style weight decay."""
  decay = optax.add_decayed_weights(
      opt.weight_decay, mask=lambda params: decay_mask(params, opt.decay_bias_and_bn))
  return optax.chain(decay, optax.sgd(schedule, momentum=opt.momentum or None,
                                      nesterov=opt.nesterov))
