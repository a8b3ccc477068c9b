"""ResNets with 4 stages: CIFAR-style `resnet18`/`resnet34` (3x3 stem, no max-pool) and
ImageNet `resnet18im`/`resnet34im`/`resnet50im` (torchvision layout: 7x7/2 stem + max-pool).

Taps: the ReLU of every block's output.
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.layers import BatchNorm, at_least_f32, conv, linear, spatial_mean
from afd_jax.models.taps import Tap


class BasicBlock(nn.Module):
  """Two 3x3 convs."""
  planes: int
  stride: int
  dtype: Optional[Any] = None
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = conv(self.planes, 3, self.stride, dtype=self.dtype, name='conv1')(x)
    out = nn.relu(BatchNorm(dtype=self.dtype, name='bn1')(out, train))
    out = conv(self.planes, 3, dtype=self.dtype, name='conv2')(out)
    out = BatchNorm(dtype=self.dtype, name='bn2')(out, train)
    return nn.relu(out + _shortcut(self, x, train))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, as torchvision) -> 1x1 with 4x expansion."""
  planes: int
  stride: int
  dtype: Optional[Any] = None
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = conv(self.planes, 1, padding=0, dtype=self.dtype, name='conv1')(x)
    out = nn.relu(BatchNorm(dtype=self.dtype, name='bn1')(out, train))
    out = conv(self.planes, 3, self.stride, dtype=self.dtype, name='conv2')(out)
    out = nn.relu(BatchNorm(dtype=self.dtype, name='bn2')(out, train))
    out = conv(self.planes * 4, 1, padding=0, dtype=self.dtype, name='conv3')(out)
    out = BatchNorm(dtype=self.dtype, name='bn3')(out, train)
    return nn.relu(out + _shortcut(self, x, train))


def _shortcut(block, x, train):
  """Identity, or 1x1 conv + BN when the stride or the width changes."""
  out_planes = block.planes * block.expansion
  if block.stride == 1 and x.shape[-1] == out_planes:
    return x
  x = conv(out_planes, 1, block.stride, padding=0, dtype=block.dtype,
           name='downsample_conv')(x)
  return BatchNorm(dtype=block.dtype, name='downsample_bn')(x, train)


class ResNet(nn.Module):
  """Returns `(logits, taps)`; see the module docstring."""
  stage_sizes: Sequence[int]
  block: Any
  num_classes: int
  imagenet_stem: bool = False
  dtype: Optional[Any] = None

  def taps(self) -> Tuple[Tap, ...]:
    return tuple(Tap(f'layer{s + 1}.{i}', s + 1)
                 for s, n in enumerate(self.stage_sizes) for i in range(n))

  @nn.compact
  def __call__(self, images: jax.Array, train: bool):
    x = images.astype(self.dtype or jnp.float32)
    if self.imagenet_stem:
      x = conv(64, 7, 2, dtype=self.dtype, name='conv1')(x)
    else:
      x = conv(64, 3, dtype=self.dtype, name='conv1')(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name='bn1')(x, train))
    if self.imagenet_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = []
    for s, n in enumerate(self.stage_sizes):
      for i in range(n):
        stride = 2 if s > 0 and i == 0 else 1
        x = self.block(64 * 2 ** s, stride, self.dtype, name=f'layer{s + 1}_{i}')(x, train)
        features.append(x)
    pooled = spatial_mean(x)
    logits = linear(self.num_classes, pooled.shape[-1], dtype=self.dtype, name='fc')(pooled)
    return at_least_f32(logits), tuple(features)
