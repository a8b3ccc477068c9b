"""Layers with PyTorch semantics, shared by the models and the distillers.

The official AFD code is PyTorch; to match it number for number we need its batch norm
(momentum 0.1, eps 1e-5, *unbiased* variance in the running estimate) and its weight inits.
"""
import contextlib
import contextvars
from typing import Any, Iterator, Optional, Sequence, Tuple

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


class TorchConv(nn.Module):
  """`torch.nn.Conv2d` (bias, PyTorch's default init: `linear_kernel_init`, `linear_bias_init`)
  on channels-last maps; `kernel` is HWIO."""
  features: int
  kernel: Tuple[int, int]
  stride: int = 1
  padding: int = 0

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1] * self.kernel[0] * self.kernel[1]
    return nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                   padding=((self.padding, self.padding), (self.padding, self.padding)),
                   kernel_init=linear_kernel_init, bias_init=linear_bias_init(fan_in),
                   name='conv')(x)


class TorchConvTranspose(nn.Module):
  """`torch.nn.ConvTranspose2d(in, features, kernel, stride, padding)` (no output padding).

  Computed as its equivalent convolution: the input dilated by `stride`, padded by
  `kernel - 1 - padding` on each side, convolved with the spatially flipped kernel. `kernel` is
  stored in that convolution's HWIO layout: `kernel[h, w, i, o] = W[i, o, K-1-h, K-1-w]` for
  PyTorch's weight `W` (in x out x K x K). Init: PyTorch's default, whose fan is `out * K * K`.
  """
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0

  @nn.compact
  def __call__(self, x):
    k, c_in = self.kernel, x.shape[-1]
    init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')
    kernel = self.param('kernel', init, (k, k, c_in, self.features), jnp.float32)
    bias = self.param('bias', linear_bias_init(self.features * k * k), (self.features,),
                      jnp.float32)
    pad = k - 1 - self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        lhs_dilation=(self.stride, self.stride), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias.astype(y.dtype)


# torch.nn.init.xavier_normal_ (untruncated, unlike jax.nn.initializers.glorot_normal).
xavier_normal = nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')


_BN_GROUP_SIZE = contextvars.ContextVar('afd_jax_bn_group_size', default=0)


@contextlib.contextmanager
def batch_norm_groups(group_size: int) -> Iterator[None]:
  """Within this context, training-mode batch norms (`BatchNorm`, and the AFD meta-network's)
  compute their statistics over consecutive groups of `group_size` examples ("ghost" batch
  norm); 0 means the whole batch. The train step enters it around the student and the
  distiller; code that is traced inside it is affected, nothing else. Enter it inside the
  function that you jit: `jax.jit` caches a trace by its arguments, not by this context.

  With `group_size` dividing the per-device batch, every group lies on one device, so the
  statistics need no cross-device reduction, and the result does not depend on the device count.
  """
  if group_size < 0:
    raise ValueError(f'bn_group_size must be >= 0, got {group_size}.')
  token = _BN_GROUP_SIZE.set(int(group_size))
  try:
    yield
  finally:
    _BN_GROUP_SIZE.reset(token)


def batch_norm_group_count(batch: int) -> int:
  """Into how many groups a training-mode batch norm splits a batch of `batch` examples
  (1: the whole batch). A group size that does not divide the batch is a ValueError."""
  size = _BN_GROUP_SIZE.get()
  if size <= 0 or size == batch:
    return 1
  if batch % size:
    raise ValueError(f'bn_group_size={size} does not divide the batch of {batch} examples.')
  return batch // size


def running_update(running: jax.Array, batch_value: jax.Array, momentum: float) -> jax.Array:
  """PyTorch's running-average update towards `batch_value` (no gradient flows into it)."""
  return (1 - momentum) * running + momentum * jax.lax.stop_gradient(batch_value)


def mean_over_groups(group_values: jax.Array, groups: int) -> jax.Array:
  """The mean over G groups of per-group statistics (any shape with G * features elements)."""
  return jnp.mean(group_values.reshape(groups, -1), axis=0)


class BatchNorm(nn.Module):
  """Batch norm over every axis but the last, with PyTorch's semantics.

  Training mode normalises with the biased batch variance and updates the running
  estimate with the *unbiased* one (as torch.nn.BatchNorm*d does); inference mode uses
  the running estimates. Statistics are computed in float32 or wider (`at_least_f32`).
  Under `jit` with a batch sharded over devices and hosts, the means are global: this is
  synchronised BN.

  Inside `batch_norm_groups(k)`, training mode normalises each group of k consecutive examples
  with that group's own mean and biased variance, and the running estimates move towards the
  mean over the G groups of the group statistics:
    running_mean <- (1 - momentum) * running_mean + momentum * mean_g(mean_g)
    running_var  <- (1 - momentum) * running_var + momentum * mean_g(var_g * n / (n - 1)),
  with n = k * H * W the elements per channel in one group (each group's unbiased variance).
  With one group this is the global batch norm above, exactly.

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
    if not train:
      mul = jax.lax.rsqrt(running_var.value + self.epsilon) * scale
      return ((at_least_f32(x) - running_mean.value) * mul + bias).astype(dtype)
    groups = batch_norm_group_count(x.shape[0])
    xf = at_least_f32(x)
    if groups == 1:  # the global batch norm, computed exactly as it always was
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      batch_mean, batch_var = mean, var
    else:
      xf = xf.reshape((groups, x.shape[0] // groups) + x.shape[1:])
      axes = tuple(range(1, xf.ndim - 1))
      mean = jnp.mean(xf, axes, keepdims=True)
      var = jnp.mean(jnp.square(xf - mean), axes, keepdims=True)
      batch_mean, batch_var = mean_over_groups(mean, groups), mean_over_groups(var, groups)
    if not self.is_initializing():
      n = x.size // features // groups
      running_mean.value = running_update(running_mean.value, batch_mean, self.momentum)
      running_var.value = running_update(running_var.value, batch_var * (n / max(n - 1, 1)),
                                         self.momentum)
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    y = (xf - mean) * mul + bias
    return y.reshape(x.shape).astype(dtype)


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
  """`x` in float32, or in its own dtype if that is wider (float64: `config.dtype='float64'`)."""
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
