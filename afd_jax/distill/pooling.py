"""PyTorch's AdaptiveAvgPool2d: a window mean where the sizes divide (one fused reduction, or a
broadcast when growing), else two small matrix products.

Output cell i averages input rows floor(i * H_in / H_out) .. ceil((i + 1) * H_in / H_out) - 1
(and the same for columns). This covers shrinking, sizes that do not divide, and growing
(a smaller map replicated up to the larger size).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`out_size x in_size` matrix whose row i averages the inputs of output cell i."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f'adaptive pooling needs positive sizes, got {in_size} -> {out_size}.')
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil((i + 1) * in / out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool2d(x: jax.Array, out_hw) -> jax.Array:
  """Pools the last two axes of `x` (`... x H x W`) to `out_hw`, exactly as PyTorch does."""
  (h_in, w_in), (h_out, w_out) = x.shape[-2:], tuple(out_hw)
  if (h_in, w_in) == (h_out, w_out):
    return x
  lead = x.shape[:-2]
  if h_in % h_out == 0 and w_in % w_out == 0:  # equal windows: their mean
    windows = x.reshape(lead + (h_out, h_in // h_out, w_out, w_in // w_out))
    return jnp.mean(windows, axis=(-3, -1))
  if h_out % h_in == 0 and w_out % w_in == 0:  # each output cell is one input cell
    grown = jnp.broadcast_to(x[..., :, None, :, None],
                             lead + (h_in, h_out // h_in, w_in, w_out // w_in))
    return grown.reshape(lead + (h_out, w_out))
  if h_in != h_out:
    x = jnp.einsum('...hw,ih->...iw', x, jnp.asarray(pool_matrix(h_in, h_out), x.dtype))
  if w_in != w_out:
    x = jnp.einsum('...hw,jw->...hj', x, jnp.asarray(pool_matrix(w_in, w_out), x.dtype))
  return x
