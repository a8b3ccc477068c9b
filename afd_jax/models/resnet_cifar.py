"""CIFAR ResNets of the CRD benchmark (`resnet8` ... `resnet110`, `resnet8x4`, `resnet32x4`).

Three stages of basic blocks (depth = 6n + 2; the block of resnet.py: a 1x1 conv + BN shortcut
when the shape changes) on a 3x3 stem. Taps: the ReLU of every block's
output; with `tap_every=2` (resnet110) every second block, as the official AFD code does.
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.layers import BatchNorm, at_least_f32, conv, linear, spatial_mean
from afd_jax.models.resnet import BasicBlock
from afd_jax.models.taps import Tap


class CifarResNet(nn.Module):
  """Returns `(logits, taps)`; see the module docstring."""
  depth: int
  widths: Sequence[int]
  num_classes: int
  tap_every: int = 1
  dtype: Optional[Any] = None

  @property
  def blocks_per_stage(self) -> int:
    return (self.depth - 2) // 6

  def taps(self) -> Tuple[Tap, ...]:
    n = self.blocks_per_stage
    blocks = [Tap(f'layer{s + 1}.{i}', s + 1) for s in range(3) for i in range(n)]
    return tuple(t for j, t in enumerate(blocks, 1) if j % self.tap_every == 0)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool):
    x = conv(self.widths[0], 3, dtype=self.dtype, name='conv1')(images.astype(self.dtype or jnp.float32))
    x = nn.relu(BatchNorm(dtype=self.dtype, name='bn1')(x, train))
    features, j = [], 0
    for s in range(3):
      for i in range(self.blocks_per_stage):
        stride = 2 if s > 0 and i == 0 else 1
        x = BasicBlock(self.widths[s + 1], stride, self.dtype, name=f'layer{s + 1}_{i}')(x, train)
        j += 1
        if j % self.tap_every == 0:
          features.append(x)
    pooled = spatial_mean(x)
    logits = linear(self.num_classes, pooled.shape[-1], dtype=self.dtype, name='fc')(pooled)
    return at_least_f32(logits), tuple(features)
