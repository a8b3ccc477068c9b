"""Optax optimizers and learning-rate schedules expressed in epochs.

`sgd` follows torch.optim.SGD: weight decay is added to the gradient before momentum, the
momentum buffer starts at the first gradient, and the learning rate scales the buffer.
`adamw` is torch.optim.AdamW (decoupled weight decay, scaled by the learning rate), with timm's
and DeiT's parameter groups: no decay on biases, norms (ndim <= 1) and `NO_DECAY_NAMES`.
Either may clip gradients to a global norm first (`clip_grad_norm`). Keys missing from `opt`
take their defaults (configs/base.py), so older configs keep their exact behaviour.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from afd_jax.errors import UserError

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('step', 'cosine', 'constant')
NO_DECAY_NAMES = ('bias', 'pos_embed', 'cls_token', 'dist_token')  # timm's no_weight_decay
DEFAULTS = dict(name='sgd', lr_batch_scale=0.0, b1=0.9, b2=0.999, eps=1e-8, clip_grad_norm=0.0,
                warmup_init_lr=0.0, min_learning_rate=0.0)


def option(opt, key: str):
  """`opt.key`, or its default where the config has no such key."""
  return getattr(opt, key, DEFAULTS[key])


def check(opt) -> None:
  """Refuses bad optimizer settings with one line (UserError)."""
  if option(opt, 'name') not in OPTIMIZERS:
    raise UserError(f'optimizer.name must be one of {", ".join(OPTIMIZERS)}, '
                    f'got {option(opt, "name")!r}.')
  if opt.schedule not in SCHEDULES:
    raise UserError(f'optimizer.schedule must be step, cosine or constant, got {opt.schedule!r}.')
  for key in ('clip_grad_norm', 'lr_batch_scale', 'min_learning_rate', 'warmup_init_lr'):
    if option(opt, key) < 0:
      raise UserError(f'optimizer.{key} must be >= 0 (0: off), got {option(opt, key)}.')
  if opt.weight_decay < 0:
    raise UserError(f'optimizer.weight_decay must be >= 0, got {opt.weight_decay}.')
  if option(opt, 'name') == 'adamw':
    b1, b2, eps = option(opt, 'b1'), option(opt, 'b2'), option(opt, 'eps')
    if not (0 <= b1 < 1 and 0 <= b2 < 1 and eps > 0):
      raise UserError(f'adamw needs 0 <= optimizer.b1, b2 < 1 and optimizer.eps > 0, got '
                      f'b1={b1}, b2={b2}, eps={eps}.')


def peak_learning_rate(opt, batch_size: Optional[int]) -> float:
  """`opt.learning_rate`, times `batch_size / lr_batch_scale` where that is > 0 (DeiT: 512)."""
  scale = option(opt, 'lr_batch_scale')
  if not scale:
    return opt.learning_rate
  if batch_size is None:
    raise ValueError('optimizer.lr_batch_scale > 0 needs the global batch size (batch_size=).')
  return opt.learning_rate * batch_size / scale


def learning_rate_schedule(opt, steps_per_epoch: int, num_epochs: float,
                           batch_size: Optional[int] = None) -> optax.Schedule:
  """`opt.schedule`: `step` (x decay_factor from each 1-based epoch of `decay_epochs`, as the
  official code's adjust_learning_rate), `cosine` (to `min_learning_rate` at the end) or
  `constant`; with an optional linear warm-up over `warmup_epochs` from `warmup_init_lr`.
  `batch_size`: the global batch, for `lr_batch_scale`."""
  check(opt)
  base = peak_learning_rate(opt, batch_size)
  warmup = int(round(opt.warmup_epochs * steps_per_epoch))
  total = int(round(num_epochs * steps_per_epoch))
  if opt.schedule == 'step':
    boundaries = {int((e - 1) * steps_per_epoch): opt.decay_factor for e in opt.decay_epochs
                  if e >= 1}
    main = optax.piecewise_constant_schedule(
        base, {max(b - warmup, 0): f for b, f in boundaries.items()})
  elif opt.schedule == 'cosine':
    floor = option(opt, 'min_learning_rate')
    alpha = floor / base if floor and base else 0.0
    main = optax.cosine_decay_schedule(base, max(total - warmup, 1), alpha=alpha)
  else:
    main = optax.constant_schedule(base)
  if warmup <= 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(option(opt, 'warmup_init_lr'), base, warmup), main], [warmup])


def decay_mask(params, decay_bias_and_bn: bool) -> Callable:
  """Which parameters get weight decay: all (official), or only kernels/embeddings (ndim > 1)."""
  return jax.tree.map(lambda p: bool(decay_bias_and_bn or jnp.ndim(p) > 1), params)


def leaf_name(path) -> str:
  """The last key of a pytree path (a Flax parameter's own name)."""
  last = path[-1] if path else None
  return str(getattr(last, 'key', getattr(last, 'name', last)))


def adamw_decay_mask(params):
  """timm's param groups: decay all but ndim <= 1 and the leaves named in `NO_DECAY_NAMES`
  (by name too, since Flax's biases may have more than one axis)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: bool(jnp.ndim(p) > 1 and leaf_name(path) not in NO_DECAY_NAMES), params)


def make_optimizer(opt, schedule: optax.Schedule) -> optax.GradientTransformation:
  """`opt.name`: SGD with momentum (optionally Nesterov) and PyTorch-style weight decay
  (`decay_bias_and_bn`), or AdamW with decoupled decay masked as `adamw_decay_mask`; either
  after clipping the gradients to the global norm `clip_grad_norm` where that is > 0."""
  check(opt)
  if option(opt, 'name') == 'adamw':
    parts = [optax.adamw(schedule, b1=option(opt, 'b1'), b2=option(opt, 'b2'),
                         eps=option(opt, 'eps'), weight_decay=opt.weight_decay,
                         mask=adamw_decay_mask)]
  else:
    decay = optax.add_decayed_weights(
        opt.weight_decay, mask=lambda params: decay_mask(params, opt.decay_bias_and_bn))
    parts = [decay, optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov)]
  clip = option(opt, 'clip_grad_norm')
  return optax.chain(*([optax.clip_by_global_norm(clip)] if clip else []), *parts)
