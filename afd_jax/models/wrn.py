"""Wide ResNets `wrn{16,28,40}x{1,2}` (pre-activation blocks, depth 6n + 4).

Tap k (k < 3n) is ReLU(BN1 of block k+1) of block k's output, i.e. exactly what block k+1's first
conv consumes; the last tap is ReLU(final BN) of the network's output. The official code runs
BN1 a second time to make the tap (updating its running statistics twice a step); here each
block's pre-activation is computed once and reused, so the statistics update once.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.layers import BatchNorm, at_least_f32, conv, linear, spatial_mean
from afd_jax.models.taps import Tap


class WideBlock(nn.Module):
  """Pre-activation block. Returns (output, ReLU(BN1(input)))."""
  planes: int
  stride: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool):
    act = nn.relu(BatchNorm(dtype=self.dtype, name='bn1')(x, train))
    out = conv(self.planes, 3, self.stride, dtype=self.dtype, name='conv1')(act)
    out = nn.relu(BatchNorm(dtype=self.dtype, name='bn2')(out, train))
    out = conv(self.planes, 3, dtype=self.dtype, name='conv2')(out)
    if x.shape[-1] == self.planes:
      shortcut = x
    else:
      shortcut = conv(self.planes, 1, self.stride, padding=0, dtype=self.dtype,
                      name='shortcut')(act)
    return out + shortcut, act


class WideResNet(nn.Module):
  """Returns `(logits, taps)`; see the module docstring."""
  depth: int
  widen: int
  num_classes: int
  dtype: Optional[Any] = None

  @property
  def blocks_per_stage(self) -> int:
    return (self.depth - 4) // 6

  def taps(self) -> Tuple[Tap, ...]:
    n = self.blocks_per_stage
    return tuple(Tap(f'block{s + 1}.layer.{i}', s + 1) for s in range(3) for i in range(n))

  @nn.compact
  def __call__(self, images: jax.Array, train: bool):
    widths = (16 * self.widen, 32 * self.widen, 64 * self.widen)
    x = conv(16, 3, dtype=self.dtype, name='conv1')(images.astype(self.dtype or jnp.float32))
    features = []
    for s in range(3):
      for i in range(self.blocks_per_stage):
        stride = 2 if s > 0 and i == 0 else 1
        x, act = WideBlock(widths[s], stride, self.dtype, name=f'block{s + 1}_{i}')(x, train)
        if s > 0 or i > 0:
          features.append(act)
    act = nn.relu(BatchNorm(dtype=self.dtype, name='bn1')(x, train))
    features.append(act)
    pooled = spatial_mean(act)
    logits = linear(self.num_classes, pooled.shape[-1], zero_bias=True, dtype=self.dtype,
                    name='fc')(pooled)
    return at_least_f32(logits), tuple(features)
