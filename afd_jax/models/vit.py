"""Vision Transformers (Dosovitskiy et al. 2021) with timm's layout: `vit_ti16`, `vit_s16`,
`vit_b16`, `vit_l16` (16x16 patches, class token, 224x224 by default; timm's
`vit_large_patch16_224`: 304M parameters), `vit_h14` (14x14 patches, timm's
`vit_huge_patch14_224`: 632M), `vit_mini4` (patch 4, for 32x32
and 28x28 images) and `vit_micro4` (patch 4, width 64, 4 blocks, 28x28 by default: small enough
to train on a CPU).

Any image whose sides divide by the patch size works: the position embeddings, learned for the
model's `image_size`, are resized to the patch grid with PyTorch's bicubic interpolation
(a = -0.75, align_corners=False, no antialiasing), as timm's `resample_abs_pos_embed` and
transformers' `interpolate_pos_encoding` do. Blocks are pre-LN (LayerNorm eps 1e-6), multi-head
self-attention with one fused qkv projection, exact-erf GELU MLP. Taps: every encoder block's
patch tokens (class token dropped) as a `B x H/p x W/p x D` grid, all of one stage.

`drop_path_rate` > 0 turns on stochastic depth in training (timm's `DropPath`, rates linear over
the blocks from 0); it draws from the 'dropout' stream. The DeiTs (deit.py) subclass `ViT`.
"""
import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from afd_jax.layers import at_least_f32
from afd_jax.models.taps import Tap

_trunc_normal = nn.initializers.truncated_normal(0.02)
_dense = functools.partial(nn.Dense, kernel_init=_trunc_normal, bias_init=nn.initializers.zeros)
_norm = functools.partial(nn.LayerNorm, epsilon=1e-6)


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """`size_out x size_in` matrix of torch's bicubic interpolation along one axis."""
  a, scale = -0.75, size_in / size_out
  weights = np.zeros((size_out, size_in), np.float64)
  for i in range(size_out):
    src = scale * (i + 0.5) - 0.5
    base = int(np.floor(src))
    t = src - base
    coeffs = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
              ((a + 2) * t - (a + 3)) * t * t + 1,
              ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
              ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
    for k, c in enumerate(coeffs):
      weights[i, min(max(base - 1 + k, 0), size_in - 1)] += c
  return weights


def resize_position_grid(grid: jax.Array, height: int, width: int) -> jax.Array:
  """`1 x h x w x D` position embeddings -> `1 x height x width x D` (torch bicubic)."""
  _, h, w, _ = grid.shape
  if (h, w) == (height, width):
    return grid
  dtype = jnp.promote_types(grid.dtype, jnp.float32)  # float64 in float64 mode
  rows = jnp.asarray(bicubic_matrix(h, height), dtype)
  cols = jnp.asarray(bicubic_matrix(w, width), dtype)
  return jnp.einsum('Hh,bhwd,Ww->bHWd', rows, grid, cols,
                    precision=jax.lax.Precision.HIGHEST)


class Attention(nn.Module):
  heads: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    qkv = _dense(3 * d, dtype=self.dtype, name='qkv')(x).reshape(b, n, 3, self.heads, -1)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    logits = at_least_f32(jnp.einsum('bhqc,bhkc->bhqk', q, k)) * (d // self.heads) ** -0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bhkc->bqhc', weights, v).reshape(b, n, d)
    return _dense(d, dtype=self.dtype, name='proj')(out)


def drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Stochastic depth (timm's `DropPath`): in training, each sample's `x` is zeroed with
  probability `rate` and kept ones scaled by 1 / (1 - rate); a key from the 'dropout' stream."""
  if not train or rate == 0:
    return x
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep, shape)
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class EncoderBlock(nn.Module):
  heads: int
  mlp_dim: int
  dtype: Optional[Any] = None
  drop_path_rate: float = 0.0  # this block's stochastic depth (each residual branch)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = Attention(self.heads, self.dtype, name='attn')(_norm(dtype=self.dtype, name='norm1')(x))
    x = x + drop_path(self, y, self.drop_path_rate, train)
    y = _norm(dtype=self.dtype, name='norm2')(x)
    y = _dense(self.mlp_dim, dtype=self.dtype, name='fc1')(y)
    y = _dense(x.shape[-1], dtype=self.dtype, name='fc2')(nn.gelu(y, approximate=False))
    return x + drop_path(self, y, self.drop_path_rate, train)


class ViT(nn.Module):
  """Returns `(logits, taps)`; see the module docstring."""
  num_classes: int
  patch: int
  dim: int
  depth: int
  heads: int
  mlp_dim: int
  image_size: int = 224
  dtype: Optional[Any] = None
  drop_path_rate: float = 0.0  # stochastic depth, 0 -> this rate linearly over the blocks (timm)
  num_prefix_tokens = 1  # the class token (timm's attribute; not a field)
  prefix_token_names = ('cls_token',)  # the prefix tokens' parameters, in sequence order

  def taps(self) -> Tuple[Tap, ...]:
    return tuple(Tap(f'blocks.{i}', 1) for i in range(self.depth))

  def classify(self, tokens: jax.Array, train: bool) -> jax.Array:
    """Logits from the normalised tokens (`B x N x D`): the class token's head."""
    del train
    return at_least_f32(_dense(self.num_classes, dtype=self.dtype, name='head')(tokens[:, 0]))

  def embed(self, images: jax.Array) -> Tuple[jax.Array, int, int]:
    """Prefix tokens and patch tokens plus position embeddings: `(B x N x D, h, w)`."""
    height, width = images.shape[1:3]
    if height % self.patch or width % self.patch:
      raise ValueError(f'image sides {height}x{width} must divide by the patch size {self.patch}.')
    x = nn.Conv(self.dim, (self.patch, self.patch), self.patch, padding='VALID',
                dtype=self.dtype, name='patch_embed')(images.astype(self.dtype or jnp.float32))
    b, h, w, d = x.shape
    base, p = self.image_size // self.patch, self.num_prefix_tokens
    inits = {'cls_token': nn.initializers.normal(1e-6)}
    prefix = [self.param(n, inits.get(n, _trunc_normal), (1, 1, d), jnp.float32)
              for n in self.prefix_token_names]
    pos = self.param('pos_embed', _trunc_normal, (1, p + base * base, d), jnp.float32)
    grid = resize_position_grid(pos[:, p:].reshape(1, base, base, d), h, w).reshape(1, h * w, d)
    x = jnp.concatenate([jnp.broadcast_to(t, (b, 1, d)).astype(x.dtype) for t in prefix] +
                        [x.reshape(b, h * w, d)], axis=1)
    return x + jnp.concatenate([pos[:, :p], grid], axis=1).astype(x.dtype), h, w

  @nn.compact
  def __call__(self, images: jax.Array, train: bool):
    x, h, w = self.embed(images)
    b, _, d = x.shape
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    features = []
    for i in range(self.depth):
      x = EncoderBlock(self.heads, self.mlp_dim, self.dtype, float(rates[i]),
                       name=f'blocks_{i}')(x, train)
      features.append(x[:, self.num_prefix_tokens:].reshape(b, h, w, d))
    return self.classify(_norm(dtype=self.dtype, name='norm')(x), train), tuple(features)


CONFIGS = {
    'vit_ti16': dict(patch=16, dim=192, depth=12, heads=3, mlp_dim=768),
    'vit_s16': dict(patch=16, dim=384, depth=12, heads=6, mlp_dim=1536),
    'vit_b16': dict(patch=16, dim=768, depth=12, heads=12, mlp_dim=3072),
    'vit_l16': dict(patch=16, dim=1024, depth=24, heads=16, mlp_dim=4096),
    'vit_h14': dict(patch=14, dim=1280, depth=32, heads=16, mlp_dim=5120),
    'vit_mini4': dict(patch=4, dim=192, depth=6, heads=3, mlp_dim=384, image_size=32),
    'vit_micro4': dict(patch=4, dim=64, depth=4, heads=2, mlp_dim=128, image_size=28),
}
