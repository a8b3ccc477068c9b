"""VGG with batch norm for CIFAR, as in the CRD benchmark (`vgg8` = config S, `vgg13` = B).

Five blocks of 3x3 conv (with bias) + BN + ReLU, 2x2 max-pools between blocks; as in CRD, the
pool before the last block is applied only for 64-pixel-high inputs. Taps: the ReLU output
of every conv layer.
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from afd_jax.layers import BatchNorm, at_least_f32, conv, linear, spatial_mean
from afd_jax.models.taps import Tap

CONFIGS = {
    'S': ((64,), (128,), (256,), (512,), (512,)),
    'B': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class VGG(nn.Module):
  """Returns `(logits, taps)`; see the module docstring."""
  blocks: Sequence[Sequence[int]]
  num_classes: int
  dtype: Optional[Any] = None

  def taps(self) -> Tuple[Tap, ...]:
    return tuple(Tap(f'block{b}.{3 * i}', b + 1)
                 for b, widths in enumerate(self.blocks) for i in range(len(widths)))

  @nn.compact
  def __call__(self, images: jax.Array, train: bool):
    height = images.shape[1]
    x = images.astype(self.dtype or jnp.float32)
    features = []
    for b, widths in enumerate(self.blocks):
      if 0 < b < 4 or (b == 4 and height == 64):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for i, width in enumerate(widths):
        x = conv(width, 3, bias=True, dtype=self.dtype, name=f'block{b}_conv{i}')(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name=f'block{b}_bn{i}')(x, train))
        features.append(x)
    pooled = spatial_mean(x)
    logits = linear(self.num_classes, pooled.shape[-1], zero_bias=True,
                    kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                    name='fc')(pooled)
    return at_least_f32(logits), tuple(features)
