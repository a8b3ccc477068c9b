"""Segmentation models: a backbone of the zoo (or any tapped module) under a head that returns
`B x H x W x K` logits at the input's resolution.

  Segmenter(backbone=models.create('resnet20', 1), num_classes=11, head='fpn')

Heads:
  'fpn': a light semantic FPN (Kirillov et al., 2019) over the last tap of every backbone
    stage: a 1x1 lateral per stage, top-down sums, a 3x3 conv + BN + ReLU per level, the levels
    resized to the finest and summed, a 1x1 classifier. For CNN backbones.
  'progressive': progressive upsampling (SETR-PUP, Zheng et al., 2021) from the backbone's last
    tap: `upsamplings` times a 3x3 conv + BN + ReLU and a 2x bilinear upsampling, then a 1x1
    classifier. For ViTs, whose taps are one token grid (log2 of the patch size by default).
The logits are resized bilinearly to the input's size. The backbone's own classifier output is
not used (build it with one class).

`taps()`: the backbone's taps, then the head's levels ('head.p<stage>' for FPN,
'head.up<i>' for progressive upsampling), each a stage after the backbone's last.
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.layers import BatchNorm, at_least_f32, conv
from afd_jax.models.taps import Tap, stage_final

HEADS = ('fpn', 'progressive')


def resize_to(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resizing of `B x h x w x C` to `B x height x width x C` (half-pixel centres)."""
  if x.shape[1:3] == (height, width):
    return x
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), 'bilinear')


class ConvBNReLU(nn.Module):
  """3x3 conv (no bias), batch norm, ReLU."""
  features: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, 3, dtype=self.dtype, name='conv')(x)
    return nn.relu(BatchNorm(dtype=self.dtype, name='bn')(x, train))


class Segmenter(nn.Module):
  """Returns `(logits B x H x W x K, taps)`; see the module docstring."""
  backbone: nn.Module
  num_classes: int
  head: str = 'fpn'
  width: int = 64  # channels of the head's levels
  upsamplings: int = 0  # 'progressive': 2x steps; 0 = log2 of the backbone's `patch`
  dtype: Optional[Any] = None

  def _backbone_taps(self) -> Tuple[Tap, ...]:
    return tuple(self.backbone.taps())

  def _upsamplings(self) -> int:
    if self.upsamplings:
      return self.upsamplings
    patch = getattr(self.backbone, 'patch', 0)
    if not patch:
      raise ValueError("head 'progressive' needs `upsamplings` (config: head_upsamplings) for a "
                       'backbone without a patch size.')
    return max(int(patch).bit_length() - 1, 1)

  def taps(self) -> Tuple[Tap, ...]:
    """The backbone's taps, then the head's levels."""
    if self.head not in HEADS:
      raise ValueError(f'head must be one of {", ".join(HEADS)}, got {self.head!r}.')
    base = self._backbone_taps()
    if self.head == 'fpn':
      names = [f'head.p{base[i].stage}' for i in stage_final(base)]
    else:
      names = [f'head.up{i}' for i in range(self._upsamplings())]
    last = max(t.stage for t in base)
    return base + tuple(Tap(n, last + i + 1) for i, n in enumerate(names))

  @nn.compact
  def __call__(self, images: jax.Array, train: bool):
    if self.head not in HEADS:
      raise ValueError(f'head must be one of {", ".join(HEADS)}, got {self.head!r}.')
    _, features = self.backbone(images, train)
    features = list(features)
    height, width = images.shape[1:3]
    if self.head == 'fpn':
      x, levels = self._fpn([features[i] for i in stage_final(self._backbone_taps())], train)
    else:
      x, levels = self._progressive(features[-1], train)
    logits = conv(self.num_classes, 1, padding=0, bias=True, dtype=self.dtype,
                  name='classifier')(x)
    return at_least_f32(resize_to(logits, height, width)), tuple(features + levels)

  def _fpn(self, stage_maps: Sequence[jax.Array], train: bool):
    """Top-down sums of 1x1 laterals, a 3x3 conv per level, levels summed at the finest."""
    taps = self._backbone_taps()
    stages = [taps[i].stage for i in stage_final(taps)]
    laterals = [conv(self.width, 1, padding=0, bias=True, dtype=self.dtype,
                     name=f'lateral{s}')(m) for s, m in zip(stages, stage_maps)]
    for k in range(len(laterals) - 2, -1, -1):  # coarse to fine
      h, w = laterals[k].shape[1:3]
      laterals[k] = laterals[k] + resize_to(laterals[k + 1], h, w)
    levels = [ConvBNReLU(self.width, self.dtype, name=f'level{s}')(m, train)
              for s, m in zip(stages, laterals)]
    finest = max(range(len(levels)), key=lambda k: levels[k].shape[1] * levels[k].shape[2])
    h, w = levels[finest].shape[1:3]
    return sum(resize_to(level, h, w) for level in levels), levels

  def _progressive(self, x: jax.Array, train: bool):
    """`upsamplings` times 3x3 conv + BN + ReLU and 2x upsampling."""
    levels = []
    for i in range(self._upsamplings()):
      x = ConvBNReLU(self.width, self.dtype, name=f'up{i}')(x, train)
      x = resize_to(x, 2 * x.shape[1], 2 * x.shape[2])
      levels.append(x)
    return x, levels
