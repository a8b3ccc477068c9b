"""Per-pixel losses of dense prediction over `B x H x W x K` logits: cross-entropy with an ignore
index, Hinton KD at every pixel, and channel-wise distillation (CWD, Shu et al., ICCV 2021).

Written here: the per-pixel CE needs the ignored pixels out of both the sum and the count (the
metrics and the eval loss share `pixel_nll`), KD and CWD reuse `kd.py`'s tempered KL, and none
of our packages has CWD.
"""
import jax
import jax.numpy as jnp

from afd_jax.distill.kd import kd_loss, kl_to_probabilities
from afd_jax.layers import at_least_f32
from afd_jax.pixels import IGNORE_INDEX


def _pixels(logits: jax.Array) -> jax.Array:
  """`B x H x W x K` -> `(B*H*W) x K`."""
  if logits.ndim != 4:
    raise ValueError(f'per-pixel logits must be B x H x W x K, got shape {logits.shape}.')
  return logits.reshape(-1, logits.shape[-1])


def pixel_nll(logits: jax.Array, labels: jax.Array,
              ignore_index: int = IGNORE_INDEX):
  """`(nll, counted)`, both `B x H x W`: each pixel's softmax cross-entropy (0 where ignored)
  and whether its label counts (is not `ignore_index`). `labels`: `B x H x W` integers."""
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f'labels {labels.shape} do not match the logits {logits.shape[:-1]}.')
  counted = labels != ignore_index
  logp = jax.nn.log_softmax(at_least_f32(logits), axis=-1)
  safe = jnp.where(counted, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.where(counted, nll, 0.0), counted


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array,
                        ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """Mean softmax cross-entropy over the pixels whose label is not `ignore_index` (0 when every
  pixel is ignored). `labels`: `B x H x W` integers."""
  nll, counted = pixel_nll(logits, labels, ignore_index)
  return jnp.sum(nll) / jnp.maximum(jnp.sum(counted), 1)


def pixel_kd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                  temperature: float = 1.0) -> jax.Array:
  """Hinton KD at every pixel: `T**2 * KL(softmax(t / T) || softmax(s / T))` over the classes,
  mean over the pixels (`kd_loss` of the pixels as examples). The teacher is a constant."""
  _same_shape(student_logits, teacher_logits)
  return kd_loss(_pixels(student_logits), _pixels(teacher_logits), temperature)


def channel_distributions(logits: jax.Array) -> jax.Array:
  """`B x H x W x K` -> `(B*K) x (H*W)`: each channel's map as one row, over its positions."""
  b, h, w, k = logits.shape
  return jnp.transpose(logits.reshape(b, h * w, k), (0, 2, 1)).reshape(b * k, h * w)


def cwd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
             temperature: float = 4.0) -> jax.Array:
  """Channel-wise distillation: each channel's map becomes a distribution over the H*W positions
  (softmax of `map / T`); the loss is `T**2 * KL(teacher || student)` summed over positions,
  mean over the batch and the channels. The teacher is a constant."""
  _same_shape(student_logits, teacher_logits)
  if student_logits.ndim != 4:
    raise ValueError(f'CWD takes B x H x W x K maps, got shape {student_logits.shape}.')
  t = jax.lax.stop_gradient(at_least_f32(channel_distributions(teacher_logits)))
  p_t = jax.nn.softmax(t / temperature, axis=-1)
  return kl_to_probabilities(p_t, channel_distributions(student_logits), temperature)


def _same_shape(student: jax.Array, teacher: jax.Array) -> None:
  if student.shape != teacher.shape:
    raise ValueError(f'student logits {student.shape} and teacher logits {teacher.shape} differ '
                     'in shape; resize one to the other first.')
