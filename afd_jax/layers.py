"""Layers with PyTorch semantics, shared by the models and the distillers.

The official AFD code is PyTorch; to match it number for number we need its batch norm
(momentum 0.1, eps 1e-5, *unbiased* variance in the running estimate) and its weight inits.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's default inits, written as JAX initializers.
# Conv weights in the CRD/AFD models: N(0, sqrt(2 / (k*k*out))), i.e. Kaiming-normal, fan-out.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def linear_bias_init(fan_in: int):
  """nn.Linear's default bias init for a layer with `fan_in` inputs."""
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# torch.nn.init.xavier_normal_ (untruncated, unlike jax.nn.initializers.glorot_normal).
xavier_normal = nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')


class BatchNorm(nn.Module):
  """Batch norm over every axis but the last, with PyTorch's semantics.

  Training mode normalises with the biased batch variance and updates the running
  estimate with the *unbiased* one (as torch.nn.BatchNorm*d does); inference mode uses
  the running estimates. Statistics are always computed in float32. Under `jit` with a
  batch sharded over devices and hosts, the means are global: this is synchronised BN.

  Attributes:
    momentum: PyTorch's convention: running = (1 - momentum) * running + momentum * batch.
    epsilon: added to the variance.
    dtype: output dtype (defaults to the input's).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    dtype = self.dtype or x.dtype
    if train:
      axes = tuple(range(x.ndim - 1))
      xf = at_least_f32(x)
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if not self.is_initializing():
        n = x.size // features
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * jax.lax.stop_gradient(mean)
        running_var.value = (1 - m) * running_var.value + m * jax.lax.stop_gradient(unbiased)
    else:
      mean, var = running_mean.value, running_var.value
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    y = (at_least_f32(x) - mean) * mul + bias
    return y.astype(dtype)


def conv(features: int, kernel: int, stride: int = 1, padding: Optional[int] = None,
         bias: bool = False, dtype: Optional[Dtype] = None, name: Optional[str] = None,
         kernel_init=conv_kernel_init) -> nn.Conv:
  """A Conv2d with PyTorch's explicit symmetric padding (default: kernel // 2)."""
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=bias, dtype=dtype,
                 kernel_init=kernel_init, bias_init=nn.initializers.zeros, name=name)


def linear(features: int, fan_in: int, zero_bias: bool = False,
           kernel_init=linear_kernel_init, dtype: Optional[Dtype] = None,
           name: Optional[str] = None) -> nn.Dense:
  """An nn.Linear with PyTorch's default init (or a zero bias, as some models set)."""
  bias_init = nn.initializers.zeros if zero_bias else linear_bias_init(fan_in)
  return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                  name=name)


def at_least_f32(x: jax.Array) -> jax.Array:
  """`x` in float32, or in its own dtype if that is wider (float64 in tests)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def spatial_mean(x: jax.Array) -> jax.Array:
  """Global average pooling: B x H x W x C -> B x C (accumulated in float32 or wider)."""
  return jnp.mean(at_least_f32(x), axis=(1, 2))


def check_features(features: Sequence[jax.Array], what: str) -> None:
  """Raise a clear ValueError unless `features` is a non-empty list of B x H x W x C arrays."""
  if not isinstance(features, (list, tuple)) or not features:
    raise ValueError(f'{what} must be a non-empty list or tuple of B x H x W x C arrays, '
                     f'got {type(features).__name__}.')
  for i, f in enumerate(features):
    if getattr(f, 'ndim', None) != 4:
      raise ValueError(f'{what}[{i}] must have rank 4 (B x H x W x C), '
                       f'got shape {getattr(f, "shape", None)}.')
  sizes = {f.shape[0] for f in features}
  if len(sizes) != 1:
    raise ValueError(f'{what} have different batch sizes: {[f.shape[0] for f in features]}.')


def check_feature_pair(student_features, teacher_features) -> None:
  """Clear errors for malformed student/teacher feature lists (every distiller's inputs)."""
  check_features(student_features, 'student_features')
  check_features(teacher_features, 'teacher_features')
  if student_features[0].shape[0] != teacher_features[0].shape[0]:
    raise ValueError(f'student and teacher features have different batch sizes: '
                     f'{student_features[0].shape[0]} vs {teacher_features[0].shape[0]}.')
