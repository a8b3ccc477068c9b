"""Models defined outside afd_jax, as a user would bring them (`'tests.byo_models:factory'`).

Each `__call__(images, train)` returns logits only; afd_jax finds the feature taps itself.
"""
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge


class ConvBlock(nn.Module):
  """Conv-BN-ReLU-Conv-BN plus a shortcut, ReLU: a plain residual block."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Conv(self.features, (3, 3), self.stride, use_bias=False)(x)
    y = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)
    if x.shape[-1] != self.features or self.stride != 1:
      x = nn.Conv(self.features, (1, 1), self.stride, use_bias=False)(x)
    return nn.relu(x + y)


class TinyConvNet(nn.Module):
  """Two stages of two residual blocks; the user's names, flax's own layers."""
  num_classes: int
  width: int = 8

  @nn.compact
  def __call__(self, images, train: bool):
    x = nn.relu(nn.Conv(self.width, (3, 3), name='stem')(images))
    for stage in range(2):
      for i in range(2):
        x = ConvBlock(self.width * 2 ** stage, 2 if stage and not i else 1,
                      name=f'stage{stage}_block{i}')(x, train)
    return nn.Dense(self.num_classes, name='head')(x.mean(axis=(1, 2)))


class EncoderBlock(nn.Module):
  """Pre-LN transformer block."""
  heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.mlp_dim)(y)))
    return x + y


class Encoder(nn.Module):
  depth: int

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.depth):
      x = EncoderBlock(heads=2, mlp_dim=2 * x.shape[-1], name=f'encoderblock_{i}')(x, train)
    return nn.LayerNorm(name='encoder_norm')(x)


class TinyViT(nn.Module):
  """Patch-4 ViT with a class token (`classifier='token'`, as big_vision names it)."""
  num_classes: int
  dim: int = 16
  depth: int = 3
  patch: int = 4
  classifier: str = 'token'

  @nn.compact
  def __call__(self, images, train: bool):
    x = nn.Conv(self.dim, (self.patch, self.patch), self.patch, name='embedding')(images)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), x], axis=1)
    x = x + self.param('pos_embedding', nn.initializers.normal(0.02), (1, h * w + 1, d))
    x = Encoder(self.depth, name='Transformer')(x, train)
    return nn.Dense(self.num_classes, name='head')(x[:, 0])


def tiny_convnet(num_classes: int, width: int = 8) -> nn.Module:
  return TinyConvNet(num_classes=num_classes, width=width)


def tiny_vit(num_classes: int, dim: int = 16, depth: int = 3) -> nn.Module:
  return TinyViT(num_classes=num_classes, dim=dim, depth=depth)


class NnxConvNet(nnx.Module):
  """An NNX model that sows its blocks' outputs (how NNX exposes intermediates)."""

  def __init__(self, num_classes: int, channels: int, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
    self.head = nnx.Linear(16, num_classes, rngs=rngs)

  def __call__(self, images, train: bool):
    with warnings.catch_warnings():  # sow outside nnx.capture: deprecated, still what the bridge
      warnings.simplefilter('ignore', DeprecationWarning)  # hands to linen's 'intermediates'
      x = nnx.relu(self.conv1(images))
      self.sow(nnx.Intermediate, 'block1', x)
      x = nnx.relu(self.conv2(x))
      self.sow(nnx.Intermediate, 'block2', x)
    return self.head(x.mean(axis=(1, 2)))


def nnx_convnet(num_classes: int, channels: int = 1) -> nn.Module:
  """The NNX model as a linen module, through Flax's bridge."""
  return bridge.to_linen(NnxConvNet, num_classes, channels)


def not_a_module(num_classes: int):
  return jax.numpy.zeros(num_classes)
