"""Small models written the way public JAX code writes them, for `'tests.jax_world_models:...'`.

Stand-ins for the styles afd_jax must take unedited (written here, not copied): a factory that
forwards `**kwargs` to a module with no `dtype`, a module class as the factory, `train`
keyword-only or named `deterministic` / `is_training` / something else, a ViT whose blocks run
under `nn.scan` (and a MAP head that calls one more MLP), a ResNet whose BatchNorm names a pmap
axis (`axis_name='batch'`), and NNX models whose constructor takes `rngs` as flax's docs show,
bridged with `nnx.bridge.to_linen`.
"""
import functools
import warnings
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge


# --- a plain CNN, no `dtype` field; built by a **kwargs factory or passed as a class ---------

class Unit(nn.Module):
  """Conv-ReLU-Conv plus the input: a residual unit."""
  features: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.features, (3, 3))(nn.relu(x))
    return x + nn.Conv(self.features, (3, 3))(nn.relu(y))


class PlainNet(nn.Module):
  """Stem, three residual units, mean pool, head; its `__call__` takes no train flag."""
  num_classes: int = 10
  width: int = 8

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (3, 3), name='stem')(x)
    for i in range(3):
      x = Unit(self.width, name=f'unit{i}')(x)
    return nn.Dense(self.num_classes, name='head')(x.mean(axis=(1, 2)))


def make(num_classes=10, **kwargs):
  """The common factory that forwards whatever it is given."""
  return PlainNet(num_classes=num_classes, **kwargs)


class TypedNet(PlainNet):
  """PlainNet with a `dtype` field (what the factory rule should pass)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return PlainNet(self.num_classes, self.width, name='net')(x.astype(self.dtype))


def make_typed(num_classes=10, **kwargs):
  return TypedNet(num_classes=num_classes, **kwargs)


class OutputsNet(nn.Module):
  """Its class count is called `outputs`: a factory forwarding `**kwargs` must not be given
  `num_classes` (nor `dtype`)."""
  outputs: int = 10

  @nn.compact
  def __call__(self, x):
    return PlainNet(self.outputs, name='net')(x)


def forward_all(**kwargs):
  """A factory that forwards everything, `num_classes` included, to its module."""
  return OutputsNet(**kwargs)


class RunningAverageNet(nn.Module):
  """flax's BatchNorm convention as the flag: `use_running_average` (True in eval)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, use_running_average: bool = True):
    x = nn.BatchNorm(use_running_average=use_running_average)(nn.Conv(8, (3, 3))(x))
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class MaskNet(PlainNet):
  """An optional second argument that is not the train flag: which it is, only a config says."""

  @nn.compact
  def __call__(self, x, mask=None):
    return PlainNet(self.num_classes, self.width, name='net')(x if mask is None else x * mask)


# --- train flags under other names ------------------------------------------------------------

class DropBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, deterministic: bool):
    y = nn.Dropout(0.5)(nn.relu(nn.Conv(self.features, (3, 3))(x)), deterministic=deterministic)
    return x + nn.Conv(self.features, (3, 3))(y)


class DeterministicNet(nn.Module):
  """Dropout blocks; `__call__(x, deterministic=True)`: the flag means *not* training."""
  num_classes: int = 10
  width: int = 8

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.Conv(self.width, (3, 3), name='stem')(x)
    for i in range(2):
      x = DropBlock(self.width, name=f'block{i}')(x, deterministic)
    return nn.Dense(self.num_classes, name='head')(x.mean(axis=(1, 2)))


class IsTrainingNet(DeterministicNet):
  """The same network, its flag named `is_training` (keyword-only)."""

  @nn.compact
  def __call__(self, x, *, is_training: bool = False):
    return DeterministicNet(self.num_classes, self.width, name='net')(x, not is_training)


class CustomFlagNet(DeterministicNet):
  """A flag name no rule knows (`use_dropout`): the config names it (`train_arg`)."""

  @nn.compact
  def __call__(self, x, use_dropout: bool = False):
    return DeterministicNet(self.num_classes, self.width, name='net')(x, not use_dropout)


# --- a ViT as large-model code writes one: keyword-only train, scanned blocks, a MAP head ------

class Mlp(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    y = nn.Dropout(0.0)(nn.gelu(nn.Dense(self.hidden)(x)), deterministic)
    return nn.Dense(x.shape[-1])(y)


class EncoderLayer(nn.Module):
  """Pre-LN block returning `(x, extras)`, the shape `nn.scan` needs (carry, per-layer out)."""
  heads: int
  hidden: int

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
    x = x + Mlp(self.hidden)(nn.LayerNorm()(x), deterministic)
    return x, {'out': x}


class Stack(nn.Module):
  """The layers, unrolled or under `nn.scan` (stacked parameters), and what each returned."""
  depth: int
  heads: int
  hidden: int
  scan: bool = False

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    if self.scan:
      layer = nn.remat(EncoderLayer, prevent_cse=False, static_argnums=(2,))
      x, stacked = nn.scan(layer, variable_axes={'params': 0}, split_rngs={'params': True},
                           in_axes=nn.broadcast, length=self.depth)(
                               self.heads, self.hidden, name='layers')(x, deterministic)
      extras = {f'layer{i}': {'out': stacked['out'][i]} for i in range(self.depth)}
    else:
      extras = {}
      for i in range(self.depth):
        x, extras[f'layer{i}'] = EncoderLayer(self.heads, self.hidden,
                                              name=f'layers_{i}')(x, deterministic)
    return nn.LayerNorm(name='norm')(x), extras


class AttentionPool(nn.Module):
  """Multihead attention pooling with a learned probe, then the blocks' own MLP class."""
  heads: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    probe = self.param('probe', nn.initializers.normal(0.02), (1, 1, x.shape[-1]))
    x = nn.MultiHeadDotProductAttention(num_heads=self.heads)(
        jnp.tile(probe, (x.shape[0], 1, 1)), x)
    return (x + Mlp(self.hidden)(nn.LayerNorm()(x)))[:, 0]


class KwViT(nn.Module):
  """`__call__(image, *, train=False)` -> `(logits, extras)` (each layer's output among them);
  pool 'gap', 'map' or 'tok' (a class token, and no `num_prefix_tokens` attribute)."""
  num_classes: int = 10
  width: int = 16
  depth: int = 2
  patch: int = 4
  pool_type: str = 'gap'
  scan: bool = False

  @nn.compact
  def __call__(self, image, *, train=False):
    x = nn.Conv(self.width, (self.patch, self.patch), self.patch, name='embedding')(image)
    x = x.reshape(x.shape[0], -1, self.width)
    x = x + self.param('pos', nn.initializers.normal(0.02), (1,) + x.shape[1:])
    if self.pool_type == 'tok':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width))
      x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
    x, extras = Stack(self.depth, 2, 2 * self.width, self.scan, name='Transformer')(x, not train)
    if self.pool_type == 'map':
      x = AttentionPool(2, 2 * self.width, name='MAPHead')(x)
    else:
      x = x[:, 0] if self.pool_type == 'tok' else x.mean(axis=1)
    return nn.Dense(self.num_classes, name='head')(x), {'encoder': extras, 'pre_logits': x}


def kw_vit(num_classes=10, **kwargs):
  return KwViT(num_classes=num_classes, **kwargs)


def map_vit(num_classes=10, **kwargs):
  return KwViT(num_classes=num_classes, pool_type='map', **kwargs)


def scan_vit(num_classes=10, **kwargs):
  return KwViT(num_classes=num_classes, scan=True, **kwargs)


# --- a ResNet written for pmap: BatchNorm with axis_name='batch' ------------------------------

class PmapBlock(nn.Module):
  filters: int
  norm: functools.partial
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm()(nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)))
    y = self.norm(scale_init=nn.initializers.zeros)(nn.Conv(self.filters, (3, 3),
                                                            use_bias=False)(y))
    if x.shape != y.shape:
      x = self.norm()(nn.Conv(self.filters, (1, 1), self.strides, use_bias=False)(x))
    return nn.relu(x + y)


class PmapResNet(nn.Module):
  """`__call__(x, train=True)`; every BatchNorm averages over the pmap axis 'batch'."""
  num_classes: int = 10
  stage_sizes: Sequence[int] = (1, 1)
  width: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             dtype=self.dtype, axis_name='batch')
    x = nn.relu(norm(name='bn_init')(nn.Conv(self.width, (3, 3), use_bias=False,
                                             name='conv_init')(x.astype(self.dtype))))
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        x = PmapBlock(self.width * 2 ** i, norm, 2 if i and not j else 1)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x.mean(axis=(1, 2)))


class PmeanNet(PlainNet):
  """A collective of its own over the pmap axis, not in a layer: refused, with what to do."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = PlainNet(self.num_classes, self.width, name='net')(x)
    return x - jax.lax.pmean(x.mean(axis=0), 'batch') if train else x


# --- NNX, as flax's docs write a model: `__init__(..., *, rngs: nnx.Rngs)` ---------------------

class NnxBlock(nnx.Module):
  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(channels, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    return x + self.dropout(nnx.relu(self.bn(self.conv(x))))


class NnxNet(nnx.Module):
  """Train mode through `model.train()` / `model.eval()`; its blocks' outputs sown (`sow`)."""

  def __init__(self, din: int, width: int, num_classes: int, *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(din, width, (3, 3), rngs=rngs)
    self.blocks = nnx.List([NnxBlock(width, rngs=rngs) for _ in range(2)])
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, x, rngs: Optional[nnx.Rngs] = None):
    x = self.stem(x)
    for i, block in enumerate(self.blocks):
      x = block(x)
      with warnings.catch_warnings():  # sow outside nnx.capture: deprecated, still what the
        warnings.simplefilter('ignore', DeprecationWarning)  # bridge hands to 'intermediates'
        self.sow(nnx.Intermediate, f'block{i}', x)
    return self.head(x.mean(axis=(1, 2)))


class NnxSilentNet(NnxNet):
  """The same network, sowing nothing."""

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


def nnx_net(num_classes=10, channels=1, width=8):
  return bridge.to_linen(NnxNet, channels, width, num_classes)


def nnx_silent_net(num_classes=10, channels=1, width=8):
  return bridge.to_linen(NnxSilentNet, channels, width, num_classes)
