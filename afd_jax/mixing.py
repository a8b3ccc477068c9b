"""Mixup and CutMix on a batch, and their soft targets, as jax ops inside the train step.

What timm's `Mixup` does in 'batch' mode (the DeiT recipe): with probability `prob` the batch
is mixed, by CutMix with probability `switch_prob` when both alphas are set, else by the one
that is; one `lam ~ Beta(alpha, alpha)` per batch; each image is mixed with the batch's
reversed order (example i with B - 1 - i). Mixup: `lam * x + (1 - lam) * x[::-1]`. CutMix: a
box of `sqrt(1 - lam)` of each side, centred uniformly in the image and clipped to it, pasted
from `x[::-1]`; `lam` becomes the share of the image left outside the box. Targets are
`lam * y + (1 - lam) * y[::-1]` of label-smoothed one-hots (`1 - s + s / C` on, `s / C` off).

It runs in the step, not in the input pipeline, so the teacher sees the very images the
student sees, and its draws come from the step's key (the state's rng folded with the step),
so a killed and resumed run mixes exactly as an uninterrupted one. Written here rather than
taken from a library because optax and clu have no batch mixing, and the Keras layers draw
from a stateful seed generator.
"""
import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Mixing:
  """`config.mixup.*` and `config.loss.label_smoothing`; all zero: hard labels, images as given."""
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  prob: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.0

  @property
  def mixes(self) -> bool:
    return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

  @property
  def soft_targets(self) -> bool:
    """Does the CE need soft targets (mixing or label smoothing)?"""
    return self.mixes or self.label_smoothing > 0

  @classmethod
  def from_config(cls, config) -> 'Mixing':
    """From a config; one that lacks the keys (the benchmark's) mixes nothing."""
    section = getattr(config, 'mixup', None)
    get = lambda key, default: float(getattr(section, key, default))
    return cls(get('mixup_alpha', 0.0), get('cutmix_alpha', 0.0), get('prob', 1.0),
               get('switch_prob', 0.5),
               float(getattr(getattr(config, 'loss', None), 'label_smoothing', 0.0)))

  def problems(self):
    """Messages for settings out of range (empty if all are fine)."""
    out = []
    for key in ('mixup_alpha', 'cutmix_alpha'):
      if getattr(self, key) < 0:
        out.append(f'mixup.{key} must be >= 0 (0 = off), got {getattr(self, key)}.')
    for key in ('prob', 'switch_prob'):
      if not 0 <= getattr(self, key) <= 1:
        out.append(f'mixup.{key} must be in [0, 1], got {getattr(self, key)}.')
    if not 0 <= self.label_smoothing < 1:
      out.append(f'loss.label_smoothing must be in [0, 1), got {self.label_smoothing}.')
    return out


def smoothed_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _box_mask(key: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
  """`H x W` float mask, 1 inside a CutMix box of `sqrt(1 - lam)` of each side (timm's
  rand_bbox: integer sides, a uniform integer centre, clipped to the image)."""
  ky, kx = jax.random.split(key)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (jnp.floor(height * ratio).astype(jnp.int32),
                  jnp.floor(width * ratio).astype(jnp.int32))
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  return inside.astype(jnp.float32)


def _draw(key: jax.Array, spec: Mixing) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """(mix at all?, CutMix rather than Mixup?, lam before CutMix's correction) for one batch."""
  k_mix, k_switch, k_mixup, k_cutmix = jax.random.split(key, 4)
  mix = jax.random.uniform(k_mix) < spec.prob
  if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
    cutmix = jax.random.uniform(k_switch) < spec.switch_prob
  else:
    cutmix = jnp.asarray(spec.cutmix_alpha > 0)
  lam_mixup = (jax.random.beta(k_mixup, spec.mixup_alpha, spec.mixup_alpha)
               if spec.mixup_alpha > 0 else jnp.ones(()))
  lam_cutmix = (jax.random.beta(k_cutmix, spec.cutmix_alpha, spec.cutmix_alpha)
                if spec.cutmix_alpha > 0 else jnp.ones(()))
  return mix, cutmix, jnp.where(cutmix, lam_cutmix, lam_mixup)


def mix_batch(images: jax.Array, labels: jax.Array, key: jax.Array, spec: Mixing,
              num_classes: int) -> Tuple[jax.Array, jax.Array]:
  """`(images, soft targets B x num_classes)` of a `B x H x W x C` batch (see the module
  docstring); without mixing, the images as given and smoothed one-hot targets."""
  targets = smoothed_one_hot(labels, num_classes, spec.label_smoothing)
  if not spec.mixes:
    return images, targets
  k_draw, k_box = jax.random.split(key)
  mix, cutmix, lam = _draw(k_draw, spec)
  height, width = images.shape[1:3]
  box = _box_mask(k_box, lam, height, width)
  lam = jnp.where(cutmix, 1.0 - jnp.mean(box), lam)  # the share left outside the box
  lam = jnp.where(mix, lam, 1.0).astype(jnp.float32)
  flipped = images[::-1]
  keep = jnp.where(cutmix, 1.0 - box, lam)[None, :, :, None].astype(images.dtype)
  mixed = jnp.where(mix, images * keep + flipped * (1 - keep), images)
  return mixed, lam * targets + (1.0 - lam) * targets[::-1]
